"""Checkpoint porting between the PyTorch release (SPEC §2.3) and Flax variables.

Flax module names mirror the PyTorch module tree, so the mapping is a short table of renames
(:data:`RENAMES`, for the few places where a PyTorch name contains an index or a container)
plus a layout rule per kind of leaf:

==================  ========================  ==========================================
Flax leaf            PyTorch tensor             layout
==================  ========================  ==========================================
Dense ``kernel``     Linear ``weight``          (in, out) = weight.T
Conv ``kernel``      Conv2d ``weight``          HWIO = OIHW.transpose(2, 3, 1, 0)
                                                (depthwise: (kh, kw, 1, C))
ConvTranspose        ConvTranspose2d ``weight`` (kh, kw, out, in) = (in, out, kh, kw)
``kernel``                                      .transpose(2, 3, 1, 0), used with
                                                ``transpose_kernel=True`` (flips in lax)
LayerNorm/BN         ``weight``                 same
``scale``
BN ``mean``/``var``  ``running_mean/var``       same (batch_stats collection)
BN counter           ``num_batches_tracked``    int32 here, int64 in PyTorch
==================  ========================  ==========================================
"""

from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from collections.abc import Mapping

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fgtbt_jax import errors
from fgtbt_jax.models.fgtbt import FGTBT
from fgtbt_jax.models.layers import param_dtype

# (Flax dotted-path regex, PyTorch replacement), applied in order.
RENAMES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.", "encoder.backbone."),
    (r"^decode_head\.", "encoder.decode_head."),
    (r"\.block(\d)_(\d+)\.", r".block\1.\2."),
    (r"\.lightweight_mlp(\d)_(\d+)_0\.", r".lightweight_mlp\1_\2.0."),
    (r"\.shared_csam(\d)\.linear_(\d)\.", r".shared_csam\1.semantic_att.linear.\2."),
    (r"\.linear_fuse_(conv|bn)\.", r".linear_fuse.\1."),
    (r"\.downsample_(\d)\.", r".downsample.\1."),
    (r"\.upSample\.", ".upSample.upsample."),
    (r"\.linear_c(\d)\.", r".linear_c\1.proj."),
)
LEAF_NAMES = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
    "num_batches_tracked": "num_batches_tracked",
}


# Order of the PyTorch state dict (module registration order of the release), as sort keys.
_LOCAL_ORDER = (
    "norm1",
    "attn",
    "norm2",
    "mlp",
    "q",
    "kv",
    "bn1",
    "conv1",
    "bn2",
    "proj",
    "conv2",
    "bn3",
    "conv3",
    "sr",
    "norm",
    "downsample",
    "fc1",
    "dwconv",
    "fc2",
    "conv",
    "bn",
    "semantic_att",
    "linear",
    "upsample",
    "weight",
    "bias",
    "running_mean",
    "running_var",
    "num_batches_tracked",
)
_PARENT_ORDER = (  # (regex on the child name, sort key from its numbers), per parent module
    ("backbone", r"patch_embed(\d)", lambda s: (0, s)),
    ("backbone", r"block(\d)", lambda s: (1, s, 0)),
    ("backbone", r"norm(\d)", lambda s: (1, s, 1)),
    ("backbone", r"prompt_generator", lambda: (2,)),
    ("prompt_generator", r"handcrafted_generator(\d)", lambda s: (0, s)),
    ("prompt_generator", r"embedding_generator(\d)", lambda s: (1, s)),
    ("prompt_generator", r"lightweight_mlp(\d)_(\d+)", lambda s, i: (2, s, 0, i)),
    ("prompt_generator", r"shared_mlp(\d)", lambda s: (2, s, 1)),
    ("prompt_generator", r"bn(\d)", lambda s: (2, s, 2)),
    ("prompt_generator", r"conv(\d)", lambda s: (2, s, 3)),
    ("prompt_generator", r"shared_csam(\d)", lambda s: (2, s, 4)),
    ("decode_head", r"conv_seg", lambda: (0,)),
    ("decode_head", r"linear_c(\d)", lambda s: (1, -s)),
    ("decode_head", r"linear_fuse", lambda: (2,)),
    ("decode_head", r"linear_pred", lambda: (3,)),
    ("decode_head", r"conv1", lambda: (4,)),
    ("decode_head", r"upSample", lambda: (5,)),
    ("decode_head", r"conv2", lambda: (6,)),
)


def release_sort_key(torch_key: str) -> tuple:
    """Sort key that puts state-dict keys in the order PyTorch writes the release's modules."""
    parts = torch_key.split(".")
    key = []
    for parent, name in zip(["", *parts[:-1]], parts, strict=True):
        for p, pattern, rank in _PARENT_ORDER:
            m = re.fullmatch(pattern, name)
            if p == parent and m:
                key.append(rank(*map(int, m.groups())))
                break
        else:
            if name.isdigit():
                key.append((int(name),))
            elif name in _LOCAL_ORDER:
                key.append((_LOCAL_ORDER.index(name),))
            else:
                key.append((len(_LOCAL_ORDER), name))
    return tuple(key)


class CheckpointMismatchError(errors.Error, ValueError):
    """The checkpoint does not fit the architecture of the config."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tensor: where it lives in Flax and in PyTorch, and how its layout differs."""

    torch_key: str
    collection: str  # "params" or "batch_stats"
    path: tuple[str, ...]  # path inside the collection
    kind: str  # "dense", "conv", "copy" or "counter"
    flax_shape: tuple[int, ...]

    @property
    def torch_shape(self) -> tuple[int, ...]:
        s = self.flax_shape
        if self.kind == "dense":
            return (s[1], s[0])
        if self.kind == "conv":
            return (s[3], s[2], s[0], s[1])
        return s

    def to_torch(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if self.kind == "dense":
            return np.ascontiguousarray(x.T)
        if self.kind == "conv":  # HWIO -> OIHW (ConvTranspose: (kh, kw, out, in) -> (in, out, ..))
            return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
        if self.kind == "counter":
            return x.astype(np.int64)
        return x

    def to_flax(self, x: np.ndarray) -> np.ndarray:
        if self.kind == "dense":
            return np.ascontiguousarray(x.T)
        if self.kind == "conv":
            return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
        if self.kind == "counter":
            return x.astype(np.int32)
        return x


def torch_name(path: tuple[str, ...]) -> str:
    """Flax path (without the collection) → PyTorch state-dict key."""
    name = ".".join(path[:-1]) + "."
    for pattern, repl in RENAMES:
        name = re.sub(pattern, repl, name)
    return name + LEAF_NAMES[path[-1]]


def abstract_variables(model: FGTBT, img_size: int) -> dict:
    """Shapes and dtypes of the model's variables, without computing anything."""
    x = jax.ShapeDtypeStruct((1, img_size, img_size, 3), jnp.float32)
    return jax.eval_shape(lambda x: model.init({"params": jax.random.key(0)}, x, train=False), x)


def mapping(model: FGTBT, img_size: int) -> list[Entry]:
    """Every tensor of the model, in the order of the release's PyTorch state dict."""
    entries = []
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(abstract_variables(model, img_size)))
    for (collection, *path), leaf in flat.items():
        path = tuple(path)
        if path[-1] == "num_batches_tracked":
            kind = "counter"
        elif path[-1] == "kernel":
            kind = "dense" if len(leaf.shape) == 2 else "conv"
        else:
            kind = "copy"
        entries.append(Entry(torch_name(path), collection, path, kind, tuple(leaf.shape)))
    return sorted(entries, key=lambda e: release_sort_key(e.torch_key))


def _describe(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape)) if shape else "scalar"


def _check_dtype(
    key: str, x: np.ndarray, kind: str, source: str, float_dtype: np.dtype
) -> np.ndarray:
    """``x`` if its dtype fits a model whose parameters are ``float_dtype`` (float16/bfloat16
    upcast to float32; float64 only into a float64 model, never silently downcast)."""
    if kind == "counter":
        if not np.issubdtype(x.dtype, np.integer):
            raise CheckpointMismatchError(
                f"{source}: {key} should be an integer counter, got {x.dtype}"
            )
        return x
    if x.dtype == np.float32 or x.dtype == float_dtype:
        return x
    if x.dtype in (np.float16, jnp.bfloat16):  # lossless upcast
        return x.astype(np.float32)
    raise CheckpointMismatchError(
        f"{source}: unsupported dtype {x.dtype} for {key} (expected float32; float16/bfloat16 are "
        "upcast losslessly, float64 loads only into a float64 model (model.dtype='float64'), "
        "anything else would be a silent downcast — convert it explicitly)"
    )


def variables_from_state_dict(
    state_dict: Mapping[str, np.ndarray], model: FGTBT, img_size: int, *, source: str = "checkpoint"
) -> dict:
    """Strict import: every key of the model present with the right shape, no extra key."""
    entries = mapping(model, img_size)
    expected = {e.torch_key for e in entries}
    missing = [e for e in entries if e.torch_key not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        e
        for e in entries
        if e.torch_key in state_dict and tuple(np.shape(state_dict[e.torch_key])) != e.torch_shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"{source} does not match the architecture of the config:"]
        for e in mismatched[:10]:
            got = _describe(tuple(np.shape(state_dict[e.torch_key])))
            lines.append(
                f"  shape {e.torch_key}: checkpoint {got}, model {_describe(e.torch_shape)}"
            )
        lines += [f"  missing {e.torch_key} ({_describe(e.torch_shape)})" for e in missing[:10]]
        lines += [
            f"  unexpected {k} ({_describe(tuple(np.shape(state_dict[k])))})"
            for k in unexpected[:10]
        ]
        lines.append(
            f"  ({len(mismatched)} shape mismatches, {len(missing)} missing, "
            f"{len(unexpected)} unexpected keys in all)"
        )
        raise CheckpointMismatchError("\n".join(lines))
    float_dtype = param_dtype(model.dtype)  # float64 for a float64 model
    flat = {}
    for e in entries:
        x = np.asarray(state_dict[e.torch_key])
        x = e.to_flax(_check_dtype(e.torch_key, x, e.kind, source, float_dtype))
        flat[(e.collection, *e.path)] = jnp.asarray(
            x if e.kind == "counter" else x.astype(float_dtype)
        )
    return flax.traverse_util.unflatten_dict(flat)


def state_dict_from_variables(variables: Mapping, model: FGTBT, img_size: int) -> OrderedDict:
    """Flax variables → PyTorch state dict (numpy), release key names, shapes and dtypes."""
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(variables))
    sd = OrderedDict()
    for e in mapping(model, img_size):
        key = (e.collection, *e.path)
        if key not in flat:
            raise CheckpointMismatchError(f"variables lack {'/'.join(key)} ({e.torch_key})")
        sd[e.torch_key] = e.to_torch(np.asarray(jax.device_get(flat[key])))
    return sd


def release_args(config: ml_collections.ConfigDict) -> dict:
    """The ``model.args`` dict written into an exported release-layout checkpoint."""
    m = config.model
    return {
        "loss": "AWingLoss",
        "num_points": int(m.num_landmarks),
        "encoder_mode": {
            "name": "evp",
            "scale_factor": int(m.prompt_scale_factor),
            "input_type": "hpf",
            "freq_nums": 0.25,
            "prompt_type": "highpass",
            "tuning_stage": 1234,
            "handcrafted_tune": True,
            "embedding_tune": True,
            "adaptor": "adaptor",
        },
        "fgtbt_jax": {
            "img_size": int(config.img_size),
            "embed_dims": list(m.embed_dims),
            "num_heads": list(m.num_heads),
            "depths": list(m.depths),
            "sr_ratios": list(m.sr_ratios),
            "decoder_dim": int(m.decoder_dim),
        },
    }


def state_dict_from_release(obj: object, source: str = "checkpoint") -> Mapping[str, np.ndarray]:
    """The state dict inside a release-layout object (SPEC §2.3), or ``obj`` if it is one."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        if "sd" not in obj["model"]:
            raise CheckpointMismatchError(f"{source}: 'model' entry has no 'sd' state dict")
        obj = obj["model"]["sd"]
    elif isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) for k in obj):
        raise CheckpointMismatchError(f"{source}: not a state dict or release checkpoint")
    return obj


@dataclasses.dataclass
class ImportReport:
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[tuple[str, str, str]]  # (key, checkpoint shape, model shape)

    def table(self) -> str:
        rows = [
            f"loaded      {len(self.loaded):5d}",
            f"missing     {len(self.missing):5d}  (keep their initialisation)",
            f"unexpected  {len(self.unexpected):5d}  (ignored)",
            f"mismatched  {len(self.mismatched):5d}  (shape differs; not loaded)",
        ]
        for title, names in (("missing", self.missing), ("unexpected", self.unexpected)):
            rows += [f"  {title:10s} {n}" for n in names]
        rows += [f"  mismatched {k}: checkpoint {a}, model {b}" for k, a, b in self.mismatched]
        return "\n".join(rows)


def import_partial(
    variables: Mapping,
    state_dict: Mapping[str, np.ndarray],
    model: FGTBT,
    img_size: int,
    *,
    prefix: str = "encoder.backbone.",
) -> tuple[dict, ImportReport]:
    """Non-strict import (e.g. SegFormer's ImageNet ``mit_b4.pth`` into the backbone).

    Checkpoint keys are taken relative to ``prefix`` (keys already carrying it work too); only
    names that exist with the same shape load, everything else keeps its value in ``variables``.
    """
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(dict(variables))))
    float_dtype = param_dtype(model.dtype)
    by_key = {e.torch_key: e for e in mapping(model, img_size)}
    report = ImportReport([], [], [], [])
    seen = set()
    for key, value in state_dict.items():
        full = key if key.startswith(prefix) else prefix + key
        e = by_key.get(full)
        if e is None:
            report.unexpected.append(key)
            continue
        seen.add(full)
        value = np.asarray(value)
        if tuple(value.shape) != e.torch_shape:
            report.mismatched.append((key, _describe(value.shape), _describe(e.torch_shape)))
            continue
        value = _check_dtype(full, value, e.kind, "import", float_dtype)
        flat[(e.collection, *e.path)] = e.to_flax(value)
        report.loaded.append(key)
    report.missing = [k for k in by_key if k.startswith(prefix) and k not in seen]
    return flax.traverse_util.unflatten_dict(flat), report
