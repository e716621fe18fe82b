"""One process of tests/train/test_export_multiprocess.py: saves a checkpoint of random tiny
weights, then exports its EMA weights to ``WORKDIR/ema.pth`` (process 0 writes).

``python export_worker.py WORKDIR`` (cwd = repository root; joins the ``jax.distributed`` job
described by JAX_COORDINATOR_ADDRESS etc.).
"""

import pathlib
import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from configs import fgtbt
from fgtbt_jax import checkpointing
from fgtbt_jax.models.fgtbt import build_model
from fgtbt_jax.porting import convert, pretrained
from fgtbt_jax.train import sharding
from fgtbt_jax.train.state import TrainState

sharding.maybe_initialize_distributed()  # before any backend starts

work = pathlib.Path(sys.argv[1])
config = fgtbt.get_config("tiny")
abstract = convert.abstract_variables(build_model(config.model), config.img_size)
rng = np.random.default_rng(0)
host = jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(a.dtype), abstract)
rep = NamedSharding(sharding.make_mesh(), P())
v = jax.tree.map(lambda x: jax.device_put(x, rep), host)
state = TrainState(
    step=jax.device_put(np.int32(5), rep),
    params=v["params"],
    batch_stats=v["batch_stats"],
    opt_state={},
    ema_params=v["params"],
    ema_batch_stats=v["batch_stats"],
    rng=jax.device_put(np.zeros(2, np.uint32), rep),
)
with checkpointing.Checkpointer(work) as ckpt:
    ckpt.save(state)
print("EXPORTED", pretrained.export_ema_pth(work, work / "ema.pth", config), flush=True)
