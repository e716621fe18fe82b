"""scripts/evaluate.py end to end on the bundled synthetic data: JSON, markdown and CED plot."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
from helpers import subprocess_env

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_evaluate_script_on_demo_data(tmp_path, ref_dir):
    out = tmp_path / "eval"
    cmd = [
        sys.executable,
        "scripts/evaluate.py",
        "--config",
        "configs/fgtbt.py:reference_tiny",
        f"--config.data.data_dir={tmp_path / 'tfds'}",
        "--config.data.demo_num_images=4",
        "--checkpoint",
        str(ref_dir / "tiny_checkpoint.pth"),
        "--out",
        str(out),
        "--batch_size",
        "4",
        "--max_batches",
        "1",
        "--datasets",
        "300W,WFLW",
    ]
    r = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=900
    )
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    for protocol in ("reference", "standard"):
        for ds, subsets in (("300W", ("full", "common", "challenging")), ("WFLW", ("full",))):
            for subset in subsets:
                m = report["metrics"][protocol][ds][subset]
                assert m["protocol"] == protocol
                assert m["count"] > 0
                for key in ("nme_inter_ocular", "nme_inter_pupil", "fr_0.1", "auc_0.1"):
                    assert np.isfinite(m[key]), (protocol, ds, subset, key)
                assert 0.0 <= m["auc_0.1"] <= 1.0 and 0.0 <= m["fr_0.1"] <= 1.0
    md = (out / "report.md").read_text()
    assert "reference" in md and "standard" in md and "300W" in md
    png = (out / "ced.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
