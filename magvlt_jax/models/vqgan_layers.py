"""Building blocks of the taming-transformers VQGAN encoder/decoder (NHWC, HWIO kernels).

Module names mirror taming's PyTorch attribute names (`down_0/block_1/conv2`, `mid/attn_1/q`, ...) so that
`convert/taming_vqgan.py` maps `encoder.down.0.block.1.conv2.weight` -> `encoder/down_0/block_1/conv2/kernel`
by a purely mechanical rename.
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
# Activations are sharded over the batch only (convolution features are small next to the transformer).
ACT_AXES = ("batch", "height", "width", "conv_out")


def conv(features, kernel_size, name, dtype, param_dtype, stride=1, padding="SAME", use_bias=True):
  """nn.Conv with logical axis names on kernel and bias."""
  return nn.Conv(
      features, (kernel_size, kernel_size), strides=(stride, stride), padding=padding, use_bias=use_bias,
      dtype=dtype, param_dtype=param_dtype, name=name,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))


NORM_TYPES = ("group", "layer")


def norm(norm_type, groups, name, dtype, param_dtype):
  """taming: torch.nn.GroupNorm(32, C, eps=1e-6, affine=True) ("group"). "layer" normalises each
  position over its channels only, so no activation depends on image-wide statistics; same
  parameter names and shapes ([C] scale and bias)."""
  kw = dict(epsilon=1e-6, dtype=dtype, param_dtype=param_dtype, name=name,
            scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)))
  if norm_type == "group":
    return nn.GroupNorm(num_groups=groups, **kw)
  if norm_type == "layer":
    return nn.LayerNorm(**kw)
  raise ValueError(f"config.vqgan.norm_type={norm_type!r}: expected one of {NORM_TYPES}")


def constrain(x):
  return nn.with_logical_constraint(x, ACT_AXES)


class ResnetBlock(nn.Module):
  """norm-swish-conv3x3 twice, dropout before the second conv, 1x1 `nin_shortcut` when channels change."""
  out_channels: int
  groups: int = 32
  norm_type: str = "group"
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.swish(norm(self.norm_type, self.groups, "norm1", **kw)(x))
    h = conv(self.out_channels, 3, "conv1", **kw)(h)
    h = nn.swish(norm(self.norm_type, self.groups, "norm2", **kw)(h))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    h = conv(self.out_channels, 3, "conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, "nin_shortcut", **kw)(x)
    return constrain(x + h)


class AttnBlock(nn.Module):
  """Single-head spatial self-attention with 1x1-conv q/k/v/proj_out (taming `AttnBlock`)."""
  groups: int = 32
  norm_type: str = "group"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, hgt, wid, c = x.shape
    h = norm(self.norm_type, self.groups, "norm", **kw)(x)
    q = conv(c, 1, "q", **kw)(h).reshape(b, hgt * wid, c)
    k = conv(c, 1, "k", **kw)(h).reshape(b, hgt * wid, c)
    v = conv(c, 1, "v", **kw)(h).reshape(b, hgt * wid, c)
    # Softmax in float32 (scores of 256 positions x 512 channels overflow bf16 precision).
    scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) * (c ** -0.5)
    weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    h = jnp.einsum("bqk,bkc->bqc", weights, v).reshape(b, hgt, wid, c)
    h = conv(c, 1, "proj_out", **kw)(h)
    return constrain(x + h)


class Downsample(nn.Module):
  """taming: pad (0, 1, 0, 1) = right and bottom by one zero, then a 3x3 stride-2 conv without padding."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(x.shape[-1], 3, "conv", self.dtype, self.param_dtype, stride=2, padding="VALID")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return conv(x.shape[-1], 3, "conv", self.dtype, self.param_dtype)(x)


class Level(nn.Module):
  """One resolution level: `block_i` (+ `attn_i` after each block), then an optional resampler."""
  out_channels: int
  num_blocks: int
  use_attn: bool
  resample: str  # "down" | "up" | "none"
  groups: int = 32
  norm_type: str = "group"
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_blocks):
      block = ResnetBlock(self.out_channels, self.groups, self.norm_type, self.dropout_rate,
                          name=f"block_{i}", **kw)
      x = block(x, deterministic)
      if self.use_attn:
        x = AttnBlock(self.groups, self.norm_type, name=f"attn_{i}", **kw)(x)
    if self.resample == "down":
      x = Downsample(name="downsample", **kw)(x)
    elif self.resample == "up":
      x = Upsample(name="upsample", **kw)(x)
    return x


class Mid(nn.Module):
  """block_1, attn_1, block_2 at the lowest resolution (attn_1 omitted when not `attention`: then
  every latent sees only its convolutional receptive field)."""
  groups: int = 32
  norm_type: str = "group"
  attention: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = ResnetBlock(c, self.groups, self.norm_type, self.dropout_rate, name="block_1", **kw)(x, deterministic)
    if self.attention:
      x = AttnBlock(self.groups, self.norm_type, name="attn_1", **kw)(x)
    return ResnetBlock(c, self.groups, self.norm_type, self.dropout_rate, name="block_2", **kw)(
        x, deterministic)


class Encoder(nn.Module):
  """taming `Encoder` (double_z=False): images [B,H,W,3] -> z [B,H/f,W/f,z_channels]."""
  base_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  z_channels: int
  groups: int = 32
  norm_type: str = "group"
  mid_attention: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic=True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = conv(self.base_channels, 3, "conv_in", **kw)(x.astype(self.dtype))
    res = self.resolution
    last = len(self.channel_mult) - 1
    for i, mult in enumerate(self.channel_mult):
      x = Level(self.base_channels * mult, self.num_res_blocks, res in self.attn_resolutions,
                "down" if i != last else "none", self.groups, self.norm_type, self.dropout_rate,
                name=f"down_{i}", **kw)(
                    x, deterministic)
      res = res // 2 if i != last else res
    x = Mid(self.groups, self.norm_type, self.mid_attention, self.dropout_rate, name="mid", **kw)(
        x, deterministic)
    x = nn.swish(norm(self.norm_type, self.groups, "norm_out", **kw)(x))
    return conv(self.z_channels, 3, "conv_out", **kw)(x)


class Decoder(nn.Module):
  """taming `Decoder` (the GAN generator): z [B,h,w,z_channels] -> images [B,H,W,3].

  With `return_features=True` also returns the input of the last conv (`conv_out`), which the
  trainer needs for taming's adaptive GAN weight (gradient-norm ratio at the last layer).
  """
  base_channels: int
  channel_mult: Sequence[int]
  num_res_blocks: int
  attn_resolutions: Sequence[int]
  resolution: int
  out_channels: int = 3
  groups: int = 32
  norm_type: str = "group"
  mid_attention: bool = True
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z, deterministic=True, return_features=False):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    levels = len(self.channel_mult)
    res = self.resolution // 2 ** (levels - 1)
    x = conv(self.base_channels * self.channel_mult[-1], 3, "conv_in", **kw)(z.astype(self.dtype))
    x = Mid(self.groups, self.norm_type, self.mid_attention, self.dropout_rate, name="mid", **kw)(
        x, deterministic)
    for i in reversed(range(levels)):
      x = Level(self.base_channels * self.channel_mult[i], self.num_res_blocks + 1, res in self.attn_resolutions,
                "up" if i != 0 else "none", self.groups, self.norm_type, self.dropout_rate,
                name=f"up_{i}", **kw)(
                    x, deterministic)
      res = res * 2 if i != 0 else res
    feats = nn.swish(norm(self.norm_type, self.groups, "norm_out", **kw)(x))
    out = conv(self.out_channels, 3, "conv_out", **kw)(feats).astype(jnp.float32)
    return (out, feats) if return_features else out
