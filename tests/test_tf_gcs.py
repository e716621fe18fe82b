"""TensorFlow's own GCS client against a real GCS server: TensorBoard events of a gs:// run, and
a TFDS data_dir on gs:// written by prepare_data.py and read back through tf.data.

Each test runs its processes in a network and mount namespace of their own (tests/tf_gcs.py:
the Google endpoints mapped to a local TLS proxy in front of fake-gcs-server); it is skipped
only where ``unshare -n -m`` is not permitted (it needs root).
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import textwrap

import pytest
import tf_gcs
from helpers import ROOT, subprocess_env
from toy_model import toy_command

tf = pytest.importorskip("tensorflow")
_WHY = tf_gcs.unshare_available()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"{_WHY} (needs root)")


def _run(dump: pathlib.Path, cmd: list[str], cwd: pathlib.Path) -> str:
    proc = subprocess.run(
        tf_gcs.command(dump, cmd),
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return proc.stdout


def _scalars(folder: pathlib.Path, tag: str) -> dict[int, float]:
    """{step: value} of ``tag`` in the TensorBoard event files of ``folder``."""
    values = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(events)):
            for v in event.summary.value:
                if v.tag == tag:
                    values[event.step] = float(tf.make_ndarray(v.tensor))
    return values


def test_tensorboard_events_of_a_gcs_run(tmp_path):
    """The trainer (toy network) with TensorBoard on and a gs:// workdir: clu's writer puts the
    events into the bucket through TensorFlow's client; they hold the metrics.jsonl losses."""
    args = {"workdir": "{bucket}/run", "overrides": {"tensorboard": True, "total_steps": 3}}
    _run(tmp_path / "bucket", toy_command(args), tmp_path)
    run = tmp_path / "bucket" / "run"
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    logged = _scalars(run / "tb", "loss")
    assert logged == pytest.approx({r["step"]: r["loss"] for r in lines}, rel=1e-6)
    assert not (tmp_path / "gs:").exists()


READ_BACK = textwrap.dedent(
    """
    import sys
    import numpy as np
    from configs import fgtbt
    from input_pipeline import sources

    batches = []
    for data_dir in sys.argv[1:]:
        c = fgtbt.get_config("tiny")
        c.data.source, c.data.data_dir, c.data.datasets = "demo", data_dir, ("300W",)
        c.data.batch_per_dataset, c.data.demo_num_images = 2, 4
        data = sources.create(c)
        train = next(data.train_iterator(0))
        (stream,) = data.eval_streams(("300W",), batch_size=4)
        batches.append({"train": train, "eval": [b["image"] for b in stream]})
    gcs, local = batches
    for k in local["train"]:
        np.testing.assert_array_equal(gcs["train"][k], local["train"][k], err_msg=k)
    assert len(gcs["eval"]) == len(local["eval"]) > 0
    for a, b in zip(gcs["eval"], local["eval"], strict=True):
        np.testing.assert_array_equal(a, b)
    print("READ_BACK_OK", len(local["eval"]))
    """
)


def test_tfds_data_dir_on_gcs(tmp_path):
    """prepare_data.py writes the demo datasets to a gs:// data_dir; the trainer's and the
    evaluator's input pipeline (TFDS, tf.data) reads them back from the bucket, batch for batch
    equal to the same preparation on local disk."""
    prepare = [sys.executable, str(ROOT / "scripts" / "prepare_data.py"), "--dataset=demo"]
    prepare += ["--num_images=4", f"--manual_dir={tmp_path / 'raw'}", "--data_dir={bucket}/tfds"]
    read = [sys.executable, "-c", READ_BACK, "{bucket}/tfds", str(tmp_path / "local")]
    script = " && ".join(subprocess.list2cmdline(c) for c in (prepare, read))
    out = _run(tmp_path / "bucket", ["sh", "-c", script], ROOT)
    assert "READ_BACK_OK" in out, out
    records = sorted(p.name for p in (tmp_path / "bucket" / "tfds").rglob("*.tfrecord*"))
    print(records)
    assert not (ROOT / "gs:").exists() and not (tmp_path / "gs:").exists()
