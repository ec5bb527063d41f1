"""The FID Inception-v3 (pytorch-fid's FIDInceptionA/C/E variant of the TF 2015-12-05 graph) in Flax.

NHWC. Submodule names follow the pytorch-fid state dict (`Mixed_5b.branch1x1.conv.weight` ->
params['Mixed_5b']['branch1x1']['kernel']), so `convert/inception_fid.py` is a mechanical map.
Batch-norm statistics are stored as (frozen) params: this network is inference-only.

Preprocessing is pytorch-fid's: uint8 -> [0, 1], bilinear resize to 299x299 without antialiasing
(F.interpolate(..., align_corners=False)), then 2x - 1.
Outputs (float32): 'pool3' [B, 2048] (FID features), 'logits' [B, 1008] (fc with bias) and
'logits_unbiased' [B, 1008] (fc without bias: what the Inception Score is defined on).
"""
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
FID_IMAGE_SIZE = 299
NUM_LOGITS = 1008
FEATURE_DIM = 2048


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm(eps=1e-3, running stats) + ReLU, as torchvision's BasicConv2d."""
  features: int
  kernel: Tuple[int, int] = (1, 1)
  strides: int = 1
  padding: Tuple[int, int] = (0, 0)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_ch = x.shape[-1]
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (*self.kernel, in_ch, self.features),
                        self.param_dtype)
    scale = self.param("scale", nn.initializers.ones, (self.features,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (self.features,), self.param_dtype)
    mean = self.param("mean", nn.initializers.zeros, (self.features,), self.param_dtype)
    var = self.param("var", nn.initializers.ones, (self.features,), self.param_dtype)
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.strides, self.strides),
        ((ph, ph), (pw, pw)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
        preferred_element_type=jnp.float32)
    # Fold BN in float32 (statistics of a frozen net) and apply once.
    mul = scale.astype(jnp.float32) * jax.lax.rsqrt(var.astype(jnp.float32) + 1e-3)
    add = bias.astype(jnp.float32) - mean.astype(jnp.float32) * mul
    return nn.relu(y * mul + add).astype(self.dtype)


def _avg_pool_same(x):  # FID blocks: avg_pool(3, 1, 1, count_include_pad=False)
  return nn.avg_pool(x, (3, 3), (1, 1), ((1, 1), (1, 1)), count_include_pad=False)


def _max_pool(x, stride=2, pad=0):
  return nn.max_pool(x, (3, 3), (stride, stride), ((pad, pad), (pad, pad)))


class _Block(nn.Module):
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def conv(self, name, features, kernel=(1, 1), strides=1, padding=(0, 0)):
    return BasicConv2d(features, kernel, strides, padding, dtype=self.dtype,
                       param_dtype=self.param_dtype, name=name)


class FIDInceptionA(_Block):
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 64)(x)
    b5 = self.conv("branch5x5_2", 64, (5, 5), padding=(2, 2))(self.conv("branch5x5_1", 48)(x))
    b3 = self.conv("branch3x3dbl_1", 64)(x)
    b3 = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(b3)
    b3 = self.conv("branch3x3dbl_3", 96, (3, 3), padding=(1, 1))(b3)
    bp = self.conv("branch_pool", self.pool_features)(_avg_pool_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3", 384, (3, 3), strides=2)(x)
    bd = self.conv("branch3x3dbl_1", 64)(x)
    bd = self.conv("branch3x3dbl_2", 96, (3, 3), padding=(1, 1))(bd)
    bd = self.conv("branch3x3dbl_3", 96, (3, 3), strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool(x)], axis=-1)


class FIDInceptionC(_Block):
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    row, col = ((1, 7), (0, 3)), ((7, 1), (3, 0))  # (kernel, padding) pairs
    b1 = self.conv("branch1x1", 192)(x)
    b7 = self.conv("branch7x7_1", c7)(x)
    b7 = self.conv("branch7x7_2", c7, row[0], padding=row[1])(b7)
    b7 = self.conv("branch7x7_3", 192, col[0], padding=col[1])(b7)
    bd = self.conv("branch7x7dbl_1", c7)(x)
    for i, (out, (k, p)) in enumerate([(c7, col), (c7, row), (c7, col), (192, row)]):
      bd = self.conv(f"branch7x7dbl_{i + 2}", out, k, padding=p)(bd)
    bp = self.conv("branch_pool", 192)(_avg_pool_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):

  @nn.compact
  def __call__(self, x):
    b3 = self.conv("branch3x3_1", 192)(x)
    b3 = self.conv("branch3x3_2", 320, (3, 3), strides=2)(b3)
    b7 = self.conv("branch7x7x3_1", 192)(x)
    b7 = self.conv("branch7x7x3_2", 192, (1, 7), padding=(0, 3))(b7)
    b7 = self.conv("branch7x7x3_3", 192, (7, 1), padding=(3, 0))(b7)
    b7 = self.conv("branch7x7x3_4", 192, (3, 3), strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool(x)], axis=-1)


class FIDInceptionE(_Block):
  pool: str = "avg"  # Mixed_7b (E_1): avg (count_include_pad=False); Mixed_7c (E_2): max

  @nn.compact
  def __call__(self, x):
    b1 = self.conv("branch1x1", 320)(x)
    b3 = self.conv("branch3x3_1", 384)(x)
    b3 = jnp.concatenate([self.conv("branch3x3_2a", 384, (1, 3), padding=(0, 1))(b3),
                          self.conv("branch3x3_2b", 384, (3, 1), padding=(1, 0))(b3)], axis=-1)
    bd = self.conv("branch3x3dbl_1", 448)(x)
    bd = self.conv("branch3x3dbl_2", 384, (3, 3), padding=(1, 1))(bd)
    bd = jnp.concatenate([self.conv("branch3x3dbl_3a", 384, (1, 3), padding=(0, 1))(bd),
                          self.conv("branch3x3dbl_3b", 384, (3, 1), padding=(1, 0))(bd)], axis=-1)
    pooled = _avg_pool_same(x) if self.pool == "avg" else _max_pool(x, stride=1, pad=1)
    bp = self.conv("branch_pool", 192)(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class _Logits(nn.Module):
  """The 1008-way head. The original Inception Score code (and torch-fidelity) uses the logits
  WITHOUT the bias (`softmax/logits/MatMul`), so both are returned."""
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, pool3):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (FEATURE_DIM, NUM_LOGITS),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (NUM_LOGITS,), self.param_dtype)
    unbiased = jnp.dot(pool3, kernel.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
    return unbiased + bias.astype(jnp.float32), unbiased


def resize_bilinear(images, size: int):
  """torch F.interpolate(mode='bilinear', align_corners=False, antialias=False) in NHWC."""
  b, h, w, c = images.shape
  if (h, w) == (size, size):
    return images
  return jax.image.resize(images, (b, size, size, c), "bilinear", antialias=False)


def preprocess(images_uint8, image_size: int = FID_IMAGE_SIZE):
  """uint8 (or [0,255] float) NHWC -> float32 in [-1, 1] at image_size x image_size."""
  x = images_uint8.astype(jnp.float32) / 255.0
  return 2.0 * resize_bilinear(x, image_size) - 1.0


class FIDInceptionV3(nn.Module):
  """Returns {'pool3': [B, 2048], 'logits': [B, 1008]} for uint8 NHWC images of any size.

  image_size is 299 for real FID; tests use smaller inputs (>= 75) to stay fast.
  """
  image_size: int = FID_IMAGE_SIZE
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images_uint8):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    conv = lambda name, *a, **k: BasicConv2d(*a, **k, **kw, name=name)
    x = preprocess(images_uint8, self.image_size).astype(self.dtype)
    x = conv("Conv2d_1a_3x3", 32, (3, 3), strides=2)(x)
    x = conv("Conv2d_2a_3x3", 32, (3, 3))(x)
    x = conv("Conv2d_2b_3x3", 64, (3, 3), padding=(1, 1))(x)
    x = _max_pool(x)
    x = conv("Conv2d_3b_1x1", 80)(x)
    x = conv("Conv2d_4a_3x3", 192, (3, 3))(x)
    x = _max_pool(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = FIDInceptionA(pool_features=pool_features, **kw, name=name)(x)
    x = InceptionB(**kw, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = FIDInceptionC(channels_7x7=c7, **kw, name=name)(x)
    x = InceptionD(**kw, name="Mixed_7a")(x)
    x = FIDInceptionE(pool="avg", **kw, name="Mixed_7b")(x)
    x = FIDInceptionE(pool="max", **kw, name="Mixed_7c")(x)
    pool3 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    logits, unbiased = _Logits(self.param_dtype, name="fc")(pool3)
    return {"pool3": pool3, "logits": logits, "logits_unbiased": unbiased}


def abstract_params(image_size: int = FID_IMAGE_SIZE, param_dtype: Dtype = jnp.float32):
  """Shapes/dtypes of the params tree, without allocating it."""
  model = FIDInceptionV3(image_size=image_size, param_dtype=param_dtype)
  dummy = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.uint8)
  return jax.eval_shape(model.init, jax.random.key(0), dummy)["params"]

