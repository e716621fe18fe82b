"""Run paths (fgtbt_jax.paths): gs:// through a real GCS server (fake-gcs-server), hf:// from a
Hub cache built here (offline), and the one-line refusals of unsupported or local-only paths.

The scripts run as a user runs them (subprocesses); the reference tiny checkpoint stands in
for the released weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from helpers import assert_one_error_line, subprocess_env

from fgtbt_jax import paths
from fgtbt_jax.porting import pth

ROOT = pathlib.Path(__file__).parents[1]
REPO = "fgtbt-test/tiny"
OLD, NEW = "a" * 40, "b" * 40  # commits of the Hub repository


def _script(name: str, *args: str, cwd: pathlib.Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / name), *args],
        cwd=cwd,
        env=subprocess_env(**env),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _hub_cache(home: pathlib.Path, checkpoint: pathlib.Path) -> dict[str, str]:
    """``HF_HOME`` holding REPO in the Hub cache layout: commit OLD has the checkpoint alone,
    commit NEW (``main``) a second ``.pth`` beside it. Returns the offline environment."""
    repo = home / "hub" / ("models--" + REPO.replace("/", "--"))
    data = checkpoint.read_bytes()
    blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True)
    blob.write_bytes(data)
    for commit, names in ((OLD, ["tiny_checkpoint.pth"]), (NEW, ["tiny_checkpoint.pth", "b.pth"])):
        for name in names:
            link = repo / "snapshots" / commit / name
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(NEW)
    return {"HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}


def test_resolve_local_gs_and_refusals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert str(paths.resolve("run", "--workdir")) == str(tmp_path / "run")
    assert str(paths.resolve("gs://b/run", "--workdir")) == "gs://b/run"
    with pytest.raises(paths.PathError, match=r"^--workdir: unsupported URL scheme s3://"):
        paths.resolve("s3://b/run", "--workdir")
    with pytest.raises(paths.PathError, match="^--input: unsupported URL scheme hf://"):
        paths.resolve("hf://o/r", "--input")  # hf:// only where a checkpoint is read
    paths.check("hf://o/r", "--input", hub=True)
    with pytest.raises(paths.PathError, match=r"^--manual_dir: 'gs://b/raw' must be a local"):
        paths.local("gs://b/raw", "--manual_dir", "read locally")
    assert paths.parse_hub("hf://o/r") == ("o/r", None, None)
    assert paths.parse_hub("hf://o/r/dir/w.pth@v1") == ("o/r", "dir/w.pth", "v1")
    with pytest.raises(paths.PathError):
        paths.parse_hub("hf://o")


def test_unsupported_and_local_only_paths_fail_at_start(tmp_path):
    r = _script(
        "train.py",
        "--config=configs/fgtbt.py:tiny",
        "--workdir=s3://bucket/run",
        cwd=ROOT,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    assert (
        r.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --workdir: unsupported URL scheme s3://")
    ), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "compil" not in r.stdout
    r = _script("detect.py", "--checkpoint=x.pth", "--out=out", "gs://b/face.jpg", cwd=tmp_path)
    assert r.returncode == 1, r.stderr[-3000:]
    assert r.stderr.strip() == (
        "error: input: 'gs://b/face.jpg' must be a local path "
        "(images and videos are read from local disk)"
    )
    # A gs:// data_dir is staged on local disk (tests/train/test_train_gcs.py); other schemes
    # and a remote staging folder are refused at start.
    r = _script("prepare_data.py", "--dataset=demo", "--data_dir=s3://b/tfds", cwd=tmp_path)
    # (TensorFlow, imported first, may log its oneDNN notice above the error on some CPUs.)
    last = assert_one_error_line(r)
    assert last.startswith("error: --data_dir: unsupported URL scheme s3://"), r.stderr
    r = _script(
        "train.py",
        f"--config={ROOT}/configs/fgtbt.py:tiny",
        f"--workdir={tmp_path / 'run'}",
        "--config.data.data_dir=gs://b/tfds",
        "--config.data.stage_dir=gs://b/stage",
        cwd=tmp_path,
    )
    assert r.returncode == 1, r.stderr[-3000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last == (
        "error: config.data.stage_dir: 'gs://b/stage' must be a local path "
        "(the staged copy of data_dir)"
    ), r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "compil" not in r.stdout
    assert not (tmp_path / "gs:").exists() and not (tmp_path / "s3:").exists()


def test_hub_checkpoint_through_gcs_to_evaluation(gcs_server, gcs_bucket, tmp_path, ref_dir):
    checkpoint = ref_dir / "tiny_checkpoint.pth"
    env = {**gcs_server.env, **_hub_cache(tmp_path / "hf", checkpoint)}
    config = ["--config", f"{ROOT}/configs/fgtbt.py:reference_tiny"]
    out = f"{gcs_bucket}/converted"

    def convert(src: str, dst: str) -> subprocess.CompletedProcess:
        args = (*config, f"--input={src}", f"--output={dst}")
        return _script("convert_checkpoint.py", *args, cwd=tmp_path, **env)

    # main has two .pth files: an unnamed file is ambiguous, the error lists them.
    r = convert(f"hf://{REPO}", f"{out}/x.pth")
    assert r.returncode == 1, r.stderr[-3000:]
    assert "b.pth, tiny_checkpoint.pth" in r.stderr.strip().splitlines()[-1], r.stderr[-3000:]

    # Pinned to the older commit, the single .pth is taken; hf:// → gs:// orbax → gs:// .pth.
    r = convert(f"hf://{REPO}@{OLD}", f"{out}/orbax")
    assert r.returncode == 0, r.stderr[-3000:]
    r = convert(f"{out}/orbax", f"{out}/back.pth")
    assert r.returncode == 0, r.stderr[-3000:]
    original = pth.load_pth(checkpoint)["model"]["sd"]
    back = pth.load_pth(f"{out}/back.pth")["model"]["sd"]  # read from the bucket in-process
    assert back.keys() == original.keys()
    for k in original:
        np.testing.assert_array_equal(back[k], original[k], k)

    # evaluate.py reads the checkpoint from the bucket and writes its report there; its demo
    # data, prepared in the staging folder, is uploaded to the gs:// data_dir.
    r = _script(
        "evaluate.py",
        *config,
        f"--config.data.data_dir={gcs_bucket}/tfds",
        f"--config.data.stage_dir={tmp_path / 'stage'}",
        "--config.data.demo_num_images=4",
        f"--checkpoint={out}/back.pth",
        f"--out={gcs_bucket}/eval",
        "--batch_size=4",
        "--max_batches=1",
        "--datasets=300W",
        "--protocol=reference",
        cwd=tmp_path,
        **env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    objects = gcs_server.objects(f"{gcs_bucket}/eval")
    assert {"eval/report.json", "eval/report.md", "eval/ced.png"} <= set(objects), objects
    report = json.loads(gcs_server.read(f"{gcs_bucket}/eval/report.json"))
    assert np.isfinite(report["metrics"]["reference"]["300W"]["full"]["nme_inter_ocular"])
    assert gcs_server.read(f"{gcs_bucket}/eval/ced.png")[:8] == b"\x89PNG\r\n\x1a\n"
    uploaded = gcs_server.objects(f"{gcs_bucket}/tfds")
    assert {n.split("/")[1] for n in uploaded} == {"wflw", "face300w", "cofw", "aflw"}, uploaded
    assert "tfds/face300w/demo/1.0.0/dataset_info.json" in uploaded
    assert (tmp_path / "stage/face300w/demo/1.0.0/dataset_info.json").is_file()
    assert not (tmp_path / "gs:").exists() and not (tmp_path / "hf:").exists()


def test_export_and_aot_artifacts_to_gcs(gcs_server, gcs_bucket, tmp_path):
    """export.py's artifact and rows, aot_compile.py's --json and --export_dir, all on gs://."""
    from jax import export

    out = f"{gcs_bucket}/export"
    tiny = f"--config={ROOT}/configs/fgtbt.py:tiny"
    r = _script(
        "export.py",
        tiny,
        "--random_init",
        "--format=stablehlo",
        "--batch=1",
        f"--out={out}/tiny.shlo",
        "--verify",  # deserializes the artifact read back from the bucket
        f"--verify_json={out}/verify.json",
        cwd=tmp_path,
        **gcs_server.env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert gcs_server.objects(out) == [
        "export/tiny.shlo",
        "export/tiny.shlo.json",
        "export/verify.json",
    ]
    exported = export.deserialize(bytearray(gcs_server.read(f"{out}/tiny.shlo")))
    assert exported.in_avals[0].shape == (1, 96, 96, 3)
    assert json.loads(gcs_server.read(f"{out}/tiny.shlo.json"))["fgtbt.batch"] == "1"
    rows = json.loads(gcs_server.read(f"{out}/verify.json"))["rows"]
    assert rows and all(row["relative"] < 1e-5 for row in rows), rows

    # aot_compile.py keeps the rows of an earlier run found in --json (read from the bucket).
    earlier = {"target": "tpu:v5e-8", "step": "train", "status": "compiled"}
    paths.write_text(f"{out}/aot.json", json.dumps([earlier]))
    r = _script(
        "aot_compile.py",
        tiny,
        "--target=gpu:h100-1",
        "--step=eval",
        "--batch_per_device=4",  # a multiple of the 4 datasets on one GPU
        f"--export_dir={out}/aot",
        f"--json={out}/aot.json",
        cwd=tmp_path,
        **gcs_server.env,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = json.loads(gcs_server.read(f"{out}/aot.json"))
    assert rows[0] == earlier and rows[1]["status"] == "exported (not compiled)", rows
    assert rows[1]["export_path"].startswith(f"{out}/aot/gpu_h100-1/eval_"), rows[1]
    exported = export.deserialize(bytearray(gcs_server.read(rows[1]["export_path"])))
    assert exported.platforms == ("cuda",)
    assert not (tmp_path / "gs:").exists()
