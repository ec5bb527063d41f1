"""LPIPS perceptual distance (Zhang et al. 2018, "vgg" variant as used by taming-transformers).

Backbone: torchvision VGG16 `features` up to relu5_3; taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
Each tap is unit-normalised over channels, squared differences are weighted by the learned 1x1 heads
(`lin0..lin4`, no bias), averaged over space and summed over taps.

Weights are user-supplied (nothing is downloadable offline): `config.vqgan.loss.vgg_weights` is a comma-
separated list of files whose keys are merged:
  * the torchvision VGG16 state dict (`features.{i}.weight/bias`, e.g. vgg16-397923af.pth), or an lpips
    package full state dict (`net.slice{k}.{i}.weight/bias`);
  * the LPIPS linear heads (`lin{k}.model.1.weight` [1,C,1,1], the lpips / taming `vgg.pth`).
Each file is a PyTorch .pth/.ckpt (read with the torch-free `convert/torch_pickle.py`) or an .npz with
the same key names.
"""
import re
from typing import Any, Dict

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax.models.vqgan_layers import CONV_AXES

# (torchvision features index, out channels); "M" = 2x2 max pool; taps after the marked convs' relus.
_VGG16 = [(0, 64), (2, 64), "M", (5, 128), (7, 128), "M", (10, 256), (12, 256), (14, 256), "M",
          (17, 512), (19, 512), (21, 512), "M", (24, 512), (26, 512), (28, 512)]
_TAPS = (2, 7, 14, 21, 28)
TAP_CHANNELS = (64, 128, 256, 512, 512)
_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class LPIPS(nn.Module):
  """(x, y) in [-1,1], [B,H,W,3] -> float32 distance [B]."""
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _features(self, x):
    feats = []
    for layer in _VGG16:
      if layer == "M":
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      idx, ch = layer
      x = nn.relu(nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=self.param_dtype,
                          name=f"conv_{idx}",
                          kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))(x))
      if idx in _TAPS:
        feats.append(x.astype(jnp.float32))
    return feats

  @nn.compact
  def __call__(self, x, y):
    shift, scale = jnp.asarray(_SHIFT), jnp.asarray(_SCALE)
    b = x.shape[0]
    both = jnp.concatenate([x, y], 0).astype(jnp.float32)
    feats = self._features(((both - shift) / scale).astype(self.dtype))
    total = jnp.zeros((b,), jnp.float32)
    for k, f in enumerate(feats):
      f = f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + 1e-10)
      diff = (f[:b] - f[b:]) ** 2
      w = self.param(f"lin_{k}", nn.with_logical_partitioning(nn.initializers.ones_init(), ("conv_in",)),
                     (f.shape[-1],), self.param_dtype)
      total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", diff, w.astype(jnp.float32)), axis=(1, 2))
    return total


def _read_file(path) -> Dict[str, np.ndarray]:
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  from magvlt_jax.convert import torch_pickle  # torch-free .pth reader
  return torch_pickle.load_state_dict(path)


def _to_params(sd: Dict[str, np.ndarray], source: str):
  params = {}
  for key, value in sd.items():
    m = (re.fullmatch(r"(?:.*\.)?features\.(\d+)\.(weight|bias)", key)
         or re.fullmatch(r"(?:.*\.)?net\.slice\d\.(\d+)\.(weight|bias)", key))
    if m:
      name = f"conv_{int(m.group(1))}"
      if m.group(2) == "weight":
        params.setdefault(name, {})["kernel"] = np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
      else:
        params.setdefault(name, {})["bias"] = value
      continue
    m = re.fullmatch(r"(?:.*\.)?lins?\.?(\d)\.model\.1\.weight", key)
    if m:
      params[f"lin_{int(m.group(1))}"] = value.reshape(-1)
  expected = ([f"conv_{i}" for i, _ in (l for l in _VGG16 if l != "M")] + [f"lin_{k}" for k in range(5)])
  missing = [k for k in expected if k not in params or (k.startswith("conv") and len(params[k]) != 2)]
  if missing:
    raise ValueError(f"config.vqgan.loss.vgg_weights ({source}): missing LPIPS/VGG16 weights for {missing}; "
                     "give the torchvision vgg16 state dict AND the lpips heads (lin0..lin4), comma-separated")
  return {k: params[k] for k in expected}


def load_params(paths: str, dtype=jnp.float32):
  """Reads `config.vqgan.loss.vgg_weights` (comma-separated files) into LPIPS params, shape-checked."""
  merged = {}
  for p in [p.strip() for p in paths.split(",") if p.strip()]:
    merged.update(_read_file(p))
  params = _to_params(merged, paths)
  want = jax.eval_shape(lambda: nn.meta.unbox(LPIPS().init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.zeros((1, 32, 32, 3)))["params"]))
  bad = [f"{'/'.join(str(getattr(q, 'key', q)) for q in path)}: {np.shape(v)} vs {w.shape}"
         for (path, v), w in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(want))
         if tuple(np.shape(v)) != tuple(w.shape)]
  if bad:
    raise ValueError(f"config.vqgan.loss.vgg_weights ({paths}): mis-shaped LPIPS weights: {bad}")
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
