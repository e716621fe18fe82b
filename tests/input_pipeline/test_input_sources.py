"""The one data entry point (input_pipeline.sources): source choice, preparation, batches."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

from configs import fgtbt
from input_pipeline import sources, synthetic

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _config(source: str, data_dir: pathlib.Path | None = None):
    c = fgtbt.get_config("tiny")
    c.img_size, c.heatmap_size = 32, 16
    c.data.source = source
    c.data.batch_per_dataset = 2
    c.data.demo_num_images = 6
    c.data.synthetic_eval_images = 3
    if data_dir is not None:
        c.data.data_dir = str(data_dir)
    return c


def _same(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_config_data_source_is_read_in_one_module():
    readers = []
    for folder in ("fgtbt_jax", "input_pipeline", "scripts", "configs"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr == "source"
                    and isinstance(node.ctx, ast.Load)
                    and isinstance(node.value, ast.Attribute)
                    and node.value.attr == "data"
                ):
                    readers.append(str(path.relative_to(ROOT)))
    assert sorted(set(readers)) == ["input_pipeline/sources.py"]


def test_unknown_source_is_refused():
    with pytest.raises(ValueError, match=r"config\.data\.source .*'tfrecords'"):
        sources.create(_config("tfrecords"))


def test_synthetic_source_serves_the_generator_batches():
    c = _config("synthetic")
    c.seed = 5
    data = sources.create(c)
    assert data.name == "synthetic" and data.global_batch == 8
    it = data.train_iterator(start_step=3)
    _same(next(it), synthetic.global_batch(c, 5, 3))
    _same(next(it), synthetic.global_batch(c, 5, 4))
    halves = [
        next(sources.create(c, process_index=p, process_count=2).train_iterator(3))
        for p in range(2)
    ]
    assert len(halves[0]["image"]) == len(halves[1]["image"]) == 4
    rows = np.concatenate([synthetic.process_rows(c, p, 2) for p in range(2)])
    for k, v in synthetic.global_batch(c, 5, 3).items():
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), v[rows])


def test_synthetic_evaluation_sets():
    c = _config("synthetic")
    data = sources.create(c)
    assert data.eval_subsets("WFLW") == ("full",)
    (stream,) = data.eval_streams(("WFLW", "300W"), batch_size=4)
    batches = list(stream)  # one stream: 3 + 3 faces in batches of 4 that mix the datasets
    assert [list(b["dataset_id"]) for b in batches] == [[1, 1, 1, 2], [2, 2]]
    assert [list(b["index"]) for b in batches] == [[0, 1, 2, 3], [4, 5]]
    wflw = list(data.eval_iterator("WFLW", "full", 2))
    assert [list(b["image_id"]) for b in wflw] == [
        ["synthetic_WFLW_0", "synthetic_WFLW_1"],
        ["synthetic_WFLW_2"],
    ]
    np.testing.assert_array_equal(wflw[0]["image"][:1], batches[0]["image"][:1])
    second = list(sources.create(c, process_index=1, process_count=2).eval_iterator("WFLW"))
    assert second == []  # one batch of 3: process 0's
    with pytest.raises(ValueError, match="only the subset 'full'"):
        data.eval_iterator("WFLW", "common")


def test_demo_source_prepares_and_reads_the_tfds_pipeline(tmp_path):
    pytest.importorskip("tensorflow")
    from input_pipeline import pipeline

    c = _config("demo", tmp_path / "tfds")
    c.data.datasets = ("300W",)
    with pytest.raises(FileNotFoundError, match="prepare_data.py --dataset demo"):
        pipeline.make_eval_iterator(c, "300W", variant="demo")
    data = sources.create(c)  # generates and prepares the demo set
    assert data.name == "demo" and data.global_batch == 2
    assert data.eval_subsets("300W") == ("full", "common", "challenging")
    want = pipeline.make_train_iterator(c, variant="demo", seed=0, start_step=2)
    _same(next(data.train_iterator(2)), next(want))
    got = list(data.eval_iterator("300W", "common", 4))
    want = list(pipeline.make_eval_iterator(c, "300W", "common", 4, variant="demo"))
    assert len(got) == len(want) > 0
    for a, b in zip(got, want, strict=True):
        _same(a, b)
    (stream,) = data.eval_streams(("300W",), batch_size=4)
    assert sum(int(b["valid"].sum()) for b in stream) == pipeline.eval_size(
        c, "300W", variant="demo"
    )


def test_official_source_without_files_names_the_preparation(tmp_path):
    pytest.importorskip("tensorflow")
    c = _config("official", tmp_path / "tfds")
    c.data.datasets = ("AFLW",)
    data = sources.create(c)  # no manual_dir: nothing to prepare
    with pytest.raises(FileNotFoundError, match="prepare_data.py --dataset aflw --manual_dir"):
        data.train_iterator()
