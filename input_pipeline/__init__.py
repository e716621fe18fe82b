"""Data side of fgtbt-jax (SPEC §4).

* :mod:`input_pipeline.sources`  — the one entry point: ``create(config)`` picks
  ``config.data.source`` (synthetic | demo | official), prepares it and serves the training
  iterator and the evaluation sets.
* :mod:`input_pipeline.synthetic` — in-memory synthetic batches (no files, no TensorFlow).
* :mod:`input_pipeline.formats`  — readers/writers of the official annotation files.
* :mod:`input_pipeline.demo`     — synthetic faces with known landmarks (the bundled dataset),
  drawn by :mod:`input_pipeline.demo_faces`.
* :mod:`input_pipeline.builders` — TFDS builders (manual download) for COFW, WFLW, 300W, AFLW
  and folders of iBUG ``.pts`` faces.
* :mod:`input_pipeline.pipeline` — tf.data training / evaluation iterators.

Submodules are imported explicitly (TensorFlow is only needed by ``builders``/``pipeline``).
"""
