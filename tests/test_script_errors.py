"""The scripts report the user's mistakes (unsafe or mismatched checkpoint, bad dataset file, bad
config value) as one ``error: …`` line and exit status 1, with no traceback."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
from helpers import ROOT, assert_one_error_line, run_script

TINY = f"{ROOT / 'configs' / 'fgtbt.py'}:reference_tiny"


class _Payload:
    """Unpickling calls ``os.system`` (what an unsafe loader would run)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil(tmp_path):
    """``(evil.pth, marker)``: a torch.save-layout zip whose pickle runs ``touch marker``."""
    path, marker = tmp_path / "evil.pth", tmp_path / "pwned"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"model": _Payload(marker)}, protocol=2))
    return path, marker


@pytest.mark.parametrize(
    "script,args",
    [
        ("convert_checkpoint.py", ["--config", TINY, "--input", "{evil}", "--output", "{out}"]),
        ("evaluate.py", ["--config", TINY, "--config.data.source=official"]
         + ["--checkpoint", "{evil}", "--out", "{out}"]),
        ("detect.py", ["--config", TINY, "--checkpoint", "{evil}", "--out", "{out}"]
         + ["--boxes", "{boxes}", "{image}"]),
        ("export.py", ["--config", TINY, "--checkpoint", "{evil}", "--format", "stablehlo"]
         + ["--out", "{out}"]),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)  # fmt: skip
def test_unsafe_pickle_is_one_error_line(script, args, evil, tmp_path):
    path, marker = evil
    boxes = tmp_path / "boxes.json"
    boxes.write_text('{"takeo.ppm": [[10, 10, 100, 100]]}')
    image = ROOT / "tests" / "fixtures" / "real_faces" / "takeo.ppm"
    fill = dict(evil=path, out=tmp_path / "out", boxes=boxes, image=image)
    res = run_script(f"scripts/{script}", *(a.format(**fill) for a in args))
    assert_one_error_line(res, "refusing to load global", "os")
    assert not marker.exists()


def test_checkpoint_mismatch_is_one_error_line(ref_dir, tmp_path):
    res = run_script(
        "scripts/convert_checkpoint.py",
        "--config", TINY, "--config.model.decoder_dim=32",
        "--input", str(ref_dir / "tiny_checkpoint.pth"), "--output", str(tmp_path / "out"),
    )  # fmt: skip
    last = assert_one_error_line(res, "shape encoder.decode_head")
    assert "does not match the architecture of the config (details above)" in last


def test_bad_config_value_is_one_error_line(tmp_path):
    res = run_script(
        "scripts/train.py", "--config", f"{ROOT / 'configs' / 'fgtbt.py'}:tiny",
        "--config.data.source=synthetic", "--config.total_steps=3",
        "--config.optim.grad_accum_steps=2", "--workdir", str(tmp_path),
    )  # fmt: skip
    assert_one_error_line(res, "must be a multiple of optim.grad_accum_steps=2")


def test_bad_dataset_file_is_one_error_line(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    manual = tmp_path / "wflw"
    manual.mkdir()
    (manual / "face_landmarks_wflw_train.csv").write_text("image_name,scale\nx.png,1\n")
    res = run_script(
        "scripts/prepare_data.py", "--dataset", "wflw",
        "--manual_dir", str(manual), "--data_dir", str(tmp_path / "tfds"),
    )  # fmt: skip
    assert_one_error_line(res, "face_landmarks_wflw_train.csv, row 1: header has 2 columns")


def test_num_landmarks_disagreeing_with_the_schemes_is_one_error_line(tmp_path):
    scheme = ROOT / "fgtbt_jax" / "data" / "schemes" / "demo_my19.json"
    res = run_script(
        "scripts/train.py", "--config", f"{ROOT / 'configs' / 'fgtbt.py'}:tiny",
        "--config.data.source=synthetic", f"--config.data.schemes=('{scheme}',)",
        "--config.data.datasets=('MY19',)", "--config.model.num_landmarks=130",
        "--workdir", str(tmp_path),
    )  # fmt: skip
    assert_one_error_line(
        res, "--config.model.num_landmarks=130 disagrees with the 133 channels",
        "--config.data.schemes=",
    )  # fmt: skip
