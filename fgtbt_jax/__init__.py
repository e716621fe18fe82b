"""fgtbt-jax: FGTBT (Frequency-Guided Task-Balancing Transformer) in JAX/Flax."""

from fgtbt_jax.model import FGTBT, build_model
from fgtbt_jax.porting import export_pth, load_pretrained

__all__ = ["FGTBT", "build_model", "export_pth", "load_pretrained"]
__version__ = "0.1.0"
