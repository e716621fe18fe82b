"""The traffic model (fgtbt_jax/traffic.py) on hand-written HLO, a CPU program and single-op
programs compiled for TPU v5e, whose HBM traffic is worked out by hand from their shapes.

The TPU programs compile in a child process (tests/traffic_single_ops.py; seconds) and are
skipped where libtpu is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from helpers import ROOT, needs_cuda_plugin, run_script, subprocess_env

from fgtbt_jax import attribution, traffic
from fgtbt_jax import compiled as compiled_figures
from fgtbt_jax.train import aot

MiB = 2**20


def test_tiled_sizes():
    # W=120 is the minor dim (layout 2,3,1,0), padded to 128 lanes; C=64 fills 8-row tiles.
    (a,) = traffic.parse_arrays("bf16[4,120,120,64]{2,3,1,0:T(8,128)(2,1)}")
    assert a.logical_bytes == 4 * 120 * 120 * 64 * 2
    assert (a.tiled_bytes, a.memory_space) == (4 * 120 * 64 * 128 * 2, traffic.HBM)
    (b,) = traffic.parse_arrays("bf16[3,3,1,128]{3,1,2,0:T(4,128)(2,1)S(1)}")
    assert (b.tiled_bytes, b.memory_space) == (3 * 4 * 128 * 2, 1)  # the 1 padded to 4 rows
    (s,) = traffic.parse_arrays("bf16[]{:T(256)}")
    assert s.tiled_bytes == 256 * 2
    (p,) = traffic.parse_arrays("pred[32,17]{0,1:T(8,128)(4,1)}")
    assert p.tiled_bytes == 24 * 128  # physical [17, 32] → [24, 128] bytes
    (c,) = traffic.parse_arrays("f32[100,300]{1,0}")  # CPU: no tiles, no memory space
    assert (c.tiled_bytes, c.memory_space) == (120_000, traffic.HBM)
    t = traffic.parse_arrays("(f32[8,128]{1,0:T(8,128)S(1)}, f32[2]{0:T(256)}, u32[]{:S(2)})")
    assert [x.tiled_bytes for x in t] == [4096, 1024, 4]


HLO = """\
HloModule m, is_scheduled=true

%fused_exp (p0: bf16[3,100]) -> f32[3,100] {
  %p0 = bf16[3,100]{1,0:T(8,128)(2,1)S(1)} parameter(0)
  %c = f32[3,100]{1,0:T(8,128)} convert(%p0)
  ROOT %e = f32[3,100]{1,0:T(8,128)} exponential(%c)
}

%fused_dot (q0: f32[3,100], q1: f32[100,256]) -> f32[3,256] {
  %q0 = f32[3,100]{1,0:T(8,128)} parameter(0)
  %q1 = f32[100,256]{1,0:T(8,128)} parameter(1)
  ROOT %d = f32[3,256]{1,0:T(8,128)} dot(%q0, %q1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%body (w: f32[3,256]) -> f32[3,256] {
  %w = f32[3,256]{1,0:T(8,128)} parameter(0)
  ROOT %n = f32[3,256]{1,0:T(8,128)} negate(%w)
}

%cond (v: f32[3,256]) -> pred[] {
  %v = f32[3,256]{1,0:T(8,128)} parameter(0)
  ROOT %k = pred[]{:T(512)} constant(true)
}

ENTRY %main (a: bf16[3,100], m: f32[100,256]) -> f32[3,256] {
  %a = bf16[3,100]{1,0:T(8,128)(2,1)} parameter(0), metadata={op_name="a"}
  %m = f32[100,256]{1,0:T(8,128)} parameter(1)
  %cs = (bf16[3,100]{1,0:T(8,128)(2,1)S(1)}, bf16[3,100]{1,0:T(8,128)(2,1)}, u32[]{:S(2)}) copy-start(%a)
  %cd = bf16[3,100]{1,0:T(8,128)(2,1)S(1)} copy-done(%cs)
  %x = f32[3,100]{1,0:T(8,128)} fusion(%cd), kind=kLoop, calls=%fused_exp, metadata={op_name="jit(f)/transpose(jvp(M))/stage/exp"}
  %b = f32[3,100]{1,0:T(8,128)} bitcast(%x)
  %y = f32[3,256]{1,0:T(8,128)} fusion(%b, %m), kind=kOutput, calls=%fused_dot
  ROOT %l = f32[3,256]{1,0:T(8,128)} while(%y), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
}
"""  # noqa: E501


def test_counting_rules_on_hand_written_hlo():
    model = traffic.of_hlo(HLO)
    rows = {r.name: r for r in model.rows}
    # Views (parameter, bitcast) move nothing; the while body runs 3 times; its condition's
    # constant moves nothing.
    assert set(rows) == {"cs", "cd", "x", "y", "n"}
    small, wide = 8 * 128 * 2, 8 * 128 * 4  # bf16[3,100] and f32[3,100]: one (8,128) tile
    matrix, out = 104 * 256 * 4, 8 * 256 * 4  # f32[100,256] (rows to 104), f32[3,256]
    assert (rows["cs"].read, rows["cs"].written) == ({0: small}, {})  # -start reads
    assert (rows["cd"].read, rows["cd"].written) == ({}, {1: small})  # -done writes
    assert (rows["x"].read, rows["x"].written) == ({1: small}, {0: wide})
    assert rows["x"].op_name == "jit(f)/transpose(jvp(M))/stage/exp"
    assert rows["y"].hbm_bytes == wide + matrix + out
    assert rows["y"].flops == 2 * 3 * 256 * 100
    assert (rows["n"].count, rows["n"].hbm_bytes) == (3, 3 * 2 * out)
    assert model.hbm_bytes == small + wide + (wide + matrix + out) + 3 * 2 * out
    assert model.on_chip_bytes == 2 * small
    assert model.boundary_bytes == model.hbm_bytes + model.on_chip_bytes
    assert model.matmul_flops == 2 * 3 * 256 * 100


SLICES = """\
HloModule s, is_scheduled=true

%fused_add (p0: f32[8,256], p1: f32[8,256]) -> f32[8,256] {
  %p0 = f32[8,256]{1,0:T(8,128)S(1)} parameter(0)
  %p1 = f32[8,256]{1,0:T(8,128)} parameter(1)
  ROOT %a = f32[8,256]{1,0:T(8,128)} add(%p0, %p1)
}

%wrapped_slice (q0: f32[64,256]) -> f32[8,256] {
  %q0 = f32[64,256]{1,0:T(8,128)} parameter(0)
  ROOT %piece = f32[8,256]{1,0:T(8,128)} slice(%q0), slice={[16:24], [0:256]}
}

%sliced_and_whole (r0: f32[64,256]) -> (f32[8,256], f32[64,256]) {
  %r0 = f32[64,256]{1,0:T(8,128)} parameter(0)
  %part = f32[8,256]{1,0:T(8,128)} slice(%r0), slice={[16:24], [0:256]}
  %all = f32[64,256]{1,0:T(8,128)} negate(%r0)
  ROOT %both = (f32[8,256]{1,0:T(8,128)}, f32[64,256]{1,0:T(8,128)}) tuple(%part, %all)
}

ENTRY %main (big: f32[64,256]) -> f32[8,256] {
  %big = f32[64,256]{1,0:T(8,128)} parameter(0)
  %ws = f32[8,256]{1,0:T(8,128)} fusion(%big), kind=kLoop, calls=%wrapped_slice
  %sw = (f32[8,256]{1,0:T(8,128)}, f32[64,256]{1,0:T(8,128)}) fusion(%big), kind=kLoop, calls=%sliced_and_whole
  %ss = ((f32[64,256]{1,0:T(8,128)}), f32[8,256]{1,0:T(8,128)S(1)}, s32[]{:S(2)}) slice-start(%big), slice={[8:16], [0:256]}
  %sd = f32[8,256]{1,0:T(8,128)S(1)} slice-done(%ss)
  %s = f32[8,256]{1,0:T(8,128)} slice(%big), slice={[0:8], [0:256]}
  ROOT %z = f32[8,256]{1,0:T(8,128)} fusion(%sd, %s), kind=kLoop, calls=%fused_add, metadata={op_name="jit(f)/jvp(M)/decode_head/add"}
}
"""  # noqa: E501


def test_slices_read_the_slice_and_inherit_metadata():
    """A top-level slice (and an async ``slice-start``, and a fusion that only slices an
    operand) reads only its slice, not the whole operand; instructions without metadata are
    named after the instruction using them."""
    rows = {r.name: r for r in traffic.of_hlo(SLICES).rows}
    piece = 8 * 256 * 4  # f32[8,256]: one row of (8,128) tiles; the operand is 8× that
    assert (rows["ss"].read, rows["ss"].written) == ({0: piece}, {})
    assert (rows["sd"].read, rows["sd"].written) == ({}, {1: piece})
    assert (rows["s"].read, rows["s"].written) == ({0: piece}, {0: piece})
    for name in ("ss", "sd", "s"):
        assert rows[name].op_name == "jit(f)/jvp(M)/decode_head/add", name
    # A fusion whose parameter is only sliced reads the slice; used whole too, the operand.
    assert (rows["ws"].read, rows["ws"].written) == ({0: piece}, {0: piece})
    assert rows["sw"].read == {0: 8 * piece}


GPU_LIBRARY_CALLS = """\
HloModule g, is_scheduled=true

ENTRY %main (x: bf16[4,32,32,32], w: bf16[64,3,3,32], a: bf16[64,128], b: bf16[128,256]) -> (bf16[64,256], bf16[4,32,32,64], bf16[4,32,32,32], bf16[64,3,3,32]) {
  %x = bf16[4,32,32,32]{3,2,1,0} parameter(0)
  %w = bf16[64,3,3,32]{3,2,1,0} parameter(1)
  %a = bf16[64,128]{1,0} parameter(2)
  %b = bf16[128,256]{1,0} parameter(3)
  %gemm = (bf16[64,256]{1,0}, s8[4194304]{0}) custom-call(%a, %b), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(f)/dot_general"}, backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %ab = bf16[64,256]{1,0} get-tuple-element(%gemm), index=0
  %fwd = (bf16[4,32,32,64]{3,2,1,0}, u8[0]{0}) custom-call(%x, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convForward", metadata={op_name="jit(f)/jvp()/conv_general_dilated"}
  %y = bf16[4,32,32,64]{3,2,1,0} get-tuple-element(%fwd), index=0
  %bwi = (bf16[4,32,32,32]{3,2,1,0}, u8[0]{0}) custom-call(%y, %w), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardInput", metadata={op_name="jit(f)/transpose(jvp())/conv_general_dilated"}
  %dx = bf16[4,32,32,32]{3,2,1,0} get-tuple-element(%bwi), index=0
  %bwf = (bf16[64,3,3,32]{3,2,1,0}, u8[0]{0}) custom-call(%x, %y), window={size=3x3 pad=1_1x1_1}, dim_labels=b01f_o01i->b01f, custom_call_target="__cudnn$convBackwardFilter", metadata={op_name="jit(f)/transpose(jvp())/conv_general_dilated"}
  %dw = bf16[64,3,3,32]{3,2,1,0} get-tuple-element(%bwf), index=0
  ROOT %t = (bf16[64,256]{1,0}, bf16[4,32,32,64]{3,2,1,0}, bf16[4,32,32,32]{3,2,1,0}, bf16[64,3,3,32]{3,2,1,0}) tuple(%ab, %y, %dx, %dw)
}
"""  # noqa: E501 (lines as XLA:GPU prints them for an H100, trimmed)


def test_gpu_library_calls_count_as_the_ops_they_replace():
    """cuBLAS GEMMs and cuDNN convolutions (forward, backward input, backward filter) count
    the FLOPs of the matmul / forward convolution they compute, and their operands and
    result without cuBLAS's int8 workspace."""
    rows = {r.name: r for r in traffic.of_hlo(GPU_LIBRARY_CALLS).rows}
    assert set(rows) == {"gemm", "fwd", "bwi", "bwf"}
    x, y, w = 4 * 32 * 32 * 32 * 2, 4 * 32 * 32 * 64 * 2, 64 * 9 * 32 * 2
    # 2 · batch · C_out · (output, tap) pairs on data · C_in: a 3-wide window over 32
    # positions with SAME padding meets data 32·3 − 2 = 94 times per dimension.
    conv = 2 * 4 * 64 * 94 * 94 * 32
    assert rows["gemm"].flops == 2 * 64 * 256 * 128
    assert rows["gemm"].hbm_bytes == (64 * 128 + 128 * 256 + 64 * 256) * 2  # no workspace
    assert [rows[n].flops for n in ("fwd", "bwi", "bwf")] == [conv] * 3
    assert [rows[n].hbm_bytes for n in ("fwd", "bwi", "bwf")] == [x + w + y, y + w + x, x + y + w]


@needs_cuda_plugin
def test_gpu_program_matmul_flops():
    """A deviceless XLA:GPU compile (H100) of a convolution, a depthwise one and a GEMM with
    their gradients: the model's matmul FLOPs are the textbook count of every product."""
    from jax.sharding import SingleDeviceSharding

    target = aot.parse_target("gpu:h100-1")
    where = SingleDeviceSharding(aot.gpu_devices(target)[0])

    def loss(x, w, dw, a):
        dn = ("NHWC", "HWIO", "NHWC")
        y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=dn)
        z = jax.lax.conv_general_dilated(
            y, dw, (1, 1), "SAME", dimension_numbers=dn, feature_group_count=64
        )
        return (z.sum(axis=(1, 2)) @ a).sum()

    shapes = [(4, 32, 32, 32), (3, 3, 32, 64), (3, 3, 1, 64), (64, 128)]
    args = tuple(jax.ShapeDtypeStruct(s, jnp.bfloat16, sharding=where) for s in shapes)
    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    _, compiled, _ = aot.compile_step(step, args, target)
    model = compiled_figures.traffic(compiled)
    # Taps on the SAME padding do no work: 32·3 − 2 = 94 (output, tap) pairs per dimension.
    conv, depthwise = 2 * 4 * 64 * 94 * 94 * 32, 2 * 4 * 64 * 94 * 94
    # Forward and both gradients of each convolution (x is differentiated too); the GEMM's
    # two gradients (its forward value is not needed) on 4 rows, which XLA:GPU pads to 8.
    gemm = 2 * 2 * 8 * 64 * 128
    assert model.matmul_flops == 3 * conv + 3 * depthwise + gemm


def test_cpu_program():
    # CPU layouts carry no tiles or memory spaces: one loop fusion reads x and writes the result.
    x = jax.ShapeDtypeStruct((100, 300), jnp.float32)
    compiled = jax.jit(lambda v: jnp.tanh(v) * 2).lower(x).compile()
    model = compiled_figures.traffic(compiled)
    assert (model.hbm_bytes, model.on_chip_bytes) == (2 * 100 * 300 * 4, 0)


@pytest.fixture(scope="module")
def tpu_programs() -> dict:
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (pip install -e '.[tpu]')")
    # Another process on the machine may hold libtpu's lock file; these compiles need no chip.
    env = subprocess_env(xla_flags="", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    proc = subprocess.run(
        [sys.executable, "tests/traffic_single_ops.py"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tpu_elementwise_and_transpose(tpu_programs):
    # Input and output once each, all in HBM; XLA's "bytes accessed" agrees.
    full = 4 * 128 * 128 * 128 * 2
    assert tpu_programs["elementwise"]["hbm_bytes"] == 2 * full
    padded = 4 * 120 * 64 * 128 * 2  # W=120 is the minor dim: padded to 128 lanes
    assert tpu_programs["elementwise_padded"]["hbm_bytes"] == 2 * padded
    assert tpu_programs["transpose"]["hbm_bytes"] == 2 * 1024 * 2048 * 2
    for name in ("elementwise", "elementwise_padded", "transpose"):
        p = tpu_programs[name]
        assert p["on_chip_bytes"] == 0 and p["xla_bytes_accessed"] == p["hbm_bytes"]


def test_tpu_matmul(tpu_programs):
    p = tpu_programs["matmul"]
    a, b, c = 1024 * 512 * 2, 512 * 768 * 2, 1024 * 768 * 2
    assert p["hbm_bytes"] == a + b + c
    assert p["on_chip_bytes"] == 2 * a  # a is prefetched into VMEM, then read there
    assert p["matmul_flops"] == 2 * 1024 * 512 * 768


@pytest.mark.parametrize("name, weight", [("conv", 3 * 3 * 128 * 256), ("depthwise", 3 * 4 * 256)])
def test_tpu_convolutions(tpu_programs, name, weight):
    # x and y (4,128,128,128) bf16 cross HBM once; everything in between stays in VMEM. XLA:TPU
    # prefetches the weight twice and reads two constants: a bf16 pad value (one 256-element
    # tile, 512 B) and a pred[32,17] mask (24×128 B). The depthwise weight (3,3,1,128) is laid
    # out with its 1-dim padded to 4 rows (T(4,128)): 3·4·128·2 B.
    p = tpu_programs[name]
    x = 4 * 128 * 128 * 128 * 2
    assert p["hbm_bytes"] == 2 * x + 2 * weight + 512 + 24 * 128
    # XLA's count takes the on-chip buffers for HBM traffic: over 7× the real figure.
    assert p["xla_bytes_accessed"] > 7 * p["hbm_bytes"]
    # XLA:TPU convolves column blocks with their halo: input (128, 4·8, 19, 128) = rows,
    # images × blocks of 16 columns, 16 + 3 columns, channels; output (128, 32, 17, 128).
    # Taps on the rows' padding do no work (128·3 − 2 (row, tap) pairs); the halo columns are
    # data (17·3 pairs): 2 · 32 · 128 features · 382 · 51 · input features per group.
    per_group = 128 if name == "conv" else 1
    assert p["matmul_flops"] == 2 * 32 * 128 * (128 * 3 - 2) * (17 * 3) * per_group


def test_tpu_batched_matmul_as_convolution(tpu_programs):
    # xla.space_to_depth: einsum bhwc,hir->bircw then bircw,wjq->bijrqc, one contraction of
    # length 96 per output element each. XLA:TPU computes them as convolutions whose windows
    # run over the batch dimensions padded by their size − 1; only the taps on data count.
    b, h, w, c = 4, 96, 96, 3
    assert tpu_programs["space_to_depth"]["matmul_flops"] == 2 * b * h * w * c * (h + w)


def _row(op_name: str, stack: tuple = (), hbm: int = 0) -> traffic.Row:
    return traffic.Row("i", "fusion", op_name, {0: hbm}, {}, 0.0, 1, stack)


@pytest.mark.parametrize(
    "op_name, stack, expected",
    [
        (
            "jit(train_step)/jvp(FGTBT)/backbone/patch_embed1/proj/conv_general_dilated",
            (),
            ("stem: patch_embed1", "forward"),
        ),
        (
            "jit(train_step)/transpose(jvp(FGTBT))/backbone/block2_1/mlp/dwconv/dwconv/conv",
            (),
            ("stage 2 depthwise conv", "backward"),
        ),
        (
            "jit(train_step)/transpose(jvp(FGTBT))/backbone/block3_0/mlp/fc1/dot_general",
            (),
            ("stage 3 Mix-FFN", "backward"),
        ),
        (
            "jit(train_step)/jvp(FGTBT)/backbone/prompt_generator/lightweight_mlp4_1_0/dot",
            (),
            ("stage 4 prompt branch", "forward"),
        ),
        (
            "jit(train_step)/jvp(FGTBT)/backbone/prompt_generator/shared_csam1/mul",
            (),
            ("stage 1 prompt CSAM", "forward"),
        ),
        (
            "jit(train_step)/jvp(FGTBT)/backbone/prompt_generator/fft",
            (("/x/fgtbt_jax/models/backbone.py", "high_pass"),),
            ("FFT high-pass", "forward"),
        ),
        (
            "jit(train_step)/mul",
            (("/x/fgtbt_jax/train/optim.py", "ema_update"), ("/x/step.py", "train_step")),
            ("EMA", "update"),
        ),
        (
            "jit(train_step)/add",
            (("/x/fgtbt_jax/train/step.py", "make_train_step.<locals>.train_step"),),
            ("optimizer", "update"),
        ),
        (
            "jit(train_step)/jvp(FGTBT)/decode_head/linear_fuse_conv/conv",
            (),
            ("decoder", "forward"),
        ),
    ],
)
def test_parts(op_name, stack, expected):
    row = _row(op_name, stack)
    assert (attribution.part(row), attribution.direction(row.op_name)) == expected


def test_by_part_sums():
    rows = [
        _row("jit(f)/jvp(M)/decode_head/a", hbm=3),
        _row("jit(f)/jvp(M)/decode_head/b", hbm=4),
        _row("jit(f)/transpose(jvp(M))/decode_head/c", hbm=10),
    ]
    parts = attribution.by_part(rows)
    assert [(p.direction, p.hbm_bytes, p.instructions) for p in parts] == [
        ("backward", 10, 1),
        ("forward", 7, 2),
    ]


def test_attribution_script_tiny(tmp_path):
    # The train step of the tiny preset with one block per stage, compiled for two CPU devices
    # (one compile, no libtpu).
    out = tmp_path / "traffic.json"
    proc = run_script(
        "scripts/traffic_attribution.py",
        "--config",
        "configs/fgtbt.py:tiny",
        "--config.model.depths=(1,1,1,1)",
        "--target",
        "cpu:2",
        "--batch_per_device",
        "2",
        "--json",
        str(out),
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    result = json.loads(out.read_text())
    totals, parts = result["totals"], result["parts"]
    assert "| 1 |" in proc.stdout and "hbm_bytes" in proc.stdout
    assert sum(p["hbm_bytes"] for p in parts) == totals["hbm_bytes"] > 0
    assert totals["on_chip_bytes"] == 0  # CPU programs have no on-chip memory space
    assert totals["xla_bytes_accessed"] > 0 and totals["xla_flops"] > 0
    # XLA's count adds elementwise work but leaves out convolution taps on padding.
    assert 0.8 * totals["xla_flops"] < totals["matmul_flops"] < 1.1 * totals["xla_flops"]
    seen = {(p["part"], p["direction"]) for p in parts}
    for key in [
        ("stem: patch_embed1", "forward"),
        ("stem: patch_embed1", "backward"),
        ("stem: prompt handcrafted_generator1", "backward"),
        ("FFT high-pass", "forward"),
        ("decoder", "backward"),
        ("loss", "forward"),
        ("heatmap targets", "forward"),
        ("optimizer", "update"),
        ("EMA", "update"),
        *[(f"stage {s} {what}", "backward") for s in "1234" for what in ("attention",)],
        *[(f"stage {s} depthwise conv", "forward") for s in "1234"],
        ("stage 1 prompt CSAM", "forward"),
    ]:
        assert key in seen, key
    # Little is left unattributed.
    other = sum(p["hbm_bytes"] for p in parts if p["part"] == "other")
    assert other < 0.05 * totals["hbm_bytes"]


def test_attribution_script_bad_hlo_path(tmp_path):
    res = run_script(
        "scripts/traffic_attribution.py",
        "--config",
        "configs/fgtbt.py:tiny",
        "--hlo",
        str(tmp_path / "missing.hlo"),
    )
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: --hlo: no such file")
