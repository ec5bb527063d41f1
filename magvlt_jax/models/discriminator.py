"""PatchGAN discriminator (taming `NLayerDiscriminator`, pix2pix) and the hinge GAN losses.

Layout for n_layers=3, ndf=64 (taming defaults): conv4x4/2 (3->64) lrelu; conv4x4/2 (64->128) norm lrelu;
conv4x4/2 (128->256) norm lrelu; conv4x4/1 (256->512) norm lrelu; conv4x4/1 (512->1). Padding 1.
Taming uses BatchNorm in training mode (batch statistics, the discriminator only runs in training),
which is what `norm="batch"` computes here (no running averages are kept); "group" and "none" exist
for small batches.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from magvlt_jax.models.vqgan_layers import CONV_AXES


class BatchStatNorm(nn.Module):
  """BatchNorm with batch statistics (taming trains D in train mode); float32 statistics."""
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(
        lambda k, s, d: 1.0 + 0.02 * jax.random.normal(k, s, d), ("norm",)), (c,), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)),
                      (c,), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.mean(jnp.square(x32 - mean), axis=(0, 1, 2))
    y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale + bias
    return y.astype(self.dtype)


class NLayerDiscriminator(nn.Module):
  """images [B,H,W,3] in [-1,1] -> float32 patch logits [B,h,w,1]."""
  base_channels: int = 64
  num_layers: int = 3
  norm: str = "batch"  # batch | group | none
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _conv(self, features, stride, name, use_bias=True):
    # pix2pix init: N(0, 0.02).
    return nn.Conv(features, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)), use_bias=use_bias,
                   dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                   kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), CONV_AXES),
                   bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)))

  def _norm(self, name):
    if self.norm == "batch":
      return BatchStatNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if self.norm == "group":
      return nn.GroupNorm(num_groups=min(32, self.base_channels), dtype=self.dtype, param_dtype=self.param_dtype,
                          name=name)
    if self.norm == "none":
      return lambda x: x
    raise ValueError(f"config.vqgan.discriminator.norm must be batch|group|none, got {self.norm!r}")

  @nn.compact
  def __call__(self, x):
    x = nn.leaky_relu(self._conv(self.base_channels, 2, "conv_0")(x.astype(self.dtype)), 0.2)
    mult = 1
    for n in range(1, self.num_layers + 1):
      mult = min(2 ** n, 8)
      stride = 2 if n < self.num_layers else 1
      x = self._conv(self.base_channels * mult, stride, f"conv_{n}", use_bias=self.norm == "none")(x)
      x = nn.leaky_relu(self._norm(f"norm_{n}")(x), 0.2)
    return self._conv(1, 1, f"conv_{self.num_layers + 1}")(x).astype(jnp.float32)


def from_config(vq_config) -> NLayerDiscriminator:
  d = vq_config.discriminator
  return NLayerDiscriminator(base_channels=d.base_channels, num_layers=d.num_layers,
                             norm=d.get("norm", "batch"), dtype=jnp.dtype(vq_config.dtype),
                             param_dtype=jnp.dtype(vq_config.param_dtype))


def hinge_d_loss(logits_real, logits_fake):
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(z))))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def generator_loss(logits_fake):
  """taming's generator term: -mean D(G(z))."""
  return -jnp.mean(logits_fake)
