"""The trainer's metric writing: JSON lines, TensorBoard through clu, and the fallback."""

from __future__ import annotations

import json
import logging
import sys

import pytest

from fgtbt_jax.train import writers


def _rows(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_json_lines_tensorboard_and_resume_truncation(tmp_path):
    pytest.importorskip("clu")
    pytest.importorskip("tensorboard")
    w = writers.MetricWriter(tmp_path, start_step=0)
    for step in (1, 2, 3):
        w.write_train(step, {"loss": 1.0 / step, "loss_300W": 2.0 / step})
    w.write_eval(3, {"nme_300W": 0.05})
    w.close()
    assert [r["step"] for r in _rows(tmp_path / "metrics.jsonl")] == [1, 2, 3]
    assert _rows(tmp_path / "eval.jsonl") == [{"step": 3, "nme_300W": 0.05}]
    events = b"".join(p.read_bytes() for p in (tmp_path / "tb").glob("events.out.tfevents.*"))
    assert b"loss_300W" in events and b"eval/nme_300W" in events

    # A run resumed from step 2 drops what the interrupted run logged after it.
    w = writers.MetricWriter(tmp_path, start_step=2)
    w.write_train(3, {"loss": 0.25})
    w.close()
    rows = _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["loss"] == 0.25
    assert _rows(tmp_path / "eval.jsonl") == []


def test_without_clu_json_lines_and_a_warning(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "clu", None)  # import clu → ImportError
    with caplog.at_level(logging.WARNING):
        w = writers.MetricWriter(tmp_path, start_step=0)
    assert w.writer is None
    assert sum("clu/tensorboard not available" in r.message for r in caplog.records) == 1
    w.write_train(1, {"loss": 0.5})
    w.close()
    assert _rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]
    assert not (tmp_path / "tb").exists()
