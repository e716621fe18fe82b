"""One process of tests/evaluation/test_evaluate_multiprocess.py: the trainer's ``Evaluator``
with the weights as arrays spanning every process's devices, then ``scripts/evaluate.py``.

``python evaluate_worker.py '{"data_dir": ..., "checkpoint": ..., "out": ...}'`` (cwd =
repository root; joins the ``jax.distributed`` job described by JAX_COORDINATOR_ADDRESS etc.).
"""

import json
import runpy
import sys

import jax
import numpy as np

import fgtbt_jax
from configs import fgtbt
from fgtbt_jax.evaluation.evaluator import Evaluator
from fgtbt_jax.train import sharding

sharding.maybe_initialize_distributed()  # before any backend starts

args = json.loads(sys.argv[1])
config = fgtbt.get_config("reference_tiny")
config.data.data_dir = args["data_dir"]
config.data.demo_num_images = 4
config.eval_batch_size = 4
_, variables = fgtbt_jax.load_pretrained(args["checkpoint"], config)
mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
variables = jax.tree.map(
    lambda x: jax.make_array_from_callback(np.shape(x), replicated, lambda i: np.asarray(x)[i]),
    variables,
)
print("EVALUATOR " + json.dumps(Evaluator(config)(variables, ("300W",))), flush=True)
sys.argv = [
    "evaluate.py",
    "--config",
    "configs/fgtbt.py:reference_tiny",
    f"--config.data.data_dir={args['data_dir']}",
    "--config.data.demo_num_images=4",
    "--checkpoint",
    args["checkpoint"],
    "--out",
    args["out"],
    "--batch_size",
    "4",
    "--datasets",
    "300W",
]
runpy.run_path("scripts/evaluate.py", run_name="__main__")
