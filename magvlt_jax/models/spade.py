"""X-LXMERT's image generator and discriminator (paper appendix D; SPADE, Park et al. 2019).

Generator: an 8x8 grid of cluster centroids -> RGB in [-1, 1]. Each cell's vector is standardised
(zero mean, unit variance over its features), then the grid is embedded once by a 1x1 conv (`seg_channels`, the SPADE "segmentation map"), a 3x3 conv gives `channels` (32) features at
8x8, then `num_blocks` residual blocks (5 at 256 px) each upsample x2 (bilinear) and apply twice
[SPADE -> multiplicative spatial gaussian noise -> leaky ReLU -> 3x3 conv]; every block also
writes an RGB image (3x3 conv) that is added to the upsampled running RGB sum (StyleGAN2 skips).
SPADE: instance norm (no affine) of x, then x_hat * (1 + gamma(seg)) + beta(seg) with gamma and
beta two 3x3 convs of a shared 3x3 conv + ReLU of the grid embedding resized (nearest) to x.
Noise: x * (1 + s_c * n[b, h, w]), n ~ N(0, 1) shared over channels, s_c learned (init
`noise_init`); `deterministic=True` (decoding) leaves it out, its mean.

Discriminator: `num_blocks` down-sampling residual blocks (64 channels, instance norm, 3x3 convs,
average pool x2; a 1x1 conv + pool shortcut) to the grid size, then an adversarial head (1x1 conv,
spatial mean) and a classification head (1x1 conv -> cluster logits per grid cell). Every block's
output is returned for the feature-matching loss.

Every conv of both networks is spectrally normalised (Miyato et al. 2018): kernel / sigma with
sigma from the power-iteration vector u kept in the "spectral" collection next to the kernel.
The networks only read u; `spectral_update` advances it outside the differentiated function (one
iteration per training step), so losses are pure functions of (params, spectral).
"""
import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from magvlt_jax.models.vqgan_layers import CONV_AXES

Dtype = Any
_EPS = 1e-12


def _l2n(v):
  return v / jnp.maximum(jnp.linalg.norm(v), _EPS)


def _matrix(kernel):
  """[kh, kw, in, out] -> [out, kh*kw*in] (the operator whose top singular value SN divides by)."""
  return kernel.reshape(-1, kernel.shape[-1]).T.astype(jnp.float32)


def sigma_of(kernel, u):
  """Power-iteration estimate of the largest singular value of the kernel from vector u."""
  w = _matrix(kernel)
  v = jax.lax.stop_gradient(_l2n(w.T @ u))
  return jnp.dot(jax.lax.stop_gradient(u), w @ v)


def _power_step(kernel, u):
  w = jax.lax.stop_gradient(_matrix(kernel))
  return _l2n(w @ _l2n(w.T @ u))


@functools.partial(jax.jit, static_argnums=2)  # compiled: eager, init's 20 iterations took ~8 s
def _power_steps(kernel, u, num_iters: int):
  return jax.lax.fori_loop(0, num_iters, lambda _, v: _power_step(kernel, v), u)


def spectral_update(params, spectral, num_iters: int = 1):
  """`num_iters` power iterations on every u in `spectral` (paths mirror params: .../conv/u ->
  .../conv/kernel). Returns the new spectral collection."""
  flat_p = flax.traverse_util.flatten_dict(params)
  flat_s = flax.traverse_util.flatten_dict(spectral)
  out = {}
  for path, u in flat_s.items():
    kernel = flat_p[path[:-1] + ("kernel",)]
    out[path] = _power_steps(kernel, u, int(num_iters))
  return flax.traverse_util.unflatten_dict(out)


class SNConv(nn.Module):
  """Conv (SAME padding) with a spectrally normalised kernel."""
  features: int
  kernel_size: int = 3
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(), CONV_AXES),
                        (k, k, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("conv_out",)),
                      (self.features,), self.param_dtype)
    u = self.variable("spectral", "u", nn.with_logical_partitioning(
        lambda rng, shape: _l2n(jax.random.normal(rng, shape)), ("conv_out",)),
        self.make_rng("params") if self.is_initializing() else None, (self.features,))
    w = kernel / jnp.maximum(sigma_of(kernel, u.value), _EPS).astype(kernel.dtype)
    y = jax.lax.conv_general_dilated(x.astype(self.dtype), w.astype(self.dtype), (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     preferred_element_type=jnp.float32)
    return (y + bias).astype(self.dtype)


def instance_norm(x, eps: float = 1e-5):
  """Per image and channel over H, W; no affine (SPADE / the discriminator's norm)."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=(1, 2), keepdims=True)
  var = jnp.var(x32, axis=(1, 2), keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def spade_modulate(x, gamma, beta):
  """The SPADE formula: instance_norm(x) * (1 + gamma) + beta."""
  return instance_norm(x) * (1.0 + gamma) + beta


def resize(x, h, w, method):
  return jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), method).astype(x.dtype)


def upsample2(x):
  return resize(x, 2 * x.shape[1], 2 * x.shape[2], "bilinear")


def avgpool2(x):
  return nn.avg_pool(x, (2, 2), (2, 2))


class SPADE(nn.Module):
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, seg):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    seg = resize(seg, x.shape[1], x.shape[2], "nearest")
    a = nn.relu(SNConv(self.hidden, 3, **kw, name="shared")(seg))
    gamma = SNConv(x.shape[-1], 3, **kw, name="gamma")(a)
    beta = SNConv(x.shape[-1], 3, **kw, name="beta")(a)
    return spade_modulate(x, gamma, beta)


class MulNoise(nn.Module):
  """x * (1 + s_c * n[b, h, w]): one gaussian map per image, a learned strength per channel."""
  init: float = 0.1
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    s = self.param("strength", nn.with_logical_partitioning(nn.initializers.constant(self.init), ("conv_out",)),
                   (x.shape[-1],), self.param_dtype)
    if deterministic:
      return x
    n = jax.random.normal(self.make_rng("noise"), x.shape[:3] + (1,), jnp.float32)
    return (x * (1.0 + s * n)).astype(x.dtype)


class SpadeResBlock(nn.Module):
  channels: int
  spade_hidden: int
  noise_init: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, seg, deterministic: bool):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = x
    for i in range(2):
      h = SPADE(self.spade_hidden, **kw, name=f"spade{i}")(h, seg)
      h = MulNoise(self.noise_init, self.param_dtype, name=f"noise{i}")(h, deterministic)
      h = SNConv(self.channels, 3, **kw, name=f"conv{i}")(nn.leaky_relu(h, 0.2))
    return x + h


class SpadeGenerator(nn.Module):
  """[B, g, g, D] centroid grid -> [B, g * 2**num_blocks, ..., 3] float32 in [-1, 1]."""
  num_blocks: int
  channels: int = 32
  seg_channels: int = 128
  spade_hidden: int = 64
  noise_init: float = 0.1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, grid_feats, deterministic: bool = True):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Each cell's feature vector standardised first: raw backbone / detector features are tens of
    # units large, and the identity path would carry that scale into every RGB skip (tanh saturates).
    f = grid_feats.astype(jnp.float32)
    f = (f - jnp.mean(f, -1, keepdims=True)) * jax.lax.rsqrt(jnp.var(f, -1, keepdims=True) + 1e-5)
    seg = SNConv(self.seg_channels, 1, **kw, name="seg_proj")(f.astype(self.dtype))
    x = SNConv(self.channels, 3, **kw, name="conv_in")(seg)
    rgb = None
    for i in range(self.num_blocks):
      x = SpadeResBlock(self.channels, self.spade_hidden, self.noise_init, **kw, name=f"block{i}")(
          upsample2(x), seg, deterministic)
      y = SNConv(3, 3, **kw, name=f"to_rgb{i}")(nn.leaky_relu(x, 0.2)).astype(jnp.float32)
      rgb = y if rgb is None else upsample2(rgb) + y
    return jnp.tanh(rgb)


class SpadeDiscriminator(nn.Module):
  """[B, S, S, 3] in [-1, 1] -> {'adv': [B], 'cls': [B, g, g, K], 'features': [block outputs]}."""
  num_blocks: int
  num_classes: int
  channels: int = 64
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x, feats = images.astype(self.dtype), []
    for i in range(self.num_blocks):
      h = x if i == 0 else nn.leaky_relu(instance_norm(x), 0.2)
      h = SNConv(self.channels, 3, **kw, name=f"block{i}_conv0")(h)
      h = SNConv(self.channels, 3, **kw, name=f"block{i}_conv1")(nn.leaky_relu(instance_norm(h), 0.2))
      x = avgpool2(h) + avgpool2(SNConv(self.channels, 1, **kw, name=f"block{i}_skip")(x))
      feats.append(x.astype(jnp.float32))
    a = nn.leaky_relu(x, 0.2)
    adv = jnp.mean(SNConv(1, 1, **kw, name="adv")(a).astype(jnp.float32), axis=(1, 2, 3))
    cls = SNConv(self.num_classes, 1, **kw, name="cls")(a).astype(jnp.float32)
    return {"adv": adv, "cls": cls, "features": feats}


def num_blocks(cfg) -> int:
  """Up/down-sampling blocks between the grid and the image (5 for 8 -> 256)."""
  ratio = int(cfg.image_size) // int(cfg.grid)
  n = ratio.bit_length() - 1
  if ratio * int(cfg.grid) != int(cfg.image_size) or 2 ** n != ratio or n < 1:
    raise ValueError(f"config.grid_kmeans.image_size={cfg.image_size} must be grid={cfg.grid} times a "
                     "power of two >= 2 (the generator doubles the grid per block)")
  return n


def generator_from_config(cfg) -> SpadeGenerator:
  g = cfg.generator
  return SpadeGenerator(num_blocks(cfg), g.channels, g.seg_channels, g.spade_hidden, g.noise_init,
                        dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def discriminator_from_config(cfg) -> SpadeDiscriminator:
  return SpadeDiscriminator(num_blocks(cfg), int(cfg.num_clusters), cfg.discriminator.channels,
                            dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))


def init(model, rng, *example, power_iters: int = 20):
  """(params, spectral) unboxed, with u converged by `power_iters` iterations."""
  k_params, k_noise = jax.random.split(rng)
  # model.init jitted: one compile instead of op-by-op dispatch (seconds per network on CPU).
  variables = nn.meta.unbox(jax.jit(model.init)({"params": k_params, "noise": k_noise}, *example))
  params, spectral = variables["params"], variables["spectral"]
  return params, spectral_update(params, spectral, power_iters)
