"""The training step: forward in train mode, FMB loss, AdamW update, EMA.

``make_train_step`` returns a pure ``train_step(state, batch) -> (state, metrics)``;
``jit_train_step`` compiles it with ``NamedSharding``s over the ``data`` mesh (batch split over
devices, state replicated or FSDP-split, the input state donated).

Batch (global arrays, leading dimension split over ``data``):
  ``image`` (B, S, S, 3) float32 NHWC normalized, ``coords`` (B, C, 2) int32 heatmap-space
  ``(x, y)`` targets, ``mask`` (B, C) bool, ``dataset_id`` (B,) int32; C = the channels of the
  run's unified set (:func:`fgtbt_jax.schemes.unified_set_of`; 124 without schemes).
Target heatmaps are drawn on the device from ``coords`` inside
:func:`fgtbt_jax.train.loss.fmb_loss`.

BatchNorm / CSAM statistics follow the model's ``stat_groups``: build it with the number of
devices for per-device statistics (the reference's unsynchronised data parallelism) or with 1
for statistics over the whole global batch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from fgtbt_jax import schemes
from fgtbt_jax.models.fgtbt import FGTBT
from fgtbt_jax.train import loss, optim, sharding
from fgtbt_jax.train.state import TrainState, ema_decay, grad_accum_steps

PyTree = Any
Metrics = dict[str, jax.Array]

BATCH_KEYS: tuple[str, ...] = ("image", "coords", "mask", "dataset_id")


def step_rngs(rng: jax.Array, step: jax.Array) -> dict[str, jax.Array]:
    """The ``dropout`` and ``drop_path`` keys of training step ``step``."""
    dropout, drop_path = jax.random.split(jax.random.fold_in(rng, step))
    return {"dropout": dropout, "drop_path": drop_path}


def make_loss_fn(
    model: FGTBT, config: ml_collections.ConfigDict
) -> Callable[..., tuple[jax.Array, tuple[jax.Array, PyTree]]]:
    """``loss_fn(params, batch_stats, batch, rngs) -> (total, (per_dataset (D,), new_stats))``.

    Train-mode forward (batch statistics, dropout / drop-path from ``rngs``) and FMB loss with
    the class-balanced weights of ``config.loss.beta`` over the run's datasets; D =
    ``UnifiedSet.num_ids`` (4 + the scheme datasets).
    """
    unified = schemes.unified_set_of(config.data)
    # float64 on the host; the loss rounds them to its own dtype (that of the heatmaps).
    weights = unified.fmb_weights(float(config.loss.beta), np.float64)
    num_datasets = unified.num_ids

    def loss_fn(
        params: PyTree, batch_stats: PyTree, batch: Mapping[str, jax.Array], rngs: PyTree
    ) -> tuple[jax.Array, tuple[jax.Array, PyTree]]:
        heatmaps, mutated = model.apply(
            {"params": params, "batch_stats": batch_stats},
            batch["image"],
            train=True,
            rngs=rngs,
            mutable=["batch_stats"],
        )
        total, per_dataset = loss.fmb_loss(
            heatmaps,
            batch["coords"],
            batch["mask"],
            batch["dataset_id"],
            weights,
            num_datasets=num_datasets,
            loss_cfg=config.loss,
        )
        return total, (per_dataset, mutated["batch_stats"])

    return loss_fn


def make_train_step(
    model: FGTBT,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: ml_collections.ConfigDict,
    *,
    return_grads: bool = False,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, Metrics]]:
    """A pure ``train_step(state, batch) -> (new_state, metrics)`` (not jitted).

    Metrics (scalars unless noted): ``loss`` (total FMB loss), ``loss_per_dataset`` (D,),
    ``dataset_present`` (D,) bool (D = ``UnifiedSet.num_ids``, indexed by ``dataset_id``),
    ``lr`` (learning rate of this step's update), ``grad_norm``;
    with ``return_grads`` also ``grads`` (the gradient pytree, for inspection and tests).
    With ``optim.grad_accum_steps`` = k > 1, ``tx`` (``optax.MultiSteps``) applies the mean
    gradient every k-th step; the EMA moves only on those steps.
    """
    loss_fn = make_loss_fn(model, config)
    num_datasets = schemes.unified_set_of(config.data).num_ids
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = grad_accum_steps(config)
    decay = ema_decay(config)

    def train_step(state: TrainState, batch: Mapping[str, jax.Array]) -> tuple[TrainState, Metrics]:
        rngs = step_rngs(state.rng, state.step)
        (total, (per_dataset, batch_stats)), grads = grad_fn(
            state.params, state.batch_stats, batch, rngs
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        if accum > 1:  # MultiSteps: the inner update happened iff its mini-step wrapped to 0
            d = jnp.where(opt_state.mini_step == 0, decay, 1.0)
        else:
            d = decay
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            batch_stats=batch_stats,
            opt_state=opt_state,
            ema_params=optim.ema_update(state.ema_params, params, d),
            ema_batch_stats=optim.ema_update(state.ema_batch_stats, batch_stats, d),
        )
        metrics = {
            "loss": total,
            "loss_per_dataset": per_dataset,
            "dataset_present": loss.dataset_presence(batch["dataset_id"], num_datasets),
            "lr": jnp.asarray(schedule(state.step // accum), float),  # float64 with x64
            "grad_norm": optax.global_norm(grads),
        }
        if return_grads:
            metrics["grads"] = grads
        return new_state, metrics

    return train_step


def batch_sharding(mesh: Mesh) -> dict[str, jax.sharding.NamedSharding]:
    return {k: sharding.data_sharding(mesh) for k in BATCH_KEYS}


def jit_train_step(
    train_step: Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, Metrics]],
    state_shardings: TrainState,
    mesh: Mesh,
) -> Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, Metrics]]:
    """``jax.jit`` with the state's shardings in and out, the batch split over ``data``,
    replicated metrics, and the input state donated (do not reuse it after the call)."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def interleave_datasets(batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Reorders host rows from dataset blocks (C C W W …) to rounds (C W 3 A C W 3 A …).

    With per-device statistics each device then sees a mix of datasets, as every process of
    the reference's data-parallel training drew one sample of each. The FMB loss does not
    depend on the row order. Batches whose datasets have unequal counts are returned as is.
    """
    ids = np.asarray(batch["dataset_id"])
    values, counts = np.unique(ids, return_counts=True)
    if len(values) < 2 or np.any(counts != counts[0]):
        return dict(batch)
    blocks = [np.flatnonzero(ids == v) for v in values]
    perm = np.stack(blocks, axis=1).reshape(-1)  # round r holds row r of every block
    return {k: np.asarray(v)[perm] for k, v in batch.items()}
