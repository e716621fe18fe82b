"""A memory-traffic model of a compiled XLA program, read from its optimized HLO text.

Every top-level instruction of the entry computation (fusions, convolutions, custom calls,
copies, collectives …) is taken to read each of its operands once and write its result once,
at the arrays' *tiled* sizes: the layout's tiles pad the minor dimensions, e.g.
``bf16[4,120,120,64]{2,3,1,0:T(8,128)(2,1)}`` is stored as 4·120·(64/8)·(128/128)·8·128
elements (the minor dimension 120 padded to 128). Bytes are split by memory space: an array
whose layout carries ``S(n)`` with ``n ≠ 0`` lives on-chip (XLA:TPU's memory-space assignment
puts it in VMEM); arrays without it are in HBM (device memory on GPU/CPU, whose programs have
no memory spaces, so everything counts as HBM there).

Counting rules:

- ``parameter``, ``constant``, ``bitcast``, ``get-tuple-element``, ``tuple`` and other views
  move nothing (their consumers read them);
- asynchronous pairs (``copy-start``/``copy-done``, ``all-gather-start``/``-done`` …): the
  ``-start`` reads the operands, the ``-done`` writes the result;
- a top-level ``slice``, ``dynamic-slice`` or ``slice-start`` reads only the slice (the
  result's elements in the operand's layout and memory space), not its whole operand: XLA:TPU
  prefetches operands into VMEM piecewise with thousands of ``slice-start``s (27 GB of the
  release step would otherwise be charged for whole operands); so does a fusion operand whose
  parameter is used only by slices (XLA:GPU wraps each slice of its combined gradient
  all-reduce buffer in a fusion: 7.5 GB of the release step on H100 otherwise);
- ``while`` and ``call`` are expanded into their bodies' instructions (a ``while`` body times
  its ``known_trip_count`` when XLA states it, else once); ``conditional`` counts its costliest
  branch.

What the model ignores: caches and re-reads inside an instruction (an operand re-read per
output tile counts once; an operand that a fusion slices and also uses otherwise counts whole;
an in-place ``dynamic-update-slice`` counts its whole buffer), overlap of transfers with
compute, launch overheads, and collectives' network traffic (a collective counts only its
local reads and writes). It is a fusion-boundary count, not a simulation: on-chip bytes are
listed, not charged to HBM bandwidth.

FLOPs per instruction count only the matrix units' work: ``2 · output elements · contraction
size`` of every ``dot`` and ``convolution``, also inside fusions, on the shapes XLA computes; a
convolution counts, as XLA's cost analysis does, only the window taps that meet data (not
those on padding or on ``lhs_dilate`` holes), so that a batched matmul XLA:TPU rewrites as a
convolution over padded windows counts its contraction only; elementwise work is not counted
(XLA's ``cost_analysis()["flops"]`` includes it, so it is somewhat larger).

XLA:GPU hands GEMMs and convolutions to cuBLAS and cuDNN as custom calls
(``__cublas$gemm``, ``__cublas$lt$matmul``, ``__cudnn$conv…``), which XLA's cost analysis
counts as nothing. Here they count like the ``dot`` / ``convolution`` they replace: FLOPs from
the GEMM's ``dot_dimension_numbers`` (backend config) or from the forward convolution that the
call's ``window`` / ``dim_labels`` describe (a backward-input call reads that convolution's
output gradient, a backward-filter call writes its kernel); bytes are the operands and the
result without the library's int8 workspace (the result tuple's ``s8`` / ``u8`` arrays).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import re
from collections.abc import Iterable

import numpy as np

HBM = 0  # the default memory space; ``S(n)`` with n ≠ 0 is on-chip

_BITS = {
    "pred": 8,
    "s2": 2,
    "u2": 2,
    "s4": 4,
    "u4": 4,
    "s8": 8,
    "u8": 8,
    "s16": 16,
    "u16": 16,
    "s32": 32,
    "u32": 32,
    "s64": 64,
    "u64": 64,
    "f16": 16,
    "bf16": 16,
    "f32": 32,
    "f64": 64,
    "c64": 64,
    "c128": 128,
    "token": 0,
}

# Instructions that only name or reinterpret existing buffers.
_VIEWS = {
    "parameter",
    "constant",
    "bitcast",
    "get-tuple-element",
    "tuple",
    "after-all",
    "partition-id",
    "replica-id",
    "opt-barrier",
    "add-dependency",
}

_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\](?:\{([^}]*)\})?")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_OP_NAME = re.compile(r'op_name="((?:[^"\\]|\\.)*)"')
_FRAME_ID = re.compile(r"\bstack_frame_id=(\d+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Array:
    """One array of an HLO shape: element type, logical dims and its layout's storage facts.

    ``minor_to_major`` is the layout's dimension order (empty: row-major), ``tiles`` the
    layout's tiles in order (``T(8,128)(2,1)`` → ``((8, 128), (2, 1))``; 0 stands for ``*``),
    ``memory_space`` the ``S(n)`` annotation (0 when absent).
    """

    dtype: str
    dims: tuple[int, ...]
    minor_to_major: tuple[int, ...] = ()
    tiles: tuple[tuple[int, ...], ...] = ()
    memory_space: int = HBM
    element_bits: int | None = None

    @property
    def bits(self) -> int:
        if self.element_bits:
            return self.element_bits
        if self.dtype.startswith("f8"):
            return 8
        return _BITS.get(self.dtype, 32)

    @property
    def logical_bytes(self) -> int:
        """Bytes without padding: elements × element size."""
        return math.prod(self.dims) * self.bits // 8

    @property
    def tiled_bytes(self) -> int:
        """Bytes as stored: the dims in physical (major-to-minor) order, tiled by each tile.

        Each tile ``(t_1 … t_k)`` splits the k most minor dims ``d_i`` into
        ``ceil(d_i / t_i)`` tiles of ``t_i`` (padding), as XLA's ``Tile`` does; the next tile
        then applies to the tile dims.
        """
        order = self.minor_to_major or tuple(reversed(range(len(self.dims))))
        shape = [self.dims[d] for d in reversed(order)]
        for tile in self.tiles:
            k = len(tile)
            if k > len(shape):
                shape = [1] * (k - len(shape)) + shape
            head, minor = shape[:-k], shape[-k:]
            outer = [-(-d // t) if t else 1 for d, t in zip(minor, tile, strict=True)]
            inner = [t if t else d for d, t in zip(minor, tile, strict=True)]
            shape = head + outer + inner
        return math.prod(shape) * self.bits // 8


def parse_arrays(shape: str) -> list[Array]:
    """The arrays of an HLO shape string (a tuple is flattened in order)."""
    arrays = []
    for dtype, dims, layout in _ARRAY.findall(shape):
        if dtype not in _BITS and not dtype.startswith("f8"):
            continue
        sizes = tuple(int(d.lstrip("<=")) for d in dims.split(",") if d)
        minor_to_major: tuple[int, ...] = ()
        tiles: list[tuple[int, ...]] = []
        space, element_bits = HBM, None
        if layout:
            order, _, rest = layout.partition(":")
            minor_to_major = tuple(int(d) for d in order.split(",") if d)
            t = re.search(r"T((?:\([\d,*]+\))+)", rest)
            if t:
                for group in re.findall(r"\(([\d,*]+)\)", t.group(1)):
                    tiles.append(tuple(0 if x == "*" else int(x) for x in group.split(",")))
            s = re.search(r"S\((\d+)\)", rest)
            space = int(s.group(1)) if s else HBM
            e = re.search(r"E\((\d+)\)", rest)
            element_bits = int(e.group(1)) if e else None
        arrays.append(Array(dtype, sizes, minor_to_major, tuple(tiles), space, element_bits))
    return arrays


def _balanced(text: str, start: int) -> int:
    """Index just past the parenthesis group opening at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "(":
            depth += 1
        elif text[i] == ")":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced parentheses in HLO: {text[:200]!r}")


@dataclasses.dataclass(frozen=True)
class Instruction:
    """One HLO instruction: ``name = shape opcode(operands), attributes``."""

    name: str
    opcode: str
    shape: str
    operands: tuple[str, ...]
    attributes: str
    number: int | None = None  # a ``parameter(n)``'s n

    @property
    def arrays(self) -> list[Array]:
        return parse_arrays(self.shape)

    @property
    def op_name(self) -> str:
        m = _OP_NAME.search(self.attributes)
        return m.group(1) if m else ""

    @property
    def stack_frame(self) -> int:
        """The ``stack_frame_id`` of the metadata (0: none)."""
        m = _FRAME_ID.search(self.attributes)
        return int(m.group(1)) if m else 0

    def called(self, key: str) -> list[str]:
        """Computations named by attribute ``key`` (``calls``, ``body``, ``to_apply`` …)."""
        m = re.search(rf"\b{key}=(\{{[^}}]*\}}|%?[\w.\-]+)", self.attributes)
        if not m:
            return []
        return re.findall(r"%?([\w.\-]+)", m.group(1).strip("{}"))


@dataclasses.dataclass(frozen=True)
class Module:
    """The computations of an HLO module by name, each a list of instructions in order, and
    the Python stack of each ``stack_frame_id``: ``(file, function)`` pairs, innermost first."""

    computations: dict[str, list[Instruction]]
    entry: str
    stacks: dict[int, tuple[tuple[str, str], ...]] = dataclasses.field(default_factory=dict)


def _stacks(text: str) -> dict[int, tuple[tuple[str, str], ...]]:
    """The module's stack-frame tables (``FileNames`` … ``StackFrames``) as whole stacks."""
    tables: dict[str, dict[int, str]] = {}
    table = None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            table = tables.setdefault(line, {})
            continue
        m = re.match(r"^(\d+) (.*)$", line) if table is not None else None
        if not m:
            table = None
            continue
        table[int(m.group(1))] = m.group(2)
    files, functions = tables.get("FileNames", {}), tables.get("FunctionNames", {})
    locations = {}
    for i, v in tables.get("FileLocations", {}).items():
        f = re.search(r"file_name_id=(\d+)", v)
        g = re.search(r"function_name_id=(\d+)", v)
        locations[i] = (
            files.get(int(f.group(1)), "").strip('"') if f else "",
            functions.get(int(g.group(1)), "").strip('"') if g else "",
        )
    frames = {}
    for i, v in tables.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", v)
        parent = re.search(r"parent_frame_id=(\d+)", v)
        frames[i] = (int(loc.group(1)) if loc else 0, int(parent.group(1)) if parent else 0)
    stacks = {}
    for i in frames:
        stack, j = [], i
        while j in frames and len(stack) < 256:
            loc, parent = frames[j]
            stack.append(locations.get(loc, ("", "")))
            # HLO text prints a frame's parent as its id + 1 (0: none).
            j = parent - 1
        stacks[i] = tuple(stack)
    return stacks


def parse_module(text: str) -> Module:
    """Parse optimized HLO text (``compiled.as_text()``) into computations and instructions."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and "=" not in line.split("(")[0]:
                current = m.group(2)
                computations[current] = []
                if m.group(1):
                    entry = current
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if not m:
            continue
        name, rest = m.groups()
        if rest.startswith("("):
            end = _balanced(rest, 0)
        else:
            end = len(rest.split(" ", 1)[0])
        shape, tail = rest[:end], rest[end:].lstrip()
        op = re.match(r"([\w\-]+)\(", tail)
        if not op:
            continue
        close = _balanced(tail, op.end() - 1)
        inside = tail[op.end() : close - 1]
        operands = tuple(re.findall(r"%([\w.\-]+)", inside))
        number = int(inside) if op.group(1) == "parameter" and inside.isdigit() else None
        computations[current].append(
            Instruction(name, op.group(1), shape, operands, tail[close:], number)
        )
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return Module(computations, entry, _stacks(text))


@dataclasses.dataclass
class Row:
    """Traffic of one top-level instruction (bytes at tiled sizes) and its matmul FLOPs.

    ``read`` / ``written``: bytes per memory space (0 = HBM, others on-chip).
    ``count`` is the number of executions (a ``while`` body's trip count).
    """

    name: str
    opcode: str
    op_name: str
    read: dict[int, int]
    written: dict[int, int]
    flops: float
    count: int = 1
    stack: tuple[tuple[str, str], ...] = ()

    @property
    def hbm_bytes(self) -> int:
        return self.count * (self.read.get(HBM, 0) + self.written.get(HBM, 0))

    @property
    def on_chip_bytes(self) -> int:
        moved = sum(self.read.values()) + sum(self.written.values())
        return self.count * moved - self.hbm_bytes

    @property
    def boundary_bytes(self) -> int:
        """All bytes read and written at the instruction's boundary, every memory space."""
        return self.hbm_bytes + self.on_chip_bytes


def _add(into: dict[int, int], arrays: Iterable[Array]) -> None:
    for a in arrays:
        into[a.memory_space] = into.get(a.memory_space, 0) + a.tiled_bytes


_SLICES = {"slice", "dynamic-slice", "slice-start"}


def _fused_slices(module: Module, ins: Instruction) -> dict[int, list[tuple[int, ...]]]:
    """For a fusion: operand number → the dims of the slices that are its parameter's only
    uses in the fused computation (XLA:GPU wraps each slice of a combined all-reduce buffer
    in a fusion of its own)."""
    called = ins.called("calls") if ins.opcode == "fusion" else []
    if not called or called[0] not in module.computations:
        return {}
    body = module.computations[called[0]]
    users: dict[str, list[Instruction]] = {}
    for i in body:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    sliced = {}
    for p in body:
        uses = users.get(p.name, [])
        if p.number is not None and uses:
            if all(u.opcode in _SLICES and u.operands[0] == p.name for u in uses):
                sliced[p.number] = [u.arrays[0].dims for u in uses]
    return sliced


def _read_operands(
    ins: Instruction, shapes: dict[str, list[Array]], module: Module | None = None
) -> dict[int, int]:
    """Bytes read from each memory space by an instruction's operands: each operand whole, but
    only the slice of a sliced one (:data:`_SLICES`: the result's dims in the operand's layout
    and memory space; an ``-start``'s result follows its operands in its tuple), and only the
    slices of a fusion operand whose parameter is used by slices alone (:func:`_fused_slices`)."""
    read: dict[int, int] = {}
    operands = [shapes.get(o, []) for o in ins.operands]
    if ins.opcode in _SLICES and operands and len(operands[0]) == 1:
        source = operands[0][0]
        arrays = ins.arrays
        sliced = arrays[1] if ins.opcode.endswith("-start") and len(arrays) > 1 else arrays[0]
        _add(read, [dataclasses.replace(source, dims=sliced.dims)])
        operands = operands[1:]
    fused = _fused_slices(module, ins) if module is not None else {}
    for n, arrays in enumerate(operands):
        if n in fused and len(arrays) == 1:
            arrays = [dataclasses.replace(arrays[0], dims=dims) for dims in fused[n]]
        _add(read, arrays)
    return read


_GEMMS = {"__cublas$gemm", "__cublas$lt$matmul"}
# cuDNN convolutions: which of (operand 0, operand 1, result) is the forward convolution's
# input, kernel and output.
_CONVS = {
    "__cudnn$convForward": (0, 1, 2),
    "__cudnn$convBiasActivationForward": (0, 1, 2),
    "__cudnn$convBackwardInput": (2, 1, 0),
    "__cudnn$convBackwardFilter": (0, 2, 1),
}
_CUSTOM_CALL_TARGET = re.compile(r'custom_call_target="([^"]*)"')


def _library_call(ins: Instruction) -> str:
    """The cuBLAS / cuDNN target of a ``custom-call`` (else "")."""
    if ins.opcode != "custom-call":
        return ""
    m = _CUSTOM_CALL_TARGET.search(ins.attributes)
    target = m.group(1) if m else ""
    return target if target in _GEMMS or target in _CONVS else ""


def _written(ins: Instruction) -> list[Array]:
    """The arrays an instruction writes: its result, without a library call's workspace."""
    arrays = ins.arrays
    if _library_call(ins):
        arrays = arrays[:1] + [a for a in arrays[1:] if a.dtype not in ("s8", "u8")]
    return arrays


@functools.lru_cache(maxsize=4096)
def _window_pairs(size: int, window: int, out: int, stride: int, pad: int, dilate: tuple) -> int:
    """(output, tap) pairs of one spatial dimension whose input position holds data: not on
    padding and not on an ``lhs_dilate`` hole. ``dilate`` = (lhs, rhs) dilation."""
    lhs_dilate, rhs_dilate = dilate
    pos = np.arange(out)[:, None] * stride + np.arange(window)[None, :] * rhs_dilate - pad
    data = (pos >= 0) & (pos % lhs_dilate == 0) & (pos // lhs_dilate < size)
    return int(data.sum())


def _window(attributes: str, key: str, count: int, default: int) -> list[int]:
    m = re.search(rf"\b{key}=([-\d_x]+)", attributes)
    if not m:
        return [default] * count
    return [int(v.split("_")[0]) for v in m.group(1).split("x")]


def _conv_flops(lhs: Array, kernel: Array, out: Array, attributes: str) -> float:
    """``2 · Σ over outputs of the taps that meet data · input features per group`` of a
    convolution (input ``lhs``, ``kernel``, output ``out``, laid out by ``dim_labels``, e.g.
    ``b01f_01io->b01f``; 0 if absent), as XLA's cost analysis counts it: taps that fall on
    padding or on ``lhs_dilate`` holes do no work. Batched matmuls that XLA:TPU rewrites as
    convolutions (the batch as a spatial dimension padded by its size − 1) count their
    contraction only."""
    m = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attributes)
    w = re.search(r"window=\{size=([\dx]+)", attributes)
    if not m:
        return 0.0
    lhs_labels, kernel_labels, out_labels = m.groups()
    sizes = [int(v) for v in w.group(1).split("x")] if w else []
    n = len(sizes)
    strides = _window(attributes, "stride", n, 1)
    pads = _window(attributes, "pad", n, 0)
    lhs_dilate = _window(attributes, "lhs_dilate", n, 1)
    rhs_dilate = _window(attributes, "rhs_dilate", n, 1)
    pairs = 1
    for d in range(n):
        pairs *= _window_pairs(
            lhs.dims[lhs_labels.index(str(d))],
            sizes[d],
            out.dims[out_labels.index(str(d))],
            strides[d],
            pads[d],
            (lhs_dilate[d], rhs_dilate[d]),
        )
    batch, features = out.dims[out_labels.index("b")], out.dims[out_labels.index("f")]
    return 2.0 * batch * features * pairs * kernel.dims[kernel_labels.index("i")]


def _flops_of(ins: Instruction, shapes: dict[str, list[Array]]) -> float:
    """``2 · output elements · contraction`` of one ``dot``, ``convolution`` or cuBLAS /
    cuDNN custom call (else 0)."""
    target = _library_call(ins)
    if ins.opcode not in ("dot", "convolution") and not target:
        return 0.0
    out = ins.arrays
    if not out:
        return 0.0
    operands = [(shapes.get(o) or [None])[0] for o in ins.operands]
    if ins.opcode == "dot" or target in _GEMMS:
        key = "lhs_contracting_dims=" if ins.opcode == "dot" else '"lhs_contracting_dimensions":'
        m = re.search(re.escape(key) + r"[{\[]([^}\]]*)[}\]]", ins.attributes)
        if operands and operands[0] is not None and m:
            dims = [int(d) for d in re.findall(r"\d+", m.group(1))]
            k = math.prod(operands[0].dims[d] for d in dims)
            return 2.0 * math.prod(out[0].dims) * k
    elif (ins.opcode == "convolution" or target in _CONVS) and len(operands) > 1:
        arrays = [*operands[:2], out[0]]
        lhs, kernel, output = (arrays[i] for i in _CONVS.get(target, (0, 1, 2)))
        if lhs is not None and kernel is not None:
            return _conv_flops(lhs, kernel, output, ins.attributes)
    return 0.0


def _fused_flops(module: Module, computation: str) -> float:
    """Matmul FLOPs of every dot and convolution in ``computation`` and what it calls."""
    if computation not in module.computations:
        return 0.0
    instructions = module.computations[computation]
    shapes = {i.name: i.arrays for i in instructions}
    total = 0.0
    for ins in instructions:
        total += _flops_of(ins, shapes)
        for sub in ins.called("calls"):
            total += _fused_flops(module, sub)
    return total


def _trip_count(ins: Instruction) -> int:
    m = _TRIP.search(ins.attributes)
    return int(m.group(1)) if m else 1


_PASS_THROUGH = {"bitcast", "get-tuple-element", "tuple"}


def _named_by(instructions: list[Instruction]) -> dict[str, Instruction]:
    """For each instruction without ``op_name`` metadata (XLA's own copies, prefetches and
    slices: ``copy``, ``copy-start``/``-done``, ``slice-start`` …), the instruction whose
    metadata it is attributed to: the first user of its result that has metadata (through
    ``-done``s, bitcasts and tuples), else the producer of its first operand that has."""
    by_name = {i.name: i for i in instructions}
    users: dict[str, list[Instruction]] = {}
    for ins in instructions:
        for o in ins.operands:
            users.setdefault(o, []).append(ins)

    def named(ins: Instruction) -> bool:
        return bool(ins.op_name) and ins.opcode not in _PASS_THROUGH

    def user(name: str, depth: int = 0) -> Instruction | None:
        for u in users.get(name, []):
            if named(u):
                return u
            found = user(u.name, depth + 1) if depth < 8 else None
            if found is not None:
                return found
        return None

    def producer(ins: Instruction, depth: int = 0) -> Instruction | None:
        src = by_name.get(ins.operands[0]) if ins.operands else None
        if src is None or named(src):
            return src
        return producer(src, depth + 1) if depth < 8 else None

    sources = {}
    for ins in instructions:
        if not ins.op_name and ins.opcode not in _VIEWS:
            source = user(ins.name) or producer(ins)
            if source is not None:
                sources[ins.name] = source
    return sources


def instruction_rows(module: Module, computation: str | None = None, count: int = 1) -> list[Row]:
    """One :class:`Row` per top-level instruction of ``computation`` (default: the entry).

    A row's ``op_name`` and ``stack`` are its instruction's metadata, or for an instruction
    without metadata those of the instruction :func:`_named_by` attributes it to."""
    computation = computation or module.entry
    instructions = module.computations[computation]
    shapes = {i.name: i.arrays for i in instructions}
    named = _named_by(instructions)
    rows: list[Row] = []
    for ins in instructions:
        if ins.opcode in _VIEWS:
            continue
        if ins.opcode in ("while", "call"):
            n = count * (_trip_count(ins) if ins.opcode == "while" else 1)
            for key in ("body", "condition", "to_apply"):
                for sub in ins.called(key):
                    rows += instruction_rows(module, sub, n)
            continue
        if ins.opcode == "conditional":
            keys = ("branch_computations", "true_computation", "false_computation")
            branches = [instruction_rows(module, b, count) for key in keys for b in ins.called(key)]
            if branches:
                rows += max(branches, key=lambda rs: sum(r.hbm_bytes for r in rs))
            continue
        read = {} if ins.opcode.endswith("-done") else _read_operands(ins, shapes, module)
        written: dict[int, int] = {}
        if not ins.opcode.endswith("-start"):
            _add(written, _written(ins))
        flops = _flops_of(ins, shapes) + sum(_fused_flops(module, c) for c in ins.called("calls"))
        source = named.get(ins.name, ins)
        stack = module.stacks.get(source.stack_frame, ())
        rows.append(Row(ins.name, ins.opcode, source.op_name, read, written, flops, count, stack))
    return rows


@dataclasses.dataclass(frozen=True)
class Traffic:
    """Totals over a program's top-level instructions (bytes at tiled sizes, per call).

    ``hbm_bytes``: reads and writes of HBM arrays; ``on_chip_bytes``: of on-chip arrays
    (``S(n)``, n ≠ 0); ``boundary_bytes``: both (the fusion-boundary count);
    ``matmul_flops``: dot and convolution FLOPs; ``rows``: the per-instruction figures.
    """

    hbm_bytes: int
    on_chip_bytes: int
    boundary_bytes: int
    matmul_flops: float
    rows: tuple[Row, ...]

    def summary(self) -> dict[str, float]:
        return {
            "hbm_bytes": self.hbm_bytes,
            "on_chip_bytes": self.on_chip_bytes,
            "boundary_bytes": self.boundary_bytes,
            "matmul_flops": self.matmul_flops,
            "instructions": len(self.rows),
        }


def of_hlo(text: str) -> Traffic:
    """The traffic model of optimized HLO text (``compiled.as_text()``)."""
    rows = instruction_rows(parse_module(text))
    return Traffic(
        hbm_bytes=sum(r.hbm_bytes for r in rows),
        on_chip_bytes=sum(r.on_chip_bytes for r in rows),
        boundary_bytes=sum(r.boundary_bytes for r in rows),
        matmul_flops=sum(r.count * r.flops for r in rows),
        rows=tuple(rows),
    )


def rows_json(traffic: Traffic) -> str:
    """The per-instruction rows as JSON lines (for inspection)."""
    return "\n".join(json.dumps(dataclasses.asdict(r)) for r in traffic.rows)
