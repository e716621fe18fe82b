"""Optimizer, learning-rate schedule and EMA of the training recipe (SPEC §6).

AdamW follows PyTorch's ``torch.optim.AdamW``: bias-corrected moments, ``eps`` added after the
square root, and decoupled weight decay ``lr · wd · θ`` applied to every parameter it updates.
The learning rate is multiplied by ``gamma`` at each milestone like ``MultiStepLR`` stepped once
per optimizer update.

PyTorch skips parameters whose gradient is ``None`` altogether (no weight decay either), e.g. the
reference's unused ``decode_head.conv_seg``. In JAX such parameters get zero gradients, which
AdamW would still decay; keep them out of the trained tree or pass ``trainable`` to freeze them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fgtbt_jax import errors


def _get(cfg: Mapping[str, Any] | Any, name: str, default: Any) -> Any:
    return cfg[name] if name in cfg else default


def make_schedule(optim_cfg: Mapping[str, Any] | Any) -> optax.Schedule:
    """Learning rate as a function of the optimizer-update count (0-based).

    ``lr · gamma^(#milestones ≤ count)``, times ``min(1, (count + 1) / warmup_steps)`` when
    ``warmup_steps > 0`` (milestones stay absolute update counts, not shifted by the warm-up).
    """
    lr = float(optim_cfg["lr"])
    gamma = float(_get(optim_cfg, "gamma", 1.0))
    milestones = [int(m) for m in _get(optim_cfg, "milestones", ())]
    if any(m <= 0 for m in milestones) or milestones != sorted(set(milestones)):
        raise errors.ConfigError(
            f"optim.milestones must be increasing positive steps, got {milestones}"
        )
    steps = optax.piecewise_constant_schedule(lr, {m: gamma for m in milestones})
    warmup = int(_get(optim_cfg, "warmup_steps", 0))
    if warmup < 0:
        raise errors.ConfigError(f"optim.warmup_steps must be >= 0, got {warmup}")
    if warmup == 0:
        return steps

    def schedule(count: jax.Array) -> jax.Array:
        ramp = jnp.minimum(1.0, (jnp.asarray(count, float) + 1.0) / warmup)  # float64 with x64
        return steps(count) * ramp

    return schedule


def make_optimizer(
    optim_cfg: Mapping[str, Any] | Any,
    total_steps: int,
    *,
    trainable: Any | Callable[[Any], Any] | None = None,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (PyTorch semantics) with the multi-step schedule, optional clipping / accumulation.

    Args:
      optim_cfg: ``config.optim``: lr, b1, b2, eps, weight_decay, milestones, gamma,
        warmup_steps, clip_norm (> 0 enables global-norm clipping), grad_accum_steps
        (> 1 wraps the optimizer in ``optax.MultiSteps``; the schedule then counts updates).
      total_steps: number of optimizer updates of the run (validated against the warm-up).
      trainable: optional pytree of bools matching the params (or a function params → such a
        tree); ``False`` leaves get zero updates, like PyTorch parameters without gradients.

    Returns:
      ``(tx, schedule)``: the optax transformation and the learning-rate schedule (a function
      of the optimizer-update count).
    """
    warmup = int(_get(optim_cfg, "warmup_steps", 0))
    if total_steps <= 0 or warmup > total_steps:
        raise errors.ConfigError(
            f"total_steps={total_steps} must be > 0 and >= warmup_steps={warmup}"
        )
    schedule = make_schedule(optim_cfg)
    tx = optax.adamw(
        learning_rate=schedule,
        b1=float(_get(optim_cfg, "b1", 0.9)),
        b2=float(_get(optim_cfg, "b2", 0.999)),
        eps=float(_get(optim_cfg, "eps", 1e-8)),
        weight_decay=float(_get(optim_cfg, "weight_decay", 0.01)),
    )
    clip_norm = float(_get(optim_cfg, "clip_norm", 0.0))
    if clip_norm > 0:
        tx = optax.chain(optax.clip_by_global_norm(clip_norm), tx)
    if trainable is not None:

        def labels(params: Any) -> Any:
            mask = trainable(params) if callable(trainable) else trainable
            return jax.tree.map(lambda t: "train" if t else "frozen", mask)

        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    accum = int(_get(optim_cfg, "grad_accum_steps", 1))
    if accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=accum).gradient_transformation()
    return tx, schedule


def ema_decay(batch_per_dataset: int) -> float:
    """Per-step EMA decay of the release: 0.5^(4 · batch_per_dataset / 10 000) (SPEC §6)."""
    return 0.5 ** (4 * batch_per_dataset / 10_000)


def ema_update(ema_tree: Any, new_tree: Any, decay: float | jax.Array) -> Any:
    """``decay · ema + (1 - decay) · new`` for floating leaves; other leaves take ``new``.

    Pure and jit-able; use it for params and for the BatchNorm running statistics. Leaves keep
    their dtype (the average is computed in float32 at least).
    """

    def update(ema: jax.Array, new: jax.Array) -> jax.Array:
        if not jnp.issubdtype(jnp.asarray(new).dtype, jnp.floating):
            return new
        dtype = jnp.promote_types(jnp.asarray(new).dtype, jnp.float32)
        d = jnp.asarray(decay, dtype)
        avg = d * ema.astype(dtype) + (1 - d) * new.astype(dtype)
        return avg.astype(jnp.asarray(new).dtype)

    return jax.tree.map(update, ema_tree, new_tree)
