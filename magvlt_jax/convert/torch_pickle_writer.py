"""Writes PyTorch state dicts (zip and legacy formats) without torch, so tests and tools can make
checkpoints in the exact layouts `torch_pickle.load` / `torch.load` read."""
import collections
import io
import pickle
import struct
import zipfile
from typing import Any, Mapping

import numpy as np

from magvlt_jax.convert.torch_pickle import _DTYPE_TO_STORAGE, _LEGACY_MAGIC, _LEGACY_PROTOCOL


class _GlobalRef:
  """A torch global written by name (GLOBAL opcode); callable only to satisfy the pickler."""

  def __init__(self, module, name):
    self.module, self.name = module, name

  def __call__(self, *args):
    raise TypeError(f"{self.module}.{self.name} is a placeholder for writing pickles")


class _TensorRef:
  """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, {})."""

  def __init__(self, key, storage_name, numel, offset, size, stride):
    self.key, self.storage_name, self.numel = key, storage_name, numel
    self.offset, self.size, self.stride = offset, tuple(size), tuple(stride)

  def __reduce__(self):
    pid = _PersistentStorage(self.key, self.storage_name, self.numel)
    args = (pid, self.offset, self.size, self.stride, False, collections.OrderedDict())
    return (_GlobalRef("torch._utils", "_rebuild_tensor_v2"), args)


class _PersistentStorage:
  def __init__(self, key, storage_name, numel):
    self.key, self.storage_name, self.numel = key, storage_name, numel


class _TorchPickler(pickle._Pickler):  # pure-python pickler: lets us emit torch GLOBALs
  dispatch = dict(pickle._Pickler.dispatch)

  def _save_ref(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode("utf-8"))

  dispatch[_GlobalRef] = _save_ref

  def persistent_id(self, obj):
    if isinstance(obj, _PersistentStorage):
      return ("storage", _GlobalRef("torch", obj.storage_name), obj.key, "cpu", obj.numel)
    return None


def _dumps(obj) -> bytes:
  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def _prepare(state_dict: Mapping[str, Any]):
  """name -> array dict to (OrderedDict of _TensorRef, {key: contiguous array})."""
  refs, storages = collections.OrderedDict(), {}
  for i, (name, value) in enumerate(state_dict.items()):
    arr = np.array(value, order="C", copy=True)  # (ascontiguousarray would make 0-d arrays 1-d)
    dtype = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    if dtype not in _DTYPE_TO_STORAGE:
      raise TypeError(f"state dict entry {name!r}: dtype {arr.dtype} has no torch storage type")
    arr = arr.astype(dtype, copy=False)
    stride = tuple(s // arr.itemsize for s in arr.strides) if arr.size else (1,) * arr.ndim
    storages[str(i)] = arr
    refs[name] = _TensorRef(str(i), _DTYPE_TO_STORAGE[dtype], arr.size, 0, arr.shape, stride)
  return refs, storages


def save_state_dict_zip(path: str, state_dict: Mapping[str, Any], *,
                        wrap_key: str = "", archive_name: str = "archive") -> None:
  """Writes name -> array as a torch>=1.6 zip checkpoint (readable by torch.load and `load`).

  wrap_key: if set, saves {wrap_key: state_dict} (e.g. 'state_dict' like Lightning).
  """
  refs, storages = _prepare(state_dict)
  obj = {wrap_key: refs} if wrap_key else refs
  with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
    zf.writestr(f"{archive_name}/data.pkl", _dumps(obj))
    zf.writestr(f"{archive_name}/byteorder", "little")
    for key, arr in storages.items():
      zf.writestr(f"{archive_name}/data/{key}", arr.tobytes())
    zf.writestr(f"{archive_name}/version", "3\n")


def save_state_dict_legacy(path: str, state_dict: Mapping[str, Any]) -> None:
  """Writes name -> array in the legacy (non-zip) torch format."""
  refs, storages = _prepare(state_dict)
  sys_info = {"protocol_version": _LEGACY_PROTOCOL, "little_endian": True,
              "type_sizes": {"short": 2, "int": 4, "long": 8}}
  with open(path, "wb") as f:
    for header in (_LEGACY_MAGIC, _LEGACY_PROTOCOL, sys_info):
      f.write(pickle.dumps(header, protocol=2))
    f.write(_dumps(refs))
    keys = sorted(storages)
    f.write(pickle.dumps(keys, protocol=2))
    for key in keys:
      f.write(struct.pack("<q", storages[key].size))
      f.write(storages[key].tobytes())
