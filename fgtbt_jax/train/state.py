"""The training state and its creation / sharding.

``TrainState`` is one pytree holding everything a resumed run needs besides the config:
the step (= the data position: the input pipeline restarts at ``start_step = step``), the
parameters and BatchNorm statistics, the optimizer state, their EMA and the base RNG key
(per-step keys are ``fold_in(rng, step)``, so they need no state of their own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from fgtbt_jax import errors
from fgtbt_jax.models.fgtbt import FGTBT
from fgtbt_jax.ops import kernel_ops, resolve_kernels
from fgtbt_jax.train import optim, sharding

PyTree = Any

# Parameters the reference never trains: its ``conv_seg`` has no gradient (SPEC §2.2), so
# PyTorch's AdamW neither updates nor decays it.
FROZEN_PREFIXES: tuple[tuple[str, ...], ...] = (("decode_head", "conv_seg"),)


@flax.struct.dataclass
class TrainState:
    """Everything that evolves during training (a pytree; arrays only).

    Attributes:
      step: int32 scalar, training steps done (micro-steps when accumulating gradients).
      params, batch_stats: the model variables (``batch_stats`` holds float running statistics
        and int32 ``num_batches_tracked`` counters).
      opt_state: the optax state of :func:`make_optimizer`'s transformation.
      ema_params, ema_batch_stats: exponential moving averages (counters copied, not averaged).
      rng: uint32 (2,) raw PRNG key; step ``t`` uses ``fold_in(rng, t)``.
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    ema_params: PyTree
    ema_batch_stats: PyTree
    rng: jax.Array

    def variables(self) -> dict[str, PyTree]:
        """The live model variables ``{'params', 'batch_stats'}``."""
        return {"params": self.params, "batch_stats": self.batch_stats}

    def ema_variables(self) -> dict[str, PyTree]:
        """The EMA variables ``{'params', 'batch_stats'}`` (used for evaluation and export)."""
        return {"params": self.ema_params, "batch_stats": self.ema_batch_stats}


def trainable_mask(params: PyTree) -> PyTree:
    """Pytree of bools like ``params``: False under :data:`FROZEN_PREFIXES`."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    mask = {path: not any(path[: len(p)] == p for p in FROZEN_PREFIXES) for path in flat}
    return flax.traverse_util.unflatten_dict(mask)


def grad_accum_steps(config: ml_collections.ConfigDict) -> int:
    accum = int(config.optim.grad_accum_steps)
    if accum < 1:
        raise errors.ConfigError(f"optim.grad_accum_steps must be >= 1, got {accum}")
    if config.total_steps % accum:
        raise errors.ConfigError(
            f"total_steps={config.total_steps} must be a multiple of optim.grad_accum_steps={accum}"
        )
    return accum


def make_optimizer(
    config: ml_collections.ConfigDict,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW + multi-step schedule of ``config.optim`` with the frozen parameters masked out.

    ``config.total_steps`` counts training steps; the schedule counts optimizer updates
    (``total_steps / grad_accum_steps``).
    """
    updates = config.total_steps // grad_accum_steps(config)
    return optim.make_optimizer(config.optim, updates, trainable=trainable_mask)


def ema_decay(config: ml_collections.ConfigDict) -> float:
    """EMA decay per optimizer update (0 when ``config.ema`` is off: EMA = live weights).

    ``config.ema_half_life`` > 0: 0.5^(1 / half_life). Otherwise the reference's
    0.5^(4·BATCH/10 000) per step with BATCH the per-dataset batch of one update
    (``batch_per_dataset · grad_accum_steps``).
    """
    if not config.ema:
        return 0.0
    half_life = float(config.ema_half_life)
    if half_life > 0:
        return 0.5 ** (1.0 / half_life)
    return optim.ema_decay(int(config.data.batch_per_dataset) * grad_accum_steps(config))


def state_from_variables(
    variables: Mapping[str, PyTree], tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
    """A step-0 state around given variables (jit-able). ``rng``: raw uint32 (2,) key."""
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params),
        ema_batch_stats=jax.tree.map(jnp.copy, batch_stats),
        rng=jnp.asarray(rng, jnp.uint32),
    )


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """(parameter-init key, training key), raw uint32 keys derived from ``config.seed``."""
    base = jax.random.PRNGKey(seed)
    return jax.random.fold_in(base, 0), jax.random.fold_in(base, 1)


def init_fn(
    model: FGTBT, tx: optax.GradientTransformation, img_size: int
) -> Callable[[jax.Array, jax.Array], TrainState]:
    """``(init_key, train_key) → TrainState`` with randomly initialised variables."""

    def init(init_key: jax.Array, train_key: jax.Array) -> TrainState:
        x = jnp.zeros((1, img_size, img_size, 3), jnp.float32)
        variables = model.init({"params": init_key}, x, train=False)
        return state_from_variables(flax.core.unfreeze(variables), tx, train_key)

    return init


def state_sharding(abstract_state: TrainState, mesh: Mesh, fsdp: bool) -> TrainState:
    """NamedSharding per leaf: replicated, or FSDP-split large leaves (params, opt state, EMA)."""
    if fsdp:
        return sharding.fsdp_sharding(abstract_state, mesh)
    rep = sharding.replicated(mesh)
    return jax.tree.map(lambda _: rep, abstract_state)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: FGTBT,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    *,
    variables: Mapping[str, PyTree] | None = None,
) -> tuple[TrainState, TrainState]:
    """A sharded step-0 state and its sharding tree.

    Shapes come from ``jax.eval_shape`` (nothing is materialised on one device first); the
    state is then created by a jitted init whose outputs are laid out by ``state_sharding``.
    ``variables`` (e.g. a ported release checkpoint) replace the random initialisation.
    ``model`` must be built with ``stat_groups=1`` (the init runs on a single image).
    """
    init_key, train_key = seed_keys(int(config.seed))
    init = init_fn(model, tx, int(config.img_size))
    abstract = jax.eval_shape(init, init_key, train_key)
    shardings = state_sharding(abstract, mesh, bool(config.sharding.fsdp))
    if variables is None:
        options = kernel_ops(resolve_kernels(config.model.kernels)).INIT_COMPILER_OPTIONS
        state = jax.jit(init, out_shardings=shardings, compiler_options=options)(
            init_key, train_key
        )
    else:
        host = jax.tree.map(np.asarray, jax.device_get(flax.core.unfreeze(dict(variables))))
        expected = jax.tree.structure(abstract.variables())
        got = jax.tree.structure({"params": host["params"], "batch_stats": host["batch_stats"]})
        if expected != got:
            raise ValueError("init variables do not match the model's variable tree")
        state = jax.jit(lambda v, k: state_from_variables(v, tx, k), out_shardings=shardings)(
            host, train_key
        )
    return state, shardings


def abstract_train_state(
    config: ml_collections.ConfigDict,
    model: FGTBT,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> TrainState:
    """``jax.ShapeDtypeStruct`` tree (with shardings) of the state, e.g. as a restore target."""
    init_key, train_key = seed_keys(int(config.seed))
    abstract = jax.eval_shape(init_fn(model, tx, int(config.img_size)), init_key, train_key)
    shardings = state_sharding(abstract, mesh, bool(config.sharding.fsdp))
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
