"""FID Inception-v3: pytorch-fid key layout, conversion checks, resize semantics, forward."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from magvlt_jax.convert import inception_fid, torch_pickle_writer
from magvlt_jax.models import inception


def _pytorch_fid_shapes():
  """The pytorch-fid FIDInceptionV3 state dict layout, written out independently of our model."""
  shapes = {}

  def conv(name, cin, cout, kh, kw=None):
    shapes[f"{name}.conv.weight"] = (cout, cin, kh, kw or kh)
    for s in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{name}.bn.{s}"] = (cout,)

  conv("Conv2d_1a_3x3", 3, 32, 3); conv("Conv2d_2a_3x3", 32, 32, 3)
  conv("Conv2d_2b_3x3", 32, 64, 3); conv("Conv2d_3b_1x1", 64, 80, 1)
  conv("Conv2d_4a_3x3", 80, 192, 3)
  for m, cin, pf in (("Mixed_5b", 192, 32), ("Mixed_5c", 256, 64), ("Mixed_5d", 288, 64)):
    conv(f"{m}.branch1x1", cin, 64, 1); conv(f"{m}.branch5x5_1", cin, 48, 1)
    conv(f"{m}.branch5x5_2", 48, 64, 5); conv(f"{m}.branch3x3dbl_1", cin, 64, 1)
    conv(f"{m}.branch3x3dbl_2", 64, 96, 3); conv(f"{m}.branch3x3dbl_3", 96, 96, 3)
    conv(f"{m}.branch_pool", cin, pf, 1)
  conv("Mixed_6a.branch3x3", 288, 384, 3); conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
  conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3); conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
  for m, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
    conv(f"{m}.branch1x1", 768, 192, 1); conv(f"{m}.branch7x7_1", 768, c7, 1)
    conv(f"{m}.branch7x7_2", c7, c7, 1, 7); conv(f"{m}.branch7x7_3", c7, 192, 7, 1)
    conv(f"{m}.branch7x7dbl_1", 768, c7, 1); conv(f"{m}.branch7x7dbl_2", c7, c7, 7, 1)
    conv(f"{m}.branch7x7dbl_3", c7, c7, 1, 7); conv(f"{m}.branch7x7dbl_4", c7, c7, 7, 1)
    conv(f"{m}.branch7x7dbl_5", c7, 192, 1, 7); conv(f"{m}.branch_pool", 768, 192, 1)
  conv("Mixed_7a.branch3x3_1", 768, 192, 1); conv("Mixed_7a.branch3x3_2", 192, 320, 3)
  conv("Mixed_7a.branch7x7x3_1", 768, 192, 1); conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
  conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1); conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
  for m, cin in (("Mixed_7b", 1280), ("Mixed_7c", 2048)):
    conv(f"{m}.branch1x1", cin, 320, 1); conv(f"{m}.branch3x3_1", cin, 384, 1)
    conv(f"{m}.branch3x3_2a", 384, 384, 1, 3); conv(f"{m}.branch3x3_2b", 384, 384, 3, 1)
    conv(f"{m}.branch3x3dbl_1", cin, 448, 1); conv(f"{m}.branch3x3dbl_2", 448, 384, 3)
    conv(f"{m}.branch3x3dbl_3a", 384, 384, 1, 3); conv(f"{m}.branch3x3dbl_3b", 384, 384, 3, 1)
    conv(f"{m}.branch_pool", cin, 192, 1)
  shapes["fc.weight"], shapes["fc.bias"] = (1008, 2048), (1008,)
  return shapes


def _random_state_dict(seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for k, shape in _pytorch_fid_shapes().items():
    if k.endswith("conv.weight") or k == "fc.weight":
      fan_in = int(np.prod(shape[1:]))
      sd[k] = (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    elif k.endswith("running_var") or k.endswith("bn.weight"):  # keep the signal alive
      sd[k] = rng.uniform(0.5, 1.5, size=shape).astype(np.float32)
    else:
      sd[k] = (rng.normal(size=shape) * 0.1).astype(np.float32)
    if k.endswith("running_var"):
      sd[k.replace("running_var", "num_batches_tracked")] = np.array(0, np.int64)
  return sd


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  sd = _random_state_dict()
  path = str(tmp_path_factory.mktemp("fid") / "pt_inception-2015-12-05-6726825d.pth")
  torch_pickle_writer.save_state_dict_zip(path, sd)
  return sd, path, inception_fid.load_params(path)


def test_layout_matches_pytorch_fid():
  assert inception_fid.expected_torch_shapes() == _pytorch_fid_shapes()


def test_load_uses_every_key_and_checks_shapes(weights, tmp_path):
  sd, path, params = weights
  np.testing.assert_array_equal(params["Mixed_6b"]["branch7x7_2"]["kernel"],
                                sd["Mixed_6b.branch7x7_2.conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["fc"]["kernel"], sd["fc.weight"].T)
  np.testing.assert_array_equal(params["Mixed_7c"]["branch_pool"]["var"],
                                sd["Mixed_7c.branch_pool.bn.running_var"])
  npz = str(tmp_path / "fid.npz")
  inception_fid.export_npz(path, npz)
  again = inception_fid.load_params(npz)
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, params, again)))

  extra = dict(sd, **{"AuxLogits.fc.weight": np.zeros((2, 2), np.float32)})
  with pytest.raises(ValueError, match=r"1 unused \['AuxLogits.fc.weight'\]"):
    inception_fid.convert_state_dict(extra)
  missing = {k: v for k, v in sd.items() if k != "Mixed_5b.branch_pool.bn.bias"}
  with pytest.raises(ValueError, match=r"1 missing \['Mixed_5b.branch_pool.bn.bias'\]"):
    inception_fid.convert_state_dict(missing)
  wrong = dict(sd, **{"fc.weight": np.zeros((1000, 2048), np.float32)})
  with pytest.raises(ValueError, match=r"fc.weight: file \(1000, 2048\)"):
    inception_fid.convert_state_dict(wrong)


def test_missing_weights_name_the_config_key(tmp_path):
  with pytest.raises(ValueError, match="config.eval.inception_weights"):
    inception_fid.load_params("")
  with pytest.raises(FileNotFoundError, match="config.eval.inception_weights"):
    inception_fid.load_params(str(tmp_path / "absent.pth"))


def _torch_conv_bn_relu(x_nchw, w, gamma, beta, mean, var, stride, pad):
  """Direct NCHW conv (PyTorch semantics) + eval BatchNorm(eps=1e-3) + ReLU in numpy."""
  ph, pw = pad
  x = np.pad(x_nchw, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
  o, _, kh, kw = w.shape
  ho, wo = (x.shape[2] - kh) // stride + 1, (x.shape[3] - kw) // stride + 1
  y = np.zeros((x.shape[0], o, ho, wo))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, :, i:i + stride * ho:stride, j:j + stride * wo:stride]
      y += np.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
  y = (y - mean[:, None, None]) / np.sqrt(var[:, None, None] + 1e-3) * gamma[:, None, None]
  return np.maximum(y + beta[:, None, None], 0.0)


@pytest.mark.parametrize("name,kernel,stride,pad,cin", [
    ("Conv2d_1a_3x3", (3, 3), 2, (0, 0), 3),
    ("Mixed_6b.branch7x7_2", (1, 7), 1, (0, 3), 128),
])
def test_conv_bn_matches_pytorch_semantics(weights, name, kernel, stride, pad, cin):
  sd, _, params = weights
  p = params
  for part in name.split("."):
    p = p[part]
  x = np.random.default_rng(1).normal(size=(2, 9, 11, cin)).astype(np.float32)
  layer = inception.BasicConv2d(p["kernel"].shape[-1], kernel, stride, pad)
  got = layer.apply({"params": p}, jnp.asarray(x))
  bn = [sd[f"{name}.bn.{s}"] for s in ("weight", "bias", "running_mean", "running_var")]
  want = _torch_conv_bn_relu(x.transpose(0, 3, 1, 2), sd[f"{name}.conv.weight"], *bn, stride, pad)
  np.testing.assert_allclose(np.asarray(got), want.transpose(0, 2, 3, 1), atol=2e-4, rtol=1e-4)


def _torch_bilinear(x, size):
  """F.interpolate(x, (size, size), mode='bilinear', align_corners=False), NHWC numpy."""
  def axis_weights(n_in):
    src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(int), n_in - 1)
    hi = np.minimum(lo + 1, n_in - 1)
    m = np.zeros((size, n_in))
    np.add.at(m, (np.arange(size), lo), 1 - (src - lo))
    np.add.at(m, (np.arange(size), hi), src - lo)
    return m
  mh, mw = axis_weights(x.shape[1]), axis_weights(x.shape[2])
  return np.einsum("ih,bhwc,jw->bijc", mh, x, mw, optimize=True)


@pytest.mark.parametrize("in_hw", [(64, 48), (320, 333)])
def test_resize_matches_torch_bilinear(in_hw):
  x = np.random.default_rng(2).uniform(size=(1, *in_hw, 3)).astype(np.float32)
  got = inception.resize_bilinear(jnp.asarray(x), 299)
  np.testing.assert_allclose(np.asarray(got), _torch_bilinear(x, 299), atol=1e-4)  # torch indexes in float32 too


def test_forward_outputs_pool3_and_logits(weights):
  params = weights[2]
  model = inception.FIDInceptionV3(image_size=75)  # real FID uses 299; 75 keeps CPU tests fast
  images = np.random.default_rng(3).integers(0, 256, size=(2, 40, 56, 3), dtype=np.uint8)
  out = jax.jit(model.apply)({"params": params}, images)
  assert out["pool3"].shape == (2, inception.FEATURE_DIM)
  assert out["logits"].shape == (2, inception.NUM_LOGITS)
  assert out["pool3"].dtype == jnp.float32 and np.isfinite(np.asarray(out["logits"])).all()
  assert float(jnp.min(out["pool3"])) >= 0.0  # mean of ReLU outputs
  want = np.asarray(out["pool3"]) @ params["fc"]["kernel"] + params["fc"]["bias"]
  np.testing.assert_allclose(np.asarray(out["logits"]), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(out["logits_unbiased"]), want - params["fc"]["bias"],
                             rtol=1e-4, atol=1e-4)
  assert not np.allclose(out["pool3"][0], out["pool3"][1])


@pytest.mark.slow
def test_full_size_extractor_at_299(weights):
  from magvlt_jax.evaluation import image_metrics
  _, path, _ = weights
  ex = image_metrics.inception_extractor(path, batch_size=2)
  images = np.random.default_rng(4).integers(0, 256, size=(3, 64, 64, 3), dtype=np.uint8)
  out = ex(images)
  assert out["features"].shape == (3, 2048) and out["logits"].shape == (3, 1008)
  assert np.isfinite(out["features"]).all()
  assert (ex.fd_name, ex.is_name) == ("fid", "is")
