"""Read (and write) PyTorch checkpoints without torch and without executing pickle code.

Supported on read:
  * the zip format of torch>=1.6 (`.pth`, `.pt`, `.ckpt`, `.bin`): an archive `<prefix>/data.pkl`
    plus one raw little-endian record `<prefix>/data/<key>` per storage;
  * the legacy format (torch<1.6 or `_use_new_zipfile_serialization=False`): magic number,
    protocol, sys-info pickles, the object pickle, the pickled list of storage keys, then per
    storage an int64 element count followed by the raw data.
TorchScript archives (OpenAI CLIP `.pt` jit files) are zips whose `data.pkl` references
`torch.jit` classes: they are rejected with an error that asks for a plain state dict.

The unpickler only resolves an allow-list of globals (torch tensor/parameter rebuild functions,
torch storage and dtype names, `collections.OrderedDict`, a few inert builtins) and maps them to
numpy constructions. Anything else is refused (`strict=True`) or replaced by an inert
`OpaqueObject` that merely records its name, arguments and state (`strict=False`, so the extra
metadata of e.g. Lightning `.ckpt` files does not stop us reaching the tensors). No object from
the file is ever called.

`torch_pickle_writer.save_state_dict_zip` / `save_state_dict_legacy` write name -> array dicts in
the same formats, so tests can build "PyTorch" checkpoints without torch.
"""
import collections
import io
import os
import pickle
import struct
import zipfile
from typing import Any, Dict, Mapping

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

# torch storage class name -> numpy dtype (little-endian on disk).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"), "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"), "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
    "ComplexFloatStorage": np.dtype("<c8"), "ComplexDoubleStorage": np.dtype("<c16"),
}
_DTYPE_TO_STORAGE = {v: k for k, v in _STORAGE_DTYPES.items()}
_STORAGE_DTYPES["UntypedStorage"] = np.dtype("u1")
_TORCH_DTYPES = {
    "float64": "<f8", "double": "<f8", "float32": "<f4", "float": "<f4", "float16": "<f2",
    "half": "<f2", "bfloat16": ml_dtypes.bfloat16, "int64": "<i8", "long": "<i8", "int32": "<i4",
    "int": "<i4", "int16": "<i2", "short": "<i2", "int8": "i1", "uint8": "u1", "bool": "?",
    "uint16": "<u2", "uint32": "<u4", "uint64": "<u8", "complex64": "<c8", "complex128": "<c16",
    "float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e5m2": ml_dtypes.float8_e5m2,
}


class TorchPickleError(ValueError):
  """A checkpoint that cannot be read safely (unsupported or malformed)."""


class OpaqueObject:
  """Inert stand-in for a global the allow-list does not know. Never runs file code."""
  _qualname = "?"

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

  def __setstate__(self, state):
    self.state = state

  def __setitem__(self, key, value):
    self.items.append((key, value))

  def append(self, value):
    self.items.append(value)

  def extend(self, values):
    self.items.extend(values)

  def __repr__(self):
    return f"OpaqueObject({self._qualname})"


class _StorageType:
  def __init__(self, name):
    self.name, self.dtype = name, _STORAGE_DTYPES[name]


class _LazyStorage:
  """A storage referenced by the pickle; its bytes are attached after unpickling."""

  def __init__(self, key, dtype, numel):
    self.key, self.dtype, self.numel, self.data, self.view = key, dtype, int(numel), None, None


class _LazyTensor:
  def __init__(self, storage, offset, size, stride, dtype=None):
    self.storage, self.offset, self.dtype = storage, int(offset), dtype
    self.size, self.stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)


def _rebuild_tensor(storage, offset, size, stride, *unused):
  if not isinstance(storage, _LazyStorage):
    raise TorchPickleError(f"tensor rebuild got {type(storage).__name__}, expected a storage")
  return _LazyTensor(storage, offset, size, stride)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, *unused):
  """torch>=2.1 for dtypes without a legacy storage class: bytes of an UntypedStorage + dtype."""
  del requires_grad, hooks
  if not isinstance(dtype, np.dtype):
    raise TorchPickleError(f"_rebuild_tensor_v3 with unsupported dtype {dtype!r}")
  tensor = _rebuild_tensor(storage, offset, size, stride)
  tensor.dtype = dtype
  return tensor


def _rebuild_parameter(data, *unused):
  return data


def _rebuild_from_type_v2(func, new_type, args, state):
  del new_type, state  # torch.Tensor / nn.Parameter subclass info: irrelevant for arrays.
  if func not in (_rebuild_tensor, _rebuild_tensor_v3, _rebuild_parameter):
    raise TorchPickleError(f"_rebuild_from_type_v2 with unsupported function {func!r}")
  return func(*args)


def _codecs_encode(text, encoding="utf-8"):
  if encoding not in ("latin1", "latin-1"):
    raise TorchPickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
  return text.encode("latin1")


class _Marker:
  def __init__(self, name):
    self.name = name


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
    ("torch", "Tensor"): _Marker("torch.Tensor"),
    ("torch.nn.parameter", "Parameter"): _Marker("torch.nn.Parameter"),
    ("torch", "Size"): tuple,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice, ("builtins", "complex"): complex,
    ("__builtin__", "set"): set,
}


class _RestrictedUnpickler(pickle.Unpickler):
  """Resolves only allow-listed globals; persistent ids become lazy storages."""

  def __init__(self, file, strict):
    super().__init__(file, encoding="latin1")
    self.strict = strict
    self.storages: Dict[str, _LazyStorage] = {}

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if module == "torch" and name in _TORCH_DTYPES:
      return np.dtype(_TORCH_DTYPES[name])
    if module.startswith("torch.jit") or module == "__torch__" or module.startswith("__torch__."):
      raise TorchPickleError(
          f"{module}.{name}: this is a TorchScript archive; save a plain state dict instead "
          "(e.g. torch.save(model.state_dict(), path)).")
    if self.strict:
      raise TorchPickleError(f"checkpoint references {module}.{name}, which is not on the "
                             "allow-list (load with strict=False to keep it as OpaqueObject)")
    return type(name, (OpaqueObject,), {"_qualname": f"{module}.{name}"})

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
      raise TorchPickleError(f"unsupported persistent id {pid!r}")
    storage_type, key, _, numel = pid[1:5]
    if isinstance(storage_type, np.dtype):  # torch>=2 may pickle a dtype instead of a class
      dtype = storage_type
    elif isinstance(storage_type, _StorageType):
      dtype = storage_type.dtype
    else:
      raise TorchPickleError(f"unsupported storage type {storage_type!r}")
    key = str(key)
    if key not in self.storages:
      self.storages[key] = _LazyStorage(key, dtype, numel)
    storage = self.storages[key]
    view = pid[5] if len(pid) > 5 else None
    if view is not None:  # very old files: (view_key, offset, size) of a root storage
      sub = _LazyStorage(str(view[0]), dtype, view[2])
      sub.view = (storage, int(view[1]))
      return sub
    return storage


def _materialise(t: _LazyTensor) -> np.ndarray:
  st = t.storage
  base, extra = (st.view[0], st.view[1]) if st.view is not None else (st, 0)
  if base.data is None:
    raise TorchPickleError(f"storage {base.key} has no data in the file")
  data = base.data
  if t.dtype is not None and t.dtype != data.dtype:  # v3: reinterpret the untyped bytes
    if data.dtype != np.uint8 or data.size % t.dtype.itemsize:
      raise TorchPickleError(f"cannot view storage {base.key} ({data.dtype}) as {t.dtype}")
    data = data.view(t.dtype)
  offset = extra + t.offset
  numel = int(np.prod(t.size)) if t.size else 1
  if len(t.size) != len(t.stride) or any(s < 0 for s in t.size + t.stride):
    raise TorchPickleError(f"bad tensor geometry size={t.size} stride={t.stride}")
  # Bounds check before as_strided: a malformed file must not read outside the storage.
  last = offset + sum((n - 1) * s for n, s in zip(t.size, t.stride)) if numel else offset - 1
  if offset < 0 or last >= data.size:
    raise TorchPickleError(f"tensor (offset {offset}, size {t.size}, stride {t.stride}) "
                           f"exceeds its storage of {data.size} elements")
  if numel == 0:
    return np.zeros(t.size, data.dtype)
  flat = data[offset:]
  if not t.size:  # as_strided treats shape () as "keep the input shape"
    return np.array(flat[0])
  item = flat.dtype.itemsize
  arr = np.lib.stride_tricks.as_strided(flat, t.size, tuple(s * item for s in t.stride))
  return np.array(arr, copy=True)


def _resolve(obj):
  """Replaces lazy tensors by numpy arrays throughout a container tree."""
  if isinstance(obj, _LazyTensor):
    return _materialise(obj)
  if isinstance(obj, dict):
    out = type(obj)() if type(obj) in (dict, collections.OrderedDict) else {}
    for k, v in obj.items():
      out[k] = _resolve(v)
    return out
  if isinstance(obj, list):
    return [_resolve(v) for v in obj]
  if isinstance(obj, tuple):
    return tuple(_resolve(v) for v in obj)
  if isinstance(obj, OpaqueObject):
    obj.args = _resolve(obj.args)
    obj.state = _resolve(obj.state)
    obj.items = _resolve(obj.items)
  return obj


def _load_zip(path, strict):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkls = [n for n in names if n.endswith("data.pkl") and n.count("/") <= 1]
    if not pkls:
      raise TorchPickleError(f"{path}: zip archive without data.pkl (not a torch checkpoint)")
    prefix = pkls[0][: -len("data.pkl")]
    if any(n.startswith(prefix + "code/") or n.startswith(prefix + "constants.pkl") for n in names):
      raise TorchPickleError(f"{path}: TorchScript (jit) archive; save a plain state dict instead "
                             "(torch.save(model.state_dict(), path)).")
    byteorder = "little"
    if prefix + "byteorder" in names:
      byteorder = zf.read(prefix + "byteorder").decode().strip()
    up = _RestrictedUnpickler(io.BytesIO(zf.read(pkls[0])), strict)
    obj = up.load()
    for key, st in up.storages.items():
      record = f"{prefix}data/{key}"
      if record not in names:
        raise TorchPickleError(f"{path}: missing storage record {record}")
      raw = zf.read(record)
      dtype = st.dtype if byteorder == "little" else st.dtype.newbyteorder(">")
      if len(raw) < st.numel * dtype.itemsize:
        raise TorchPickleError(f"{path}: storage {key} is truncated")
      st.data = np.frombuffer(raw, dtype, count=st.numel).astype(st.dtype, copy=False)
  return _resolve(obj)


def _load_legacy(path, strict):
  with open(path, "rb") as f:
    try:
      magic = _RestrictedUnpickler(f, True).load()
    except Exception as e:  # not a pickle at all
      raise TorchPickleError(f"{path}: neither a zip nor a legacy torch checkpoint ({e})") from e
    if magic != _LEGACY_MAGIC:
      raise TorchPickleError(f"{path}: not a torch checkpoint (bad magic number {magic!r})")
    protocol = _RestrictedUnpickler(f, True).load()
    if protocol != _LEGACY_PROTOCOL:
      raise TorchPickleError(f"{path}: unsupported legacy protocol {protocol}")
    sys_info = _RestrictedUnpickler(f, True).load()
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    up = _RestrictedUnpickler(f, strict)
    obj = up.load()
    keys = _RestrictedUnpickler(f, True).load()
    for key in keys:
      count = struct.unpack("<q" if little else ">q", f.read(8))[0]
      st = up.storages.get(str(key))
      if st is None:
        raise TorchPickleError(f"{path}: storage {key} is not referenced by the pickle")
      dtype = st.dtype if little else st.dtype.newbyteorder(">")
      raw = f.read(count * dtype.itemsize)
      if len(raw) != count * dtype.itemsize:
        raise TorchPickleError(f"{path}: storage {key} is truncated")
      st.data = np.frombuffer(raw, dtype).astype(st.dtype, copy=False)
  return _resolve(obj)


def load(path: str, *, strict: bool = False) -> Any:
  """Loads any torch.save'd object tree; tensors become numpy arrays (see module doc)."""
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"torch checkpoint not found: {path}")
  if zipfile.is_zipfile(path):
    return _load_zip(path, strict)
  return _load_legacy(path, strict)


def _flatten(tree, prefix, out):
  for k, v in tree.items():
    name = f"{prefix}{k}"
    if isinstance(v, np.ndarray):
      out[name] = v
    elif isinstance(v, Mapping):
      _flatten(v, name + ".", out)


def load_state_dict(path: str, *, key: str = "auto", strict: bool = False) -> Dict[str, np.ndarray]:
  """Returns the flat name -> np.ndarray state dict of a checkpoint.

  key: 'auto' descends into a nested 'state_dict' / 'model' / 'model_state_dict' / 'module' entry
  when the top level is a wrapper (Lightning, open_clip, training scripts); '' uses the top level;
  any other string names the entry to use. Nested dicts are flattened with '.' separators and
  non-array values (hyper-parameters, counters) are dropped.
  """
  obj = load(path, strict=strict)
  if isinstance(obj, np.ndarray):
    return {"": obj}
  if not isinstance(obj, Mapping):
    raise TorchPickleError(f"{path}: top-level object is {type(obj).__name__}, not a dict")
  if key == "auto":
    for cand in ("state_dict", "model_state_dict", "model", "module"):
      if isinstance(obj.get(cand), Mapping):
        obj = obj[cand]
        break
  elif key:
    if not isinstance(obj.get(key), Mapping):
      raise KeyError(f"{path}: no dict entry {key!r}; top-level keys: {sorted(map(str, obj))}")
    obj = obj[key]
  out: Dict[str, np.ndarray] = collections.OrderedDict()
  _flatten(obj, "", out)
  if not out:
    raise TorchPickleError(f"{path}: no tensors found (top-level keys: {sorted(map(str, obj))})")
  return out

