"""scripts/lowered_programs.py: the hashes it prints are those of the programs it writes, and
they tell the two ``model.kernels`` paths apart."""

from __future__ import annotations

import hashlib
import pathlib
import re

from helpers import run_script


def _hashes(out_dir: pathlib.Path, kernels: str) -> dict[str, str]:
    r = run_script(
        "scripts/lowered_programs.py",
        "--config=configs/fgtbt.py:reference_tiny",
        "--config.img_size=32",
        "--config.heatmap_size=16",
        f"--config.model.kernels={kernels}",
        f"--out_dir={out_dir}",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    found = dict(re.findall(r"^(\w+): sha256 ([0-9a-f]{64}) ", r.stdout, re.M))
    assert set(found) == {"train", "eval", "eval_flip"}, r.stdout
    for name, digest in found.items():
        assert hashlib.sha256((out_dir / f"{name}.mlir").read_bytes()).hexdigest() == digest
    return found


def test_hashes_name_the_written_programs_and_differ_between_kernels(tmp_path):
    cpu, xla = _hashes(tmp_path / "cpu", "cpu"), _hashes(tmp_path / "xla", "xla")
    assert all(cpu[name] != xla[name] for name in cpu)
    assert "stablehlo.convolution" in (tmp_path / "xla" / "train.mlir").read_text()
