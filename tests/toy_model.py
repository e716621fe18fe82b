"""A tiny stand-in for FGTBT in training-loop tests (compiles in about a second on CPU).

Same interface as ``fgtbt_jax.models.fgtbt.build_model``: (B, S, S, 3) NHWC images → (B, S/2, S/2,
124) heatmaps, ``batch_stats`` from the project's PyTorch-style BatchNorm, per-group batch
statistics (``stat_groups``) in BatchNorm and in a CSAM-like channel attention, and dropout.
The real network's train step is checked against the reference in test_train_step.py; these
tests are about sharding, multi-process, checkpoints and resumption, which do not depend on
the architecture.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import flax.linen as nn
import jax
import ml_collections

from fgtbt_jax.models.layers import BatchNorm, expand_groups, group_mean
from fgtbt_jax.ops import xla


class ToyNet(nn.Module):
    num_landmarks: int = 124
    width: int = 8
    stat_groups: int = 1
    ballast: int = 0  # elements of an extra parameter that only makes checkpoints big

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False) -> jax.Array:
        x = nn.Conv(self.width, (3, 3), (2, 2), padding=1, use_bias=False, name="conv1")(images)
        x = nn.relu(BatchNorm(ops=xla, stat_groups=self.stat_groups, name="bn1")(x, train))
        # CSAM-like attention from batch statistics (over the statistic group).
        pooled = group_mean(x, (0, 1, 2), self.stat_groups)  # (groups, C)
        att = nn.sigmoid(nn.Dense(self.width, name="att")(pooled))
        x = x * expand_groups(att, x, self.stat_groups)
        x = nn.Dropout(0.1, broadcast_dims=(1, 2))(x, deterministic=not train)
        x = nn.Conv(self.width, (3, 3), padding=1, use_bias=False, name="conv2")(x)
        x = nn.relu(BatchNorm(ops=xla, stat_groups=self.stat_groups, name="bn2")(x, train))
        x = nn.Conv(self.num_landmarks, (1, 1), name="head")(x)
        if self.ballast:
            x = x + 0.0 * self.param("ballast", nn.initializers.zeros, (self.ballast,))[0]
        return x


def build_toy(model_config: ml_collections.ConfigDict, *, stat_groups: int = 1) -> ToyNet:
    return ToyNet(
        num_landmarks=int(model_config.num_landmarks),
        width=int(model_config.get("toy_width", 8)),
        stat_groups=stat_groups,
        ballast=int(model_config.get("toy_ballast", 0)),
    )


def toy_config(**overrides: object) -> ml_collections.ConfigDict:
    """The tiny preset on synthetic 32² data, batch 1 per dataset, ready for the toy model."""
    from configs import fgtbt

    c = fgtbt.get_config("tiny")
    c.img_size, c.heatmap_size = 32, 16
    c.model.toy_width = 8
    c.data.source = "synthetic"
    c.data.batch_per_dataset = 1
    c.total_steps = 6
    c.optim.milestones = (3,)
    c.log_every = 1
    c.checkpoint_every = 2
    c.eval_every = 0
    c.export_pth = ""
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


def restore_toy(workdir: str | os.PathLike, step: int, **overrides: object):
    """The ``TrainState`` of a toy run's checkpoint ``step`` in ``workdir`` (local or gs://),
    fetched to the host; ``step`` must be the latest one. ``overrides``: the run's
    :func:`toy_config` fields that shape the state."""
    from fgtbt_jax import checkpointing
    from fgtbt_jax.train import sharding
    from fgtbt_jax.train import state as train_state

    config = toy_config(**overrides)
    tx, _ = train_state.make_optimizer(config)
    abstract = train_state.abstract_train_state(
        config, build_toy(config.model), tx, sharding.make_mesh(1)
    )
    with checkpointing.Checkpointer(workdir) as ckpt:
        assert ckpt.latest_step() == step, (ckpt.latest_step(), step)
        return jax.device_get(ckpt.restore(abstract, step))


def toy_command(args: dict) -> list[str]:
    """The command that runs :func:`main` with ``args`` in a child process (cwd = repository
    root, tests/ on ``PYTHONPATH``: ``helpers.subprocess_env``)."""
    return [sys.executable, __file__, json.dumps(args)]


def _paused(batches, pause_at: int, go: str):
    """``batches`` (a ``Source.train_iterator``) that prints ``AT_STEP k`` before step
    ``pause_at``'s batch and waits for the file ``go``."""

    def paused(self, start_step=0):
        for step, batch in enumerate(batches(self, start_step), start=start_step + 1):
            if step == pause_at:
                print(f"AT_STEP {step}", flush=True)
                while not os.path.exists(go):
                    time.sleep(0.02)
            yield batch

    return paused


def main(args: dict) -> int:
    """fgtbt_jax.train.trainer's training loop with the toy network, in this process (joins a
    ``jax.distributed`` job when JAX_COORDINATOR_ADDRESS etc. are set). ``args``: ``workdir``,
    ``overrides`` (toy_config fields), optional ``pause_at`` k and ``go`` path: print
    ``AT_STEP k`` before step k and wait for the file ``go``; optional ``kill_after_save`` k:
    SIGKILL this process as soon as the asynchronous save of step k has started (printing
    ``SAVING k``)."""
    from fgtbt_jax import checkpointing
    from fgtbt_jax.train import sharding, trainer
    from input_pipeline import sources

    sharding.maybe_initialize_distributed()
    config = toy_config(**args.get("overrides", {}))
    if args.get("pause_at"):
        for source in (sources.SyntheticSource, sources.TfdsSource):
            source.train_iterator = _paused(source.train_iterator, args["pause_at"], args["go"])
    if args.get("kill_after_save"):
        save = checkpointing.Checkpointer.save

        def save_then_die(self, state, **kw):
            saved = save(self, state, **kw)
            if int(state.step) == args["kill_after_save"]:
                print(f"SAVING {int(state.step)}", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            return saved

        checkpointing.Checkpointer.save = save_then_die
    return trainer.train_and_evaluate(config, args["workdir"], build=build_toy)


if __name__ == "__main__":
    sys.exit(main(json.loads(sys.argv[1])))
