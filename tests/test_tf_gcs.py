"""TensorFlow's own GCS client against a real GCS server: TensorBoard events of a gs:// run,
read back through tf.data.

Each test runs its processes in a network and mount namespace of their own (tests/tf_gcs.py:
the Google endpoints mapped to a local TLS proxy in front of fake-gcs-server); it is skipped
only where no namespace can be made (``unshare -n -m`` needs root, ``unshare -r -n -m``
unprivileged user namespaces).
"""

from __future__ import annotations

import json
import pathlib
import shlex
import subprocess
import sys
import textwrap

import pytest
import tf_gcs
from helpers import subprocess_env
from toy_model import toy_command

pytest.importorskip("tensorflow")
UNSHARE = tf_gcs.unshare_prefix()
pytestmark = pytest.mark.skipif(
    UNSHARE is None,
    reason="neither `unshare -n -m` (root) nor `unshare -r -n -m` (user namespaces) works here",
)


def _run(dump: pathlib.Path, cmd: list[str], cwd: pathlib.Path) -> str:
    proc = subprocess.run(
        tf_gcs.command(UNSHARE, dump, cmd),
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout


# tf.data through TensorFlow's GCS client: the TensorBoard event files (TFRecord files) read back
# from the bucket, their "loss" scalars printed as JSON {step: value}.
READ_EVENTS = textwrap.dedent(
    """
    import json, sys
    import tensorflow as tf

    files = tf.io.gfile.glob(sys.argv[1] + "/events.out.tfevents.*")
    losses = {}
    for record in tf.data.TFRecordDataset(files):
        event = tf.compat.v1.Event.FromString(record.numpy())
        for v in event.summary.value:
            if v.tag == "loss":
                losses[event.step] = float(tf.make_ndarray(v.tensor))
    print("LOSSES", json.dumps(losses))
    """
)


def test_tensorboard_events_and_tf_data_on_gcs(tmp_path):
    """The trainer (toy network) with TensorBoard on and a gs:// workdir: clu's writer puts the
    events into the bucket through TensorFlow's client, and tf.data reads them back from there;
    they hold the losses of metrics.jsonl (written through gcsfs)."""
    args = {"workdir": "{bucket}/run", "overrides": {"tensorboard": True, "total_steps": 3}}
    train = shlex.join(toy_command(args))
    read = shlex.join([sys.executable, "-c", READ_EVENTS, "{bucket}/run/tb"])
    out = _run(tmp_path / "bucket", ["sh", "-c", f"{train} && {read}"], tmp_path)
    run = tmp_path / "bucket" / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    (losses,) = [
        json.loads(x[len("LOSSES ") :]) for x in out.splitlines() if x.startswith("LOSSES")
    ]
    assert {int(k): v for k, v in losses.items()} == pytest.approx(
        {r["step"]: r["loss"] for r in lines}, rel=1e-6
    )
    assert list((run / "tb").glob("events.out.tfevents.*")), sorted(run.rglob("*"))
    assert not (tmp_path / "gs:").exists()
