"""Read and write PyTorch ``.pth`` checkpoints without importing torch.

The format is the zip container of ``torch.save`` (PyTorch >= 1.6): one top-level folder
``<prefix>/`` (the file stem when torch wrote it) holding

- ``data.pkl``: a protocol-2 pickle of the object; every tensor is a call
  ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)`` whose
  ``storage`` is a persistent id ``('storage', torch.<Type>Storage, key, location, numel)``;
- ``data/<key>``: the raw little-endian bytes of each storage;
- ``byteorder``, ``version``, ``.format_version``, ``.storage_alignment``,
  ``.data/serialization_id``: small metadata records.

:func:`load_pth` unpickles with an allow-list (tensor rebuild functions, ``OrderedDict``, storage
types and dtypes) so a checkpoint from the internet cannot run code, and returns tensors as numpy
arrays (bfloat16 through ``ml_dtypes``). :func:`save_pth` writes the same container with a pickle
of our own making, so ``torch.load`` (``weights_only=True`` included) reads it back bit-exactly.
"""

from __future__ import annotations

import collections
import hashlib
import io
import os
import pathlib
import pickle
import struct
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from fgtbt_jax import errors

__all__ = ["PthFormatError", "TorchDtype", "UnsafePickleError", "load_pth", "save_pth"]

PathLike = str | os.PathLike


class PthFormatError(errors.Error, ValueError):
    """The file is not a readable zip-format ``torch.save`` checkpoint."""


class UnsafePickleError(errors.Error, ValueError):
    """The checkpoint's pickle references a global outside the checkpoint allow-list."""


# torch storage type name -> numpy dtype (little-endian). Complex types are accepted too.
_STORAGE_DTYPES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"),
    "ComplexDoubleStorage": np.dtype("<c16"),
}
_DTYPE_TO_STORAGE: dict[np.dtype, str] = {v: k for k, v in _STORAGE_DTYPES.items()}

# torch dtype attribute names -> numpy dtypes: for values such as `torch.float32` held in a
# checkpoint, and the dtype argument of `_rebuild_tensor_v3` (newer dtypes stored untyped).
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("float32"),
    "float": np.dtype("float32"),
    "float64": np.dtype("float64"),
    "double": np.dtype("float64"),
    "float16": np.dtype("float16"),
    "half": np.dtype("float16"),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "int64": np.dtype("int64"),
    "long": np.dtype("int64"),
    "int32": np.dtype("int32"),
    "int": np.dtype("int32"),
    "int16": np.dtype("int16"),
    "short": np.dtype("int16"),
    "int8": np.dtype("int8"),
    "uint8": np.dtype("uint8"),
    "uint16": np.dtype("uint16"),
    "uint32": np.dtype("uint32"),
    "uint64": np.dtype("uint64"),
    "bool": np.dtype("bool"),
    "complex64": np.dtype("complex64"),
    "cfloat": np.dtype("complex64"),
    "complex128": np.dtype("complex128"),
    "cdouble": np.dtype("complex128"),
}
for _name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz"):
    if hasattr(ml_dtypes, _name):
        _TORCH_DTYPES[_name] = np.dtype(getattr(ml_dtypes, _name))
# torch dtypes that numpy cannot hold: recognised so the error can name them.
_UNSUPPORTED_TORCH_DTYPES = frozenset(
    {"complex32", "chalf", "qint8", "quint8", "qint32", "quint4x2", "quint2x4"}
    | {"float8_e8m0fnu", "float4_e2m1fn_x2", "bits1x8", "bits2x4", "bits4x2", "bits8", "bits16"}
)


class _Frozen:
    """Base of the objects the unpickler hands out: immutable, so a pickle's BUILD opcode cannot
    alter them (or, through them, shared module state)."""

    __slots__ = ()

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(f"{type(self).__name__} is read-only")

    def _init(self, **fields: Any) -> None:
        for k, v in fields.items():
            object.__setattr__(self, k, v)


class TorchDtype(_Frozen):
    """A ``torch.<name>`` dtype value found in a checkpoint; ``numpy_dtype`` is None where numpy
    has no equivalent (e.g. complex32, quantized types)."""

    __slots__ = ("name", "numpy_dtype")

    def __init__(self, name: str) -> None:
        self._init(name=name, numpy_dtype=_TORCH_DTYPES.get(name))

    def __repr__(self) -> str:
        return f"torch.{self.name}"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TorchDtype) and other.name == self.name

    def __hash__(self) -> int:
        return hash(("TorchDtype", self.name))


# Records are aligned like torch's writer aligns them (its kFieldAlignment).
_ALIGNMENT = 64
# First bytes of a legacy (pre-1.6) torch.save file: PROTO 2, then the magic number as LONG1.
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


# ----------------------------------------------------------------------------------- loading


class _StorageType(_Frozen):
    """Stands in for ``torch.<Name>Storage`` inside the unpickler (not callable).

    ``dtype`` is None for storage types we cannot read (e.g. quantized ones); UntypedStorage is
    read as bytes.
    """

    __slots__ = ("name", "dtype")

    def __init__(self, name: str) -> None:
        dtype = np.dtype("u1") if name == "UntypedStorage" else _STORAGE_DTYPES.get(name)
        self._init(name=name, dtype=dtype)

    def __repr__(self) -> str:
        return f"torch.{self.name}"


class _Storage(_Frozen):
    """A storage's elements as a read-only 1-D numpy array."""

    __slots__ = ("data", "type_name")

    def __init__(self, data: np.ndarray, type_name: str) -> None:
        data.flags.writeable = False
        self._init(data=data, type_name=type_name)


class _Function(_Frozen):
    """An allowed callable, wrapped so that BUILD cannot set attributes on our functions."""

    __slots__ = ("fn",)

    def __init__(self, fn: Any) -> None:
        self._init(fn=fn)

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """Our version of ``torch._utils._rebuild_tensor_v2``: a strided view copied to an array."""
    del requires_grad, backward_hooks, metadata
    if not isinstance(storage, _Storage):
        raise PthFormatError(f"tensor rebuild got {type(storage).__name__} instead of a storage")
    size, stride = tuple(size), tuple(stride)
    if (
        not _is_int(storage_offset)
        or storage_offset < 0
        or len(size) != len(stride)
        or not all(_is_int(s) and s >= 0 for s in size + stride)
    ):
        raise PthFormatError(
            f"bad tensor geometry: offset {storage_offset!r}, size {size}, stride {stride}"
        )
    data = storage.data
    numel = int(np.prod(size, dtype=np.int64))
    if numel == 0:
        return np.zeros(size, data.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= data.size:
        raise PthFormatError(
            f"tensor (offset {storage_offset}, size {size}, stride {stride}) reaches past the "
            f"end of its {storage.type_name} of {data.size} elements"
        )
    item = data.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        data[storage_offset:], shape=size, strides=[s * item for s in stride], writeable=False
    )
    return np.array(view, copy=True, order="C")


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> np.ndarray:
    """Our ``torch._utils._rebuild_tensor_v3``: like v2 on an untyped (byte) storage + dtype."""
    del metadata
    if not isinstance(dtype, TorchDtype):
        raise PthFormatError(f"tensor rebuild got {dtype!r} instead of a dtype")
    if dtype.numpy_dtype is None:
        raise PthFormatError(f"unsupported tensor dtype {dtype!r} (numpy has no equivalent)")
    dtype = dtype.numpy_dtype
    if not isinstance(storage, _Storage):
        raise PthFormatError(f"tensor rebuild got {type(storage).__name__} instead of a storage")
    raw = storage.data
    if raw.dtype != dtype:
        if raw.dtype.itemsize != 1 or raw.size % dtype.itemsize:
            raise PthFormatError(f"cannot view a {storage.type_name} as {dtype}")
        little = dtype.newbyteorder("<") if dtype.itemsize > 1 else dtype
        raw = raw.view(little).astype(dtype, copy=False)
    return _rebuild_tensor_v2(
        _Storage(raw, storage.type_name),
        storage_offset,
        size,
        stride,
        requires_grad,
        backward_hooks,
    )


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> Any:
    del requires_grad, backward_hooks
    return data


_ALLOWED_FUNCTIONS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a weights checkpoint needs."""

    def __init__(self, file: io.BytesIO, path: str, load_storage: Any) -> None:
        super().__init__(file)
        self._path = path
        self._load_storage = load_storage

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_FUNCTIONS:
            fn = _ALLOWED_FUNCTIONS[(module, name)]
            return fn if fn is collections.OrderedDict else _Function(fn)
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(name)
        if module == "torch" and (name in _STORAGE_DTYPES or _is_storage_name(name)):
            return _StorageType(name)
        if module == "torch" and (name in _TORCH_DTYPES or name in _UNSUPPORTED_TORCH_DTYPES):
            return TorchDtype(name)
        raise UnsafePickleError(
            f"{self._path}: refusing to load global '{module}.{name}': only tensors, "
            "OrderedDict, storage types and dtypes are allowed in a checkpoint (a pickle "
            "referring to other globals could run arbitrary code)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise PthFormatError(f"{self._path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or storage_type.dtype is None:
            raise PthFormatError(
                f"{self._path}: unsupported storage type {storage_type!r} for record {key!r}; "
                f"supported: {', '.join('torch.' + n for n in _STORAGE_DTYPES)}"
            )
        if not isinstance(key, str) or not _is_int(numel) or numel < 0:
            raise PthFormatError(f"{self._path}: malformed storage id {pid!r}")
        return self._load_storage(key, storage_type, numel)


def _is_storage_name(name: str) -> bool:
    return name.endswith("Storage") and name[:-7].isalnum()


def _open_zip(path: str) -> zipfile.ZipFile:
    """Opens ``path`` as a zip, turning every failure into a :class:`PthFormatError`."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_MAGIC))
    except OSError as e:
        raise PthFormatError(f"{path}: cannot read checkpoint: {e}") from e
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        legacy = head.startswith(_LEGACY_MAGIC)
        if not legacy:
            try:
                legacy = tarfile.is_tarfile(path)
            except OSError:
                legacy = False
        if legacy:
            raise PthFormatError(
                f"{path}: this is the legacy (pre-1.6, non-zip) torch.save format, which is not "
                "supported; re-save it with torch: torch.save(torch.load(path), new_path, "
                "_use_new_zipfile_serialization=True)"
            ) from e
        raise PthFormatError(
            f"{path}: not a zip-format torch checkpoint (truncated or not a .pth file): {e}"
        ) from e


def _find_prefix(zf: zipfile.ZipFile, path: str) -> str:
    """The record folder (``<prefix>/``): torch takes the first record's folder."""
    names = zf.namelist()
    if names and "/" in names[0]:
        first = names[0].split("/", 1)[0] + "/"
        if first + "data.pkl" in names:
            return first
    candidates = [n[: -len("data.pkl")] for n in names if n.endswith("data.pkl")]
    candidates = [c for c in candidates if c == "" or c.count("/") == 1 and c.endswith("/")]
    if not candidates:
        raise PthFormatError(f"{path}: no '<name>/data.pkl' record: not a torch.save checkpoint")
    return candidates[0]


def load_pth(path: PathLike) -> Any:
    """Loads a zip-format ``torch.save`` file without torch, executing no pickled code.

    Tensors come back as C-contiguous numpy arrays with their torch dtype (bfloat16 as
    ``ml_dtypes.bfloat16``) and shape (a 0-d tensor is a 0-d array), whatever their storage
    offset and strides were; tensors sharing a storage become independent copies. dict,
    OrderedDict, list, tuple, numbers, strings and None pass through; ``torch.<dtype>`` values
    become :class:`TorchDtype` objects.

    Raises:
      PthFormatError: not a zip / truncated / missing record / legacy format / bad storage.
      UnsafePickleError: the pickle references any other global (nothing is executed).
    """
    path = os.fspath(path)
    with _open_zip(path) as zf:
        try:
            prefix = _find_prefix(zf, path)
            byteorder = "little"
            if prefix + "byteorder" in zf.NameToInfo:
                byteorder = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
                if byteorder not in ("little", "big"):
                    raise PthFormatError(f"{path}: unknown byteorder record {byteorder!r}")
            storages: dict[str, _Storage] = {}

            def load_storage(key: str, storage_type: _StorageType, numel: int) -> _Storage:
                if key in storages:
                    return storages[key]
                record = f"{prefix}data/{key}"
                if record not in zf.NameToInfo:
                    raise PthFormatError(f"{path}: missing data record '{record}'")
                dtype = storage_type.dtype
                if byteorder == "big" and dtype.itemsize > 1:
                    dtype = dtype.newbyteorder(">")
                raw = zf.read(record)
                if len(raw) < numel * dtype.itemsize:
                    raise PthFormatError(
                        f"{path}: record '{record}' holds {len(raw)} bytes, but its "
                        f"{storage_type!r} of {numel} elements needs {numel * dtype.itemsize}"
                    )
                data = np.frombuffer(raw, dtype=dtype, count=numel)
                if byteorder == "big" and dtype.itemsize > 1:
                    data = data.astype(storage_type.dtype)
                storages[key] = _Storage(data, storage_type.name)
                return storages[key]

            pkl = zf.read(prefix + "data.pkl")
            unpickler = _RestrictedUnpickler(io.BytesIO(pkl), path, load_storage)
            return unpickler.load()
        except (UnsafePickleError, PthFormatError) as e:
            if path in str(e):
                raise
            raise type(e)(f"{path}: {e}") from e
        except Exception as e:  # noqa: BLE001 - bad zip data or malformed pickle of any kind
            raise PthFormatError(f"{path}: corrupt or truncated checkpoint: {e}") from e


# ------------------------------------------------------------------------------------ saving


class _PickleWriter:
    """Writes a protocol-2 pickle of the checkpoint data model, tensors as persistent storages.

    We emit the opcodes ourselves because pickling a reference to ``torch.FloatStorage`` with the
    standard pickler would import torch to check it.
    """

    def __init__(self) -> None:
        self.out = io.BytesIO()
        self.storages: list[np.ndarray] = []  # key = index
        self._storage_keys: dict[int, int] = {}  # id(original array) -> key
        self._keepalive: list[Any] = []
        self._active: set[int] = set()

    def dump(self, obj: Any) -> bytes:
        self.out.write(b"\x80\x02")
        self._save(obj, "obj")
        self.out.write(b".")
        return self.out.getvalue()

    # -- primitives
    def _global(self, module: str, name: str) -> None:
        self.out.write(b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n")

    def _int(self, v: int) -> None:
        w = self.out.write
        if 0 <= v < 256:
            w(b"K" + bytes([v]))
        elif 0 <= v < 65536:
            w(b"M" + struct.pack("<H", v))
        elif -(2**31) <= v < 2**31:
            w(b"J" + struct.pack("<i", v))
        else:
            data = v.to_bytes((v.bit_length() >> 3) + 1, "little", signed=True)
            if len(data) < 256:
                w(b"\x8a" + bytes([len(data)]) + data)
            else:
                w(b"\x8b" + struct.pack("<i", len(data)) + data)

    def _str(self, v: str) -> None:
        data = v.encode("utf-8", "surrogatepass")
        self.out.write(b"X" + struct.pack("<I", len(data)) + data)

    def _tuple(self, items: tuple, where: str) -> None:
        w = self.out.write
        if not items:
            w(b")")
            return
        if len(items) > 3:
            w(b"(")
        for i, it in enumerate(items):
            self._save(it, f"{where}[{i}]")
        w({1: b"\x85", 2: b"\x86", 3: b"\x87"}.get(len(items), b"t"))

    def _items(self, mapping: Mapping, where: str) -> None:
        if not mapping:
            return
        self.out.write(b"(")
        for k, v in mapping.items():
            if not isinstance(k, str | int | float | bool | type(None)):
                raise TypeError(f"save_pth: unsupported key type {type(k).__name__} at {where}")
            self._save(k, f"{where}[{k!r}] (key)")
            self._save(v, f"{where}[{k!r}]")
        self.out.write(b"u")

    # -- tensors
    def _tensor(self, arr: np.ndarray, where: str) -> None:
        original = arr
        dtype = arr.dtype
        if dtype.kind in "fiuc" and dtype.itemsize > 1 and dtype.byteorder == ">":
            dtype = dtype.newbyteorder("<")
        key_dtype = np.dtype(ml_dtypes.bfloat16) if dtype == ml_dtypes.bfloat16 else dtype
        if key_dtype not in _DTYPE_TO_STORAGE:
            raise TypeError(
                f"save_pth: array dtype {arr.dtype} at {where} has no torch storage type; "
                f"supported: {', '.join(str(d) for d in _DTYPE_TO_STORAGE)}"
            )
        storage_type = _DTYPE_TO_STORAGE[key_dtype]
        key = self._storage_keys.get(id(original))
        if key is None:
            data = np.ascontiguousarray(arr, dtype=key_dtype)
            key = len(self.storages)
            self.storages.append(data)
            self._storage_keys[id(original)] = key
            self._keepalive.append(original)
        strides, acc = [], 1
        for n in reversed(arr.shape):
            strides.append(acc)
            acc *= n
        w = self.out.write
        self._global("torch._utils", "_rebuild_tensor_v2")
        w(b"(")  # the arguments tuple
        w(b"(")  # the persistent id tuple
        self._str("storage")
        self._global("torch", storage_type)
        self._str(str(key))
        self._str("cpu")
        self._int(int(arr.size))
        w(b"t" + b"Q")  # TUPLE, BINPERSID
        self._int(0)
        self._tuple(tuple(int(n) for n in arr.shape), where)
        self._tuple(tuple(reversed(strides)), where)
        w(b"\x89")  # requires_grad False
        self._global("collections", "OrderedDict")
        w(b")R")  # OrderedDict(): no backward hooks
        w(b"tR")

    def _save(self, obj: Any, where: str) -> None:
        w = self.out.write
        if obj is None:
            w(b"N")
        elif obj is True or isinstance(obj, np.bool_) and bool(obj):
            w(b"\x88")
        elif obj is False or isinstance(obj, np.bool_):
            w(b"\x89")
        elif isinstance(obj, int | np.integer):
            self._int(int(obj))
        elif isinstance(obj, float | np.floating) and not isinstance(obj, np.ndarray):
            w(b"G" + struct.pack(">d", float(obj)))
        elif isinstance(obj, str):
            self._str(str(obj))
        elif isinstance(obj, np.ndarray) or (
            hasattr(obj, "__array__") and hasattr(obj, "shape") and hasattr(obj, "dtype")
        ):
            self._tensor(obj if isinstance(obj, np.ndarray) else np.asarray(obj), where)
        elif isinstance(obj, tuple | list | Mapping):
            if id(obj) in self._active:
                raise ValueError(f"save_pth: reference cycle at {where}")
            self._active.add(id(obj))
            if isinstance(obj, tuple):
                self._tuple(obj, where)
            elif isinstance(obj, list):
                w(b"]")
                if obj:
                    w(b"(")
                    for i, it in enumerate(obj):
                        self._save(it, f"{where}[{i}]")
                    w(b"e")
            else:
                if isinstance(obj, collections.OrderedDict):
                    self._global("collections", "OrderedDict")
                    w(b")R")
                else:
                    w(b"}")
                self._items(obj, where)
            self._active.discard(id(obj))
        else:
            raise TypeError(
                f"save_pth: cannot store {type(obj).__module__}.{type(obj).__qualname__} at "
                f"{where}; allowed: dict/OrderedDict/list/tuple, int, float, bool, str, None "
                "and numpy (or array-like) arrays"
            )


def _aligned_zipinfo(name: str, offset: int, size: int) -> tuple[zipfile.ZipInfo, bool]:
    """A stored ZipInfo whose data starts on a multiple of ``_ALIGNMENT`` when written at
    ``offset`` (torch pads with an extra field 'FB' the same way)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # the condition zipfile itself uses
    header = 30 + len(name.encode("utf-8")) + (20 if zip64 else 0)
    pad = -(offset + header + 4) % _ALIGNMENT
    info.extra = b"FB" + struct.pack("<H", pad) + b"\0" * pad
    return info, zip64


def _raw_bytes(data: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array (works for dtypes the buffer protocol lacks)."""
    return memoryview(data.reshape(-1).view(np.uint8))


def save_pth(obj: Any, path: PathLike) -> None:
    """Writes ``obj`` as a zip-format ``torch.save`` file that ``torch.load`` reads bit-exactly.

    numpy arrays (or array-likes such as jax arrays) become CPU tensors with the same shape and
    dtype (float32/64/16, bfloat16, int64/32/16/8, uint8, bool, complex); the same array object
    stored twice shares one storage. Containers: dict (``OrderedDict`` kept as such), list,
    tuple; scalars: int, float, bool, str, None (numpy scalars become Python numbers).
    The file is written to a temporary file next to ``path`` and moved into place atomically.
    The record prefix is ``path``'s stem, as torch names it; the bytes are deterministic.
    """
    path = os.fspath(path)
    writer = _PickleWriter()
    pkl = writer.dump(obj)
    prefix = pathlib.Path(path).stem or "archive"

    digest = hashlib.sha1(pkl)
    for data in writer.storages:
        digest.update(_raw_bytes(data))
    serialization_id = str(int(digest.hexdigest(), 16) % 10**40).zfill(40)

    records: list[tuple[str, bytes | np.ndarray]] = [
        ("data.pkl", pkl),
        (".format_version", b"1"),
        (".storage_alignment", str(_ALIGNMENT).encode()),
        ("byteorder", b"little"),
    ]
    records += [(f"data/{i}", data) for i, data in enumerate(writer.storages)]
    records += [("version", b"3\n"), (".data/serialization_id", serialization_id.encode())]

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            with zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                for name, data in records:
                    buf = _raw_bytes(data) if isinstance(data, np.ndarray) else data
                    info, zip64 = _aligned_zipinfo(f"{prefix}/{name}", f.tell(), len(buf))
                    with zf.open(info, "w", force_zip64=zip64) as dst:
                        dst.write(buf)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
