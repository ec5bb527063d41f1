"""VQ-GAN image tokenizer (taming-transformers layout): encoder, vector quantizer, decoder (GAN generator).

Pure API (jittable; close over `vq_config`, e.g. `jax.jit(functools.partial(encode, vq_config=cfg))`):
  encode(params, images [-1,1] float [B,H,W,3], vq_config) -> int32 codes [B, h*w] (raster order)
  decode(params, codes [B, h*w], vq_config) -> float32 images [B,H,W,3] in [-1,1]
  to_model_range(uint8 images) -> float32 in [-1,1];  load_params(path, vq_config) -> params.
The quantizer math (distances, losses, EMA statistics, dead-code restart) is float32 and lives in
pure functions here, so the trainer owns all mutable state (the EMA statistics are part of its state).
"""
import functools
import json
import os
from typing import Any, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax.models import vqgan_layers as L

PARAMS_FILE = "params.npz"  # final params written by the trainer / the converter format


def latent_grid(vq_config) -> int:
  """Side length of the code grid (image_size / 2**(levels-1))."""
  return vq_config.image_size // 2 ** (len(vq_config.channel_mult) - 1)


def _validate(cfg):
  if cfg.base_channels % cfg.norm_groups or cfg.z_channels % cfg.norm_groups:
    raise ValueError(f"config.vqgan.norm_groups={cfg.norm_groups} must divide base_channels="
                     f"{cfg.base_channels} and z_channels={cfg.z_channels}")
  if cfg.image_size % 2 ** (len(cfg.channel_mult) - 1):
    raise ValueError(f"config.vqgan.image_size={cfg.image_size} is not divisible by the downsampling "
                     f"factor 2**(len(channel_mult)-1)={2 ** (len(cfg.channel_mult) - 1)}")


class VectorQuantizer(nn.Module):
  """Holds the codebook (taming `quantize.embedding.weight`, [codebook_size, embed_dim])."""
  codebook_size: int
  embed_dim: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self):
    k = self.codebook_size
    init = lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -1.0 / k, 1.0 / k)  # taming init
    return self.param("embedding", nn.with_logical_partitioning(init, ("codebook", "embed")),
                      (k, self.embed_dim), self.param_dtype)


class VQGAN(nn.Module):
  """`VQGAN(config.vqgan)`. Methods: `__call__` (training forward), `encode`, `decode`, `encode_latent`,
  `decode_latent`, `codebook`."""
  config: Any

  def setup(self):
    cfg = self.config
    _validate(cfg)
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    arch = dict(base_channels=cfg.base_channels, channel_mult=tuple(cfg.channel_mult),
                num_res_blocks=cfg.num_res_blocks, attn_resolutions=tuple(cfg.attn_resolutions),
                resolution=cfg.image_size, groups=cfg.norm_groups, dropout_rate=cfg.dropout_rate,
                norm_type=cfg.get("norm_type", "group"), mid_attention=cfg.get("mid_attention", True), **kw)
    self.encoder = L.Encoder(z_channels=cfg.z_channels, **arch)
    self.decoder = L.Decoder(out_channels=3, **arch)
    self.quant_conv = L.conv(cfg.embed_dim, 1, None, **kw)
    self.post_quant_conv = L.conv(cfg.z_channels, 1, None, **kw)
    self.quantize = VectorQuantizer(cfg.codebook_size, cfg.embed_dim, kw["param_dtype"])

  def _l2(self):
    return bool(self.config.get("quantizer", {}).get("l2_normalize", False))

  def codebook(self):
    """The codebook as used for lookup: unit rows with quantizer.l2_normalize (cosine-similarity
    lookup, as in ViT-VQGAN: resists codebook collapse), else the raw taming codebook."""
    return unit(self.quantize()) if self._l2() else self.quantize()

  def encode_latent(self, images, deterministic=True):
    """images [-1,1] [B,H,W,3] -> pre-quantization latents z [B,h,w,embed_dim] (float32)."""
    z = self.quant_conv(self.encoder(images, deterministic)).astype(jnp.float32)
    return unit(z) if self._l2() else z

  def decode_latent(self, zq, deterministic=True, return_features=False):
    return self.decoder(self.post_quant_conv(zq.astype(jnp.dtype(self.config.dtype))), deterministic, return_features)

  def encode(self, images):
    z = self.encode_latent(images)
    return nearest_codes(z.reshape(z.shape[0], -1, z.shape[-1]), self.codebook())

  def decode(self, codes):
    b = codes.shape[0]
    g = latent_grid(self.config)
    zq = jnp.take(self.codebook().astype(jnp.float32), codes.reshape(b, g, g), axis=0)
    return self.decode_latent(zq)

  def __call__(self, images, deterministic=True):
    """Training forward. Returns dict: recon [B,H,W,3] f32, features (input of decoder.conv_out),
    z [B,h,w,D] f32 (pre-quant), codes [B,h*w], codebook_loss, commitment_loss (scalars, f32)."""
    z = self.encode_latent(images, deterministic)
    zq, codes, codebook_loss, commitment_loss = quantize(z, self.codebook())
    recon, feats = self.decode_latent(zq, deterministic, return_features=True)
    return dict(recon=recon, features=feats, z=z, codes=codes.reshape(z.shape[0], -1),
                codebook_loss=codebook_loss, commitment_loss=commitment_loss)


# ----------------------------------------------------------------------------- quantizer math (float32)

def unit(x):
  """Rows of x scaled to unit l2 norm, float32 (the quantizer.l2_normalize lookup)."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + 1e-12)


def nearest_codes(z, codebook):
  """argmin_k ||z - e_k||^2 for z [..., D]; returns int32 [...]."""
  z = z.astype(jnp.float32)
  e = codebook.astype(jnp.float32)
  # Full-precision matmul: on TPU the default would round the cross term to bf16 and flip near ties.
  cross = jnp.einsum("...d,kd->...k", z, e, precision=jax.lax.Precision.HIGHEST)
  dist = jnp.sum(z * z, -1, keepdims=True) - 2.0 * cross + jnp.sum(e * e, -1)
  return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def quantize(z, codebook):
  """Nearest-code quantization with the straight-through estimator.

  Returns (zq_st, codes, codebook_loss, commitment_loss): zq_st equals the codebook vectors in the
  forward pass while its gradient flows to z unchanged; codebook_loss = mean((zq - sg(z))^2) trains the
  codebook, commitment_loss = mean((sg(zq) - z)^2) (weighted by beta) pulls the encoder to its codes.
  """
  z = z.astype(jnp.float32)
  codes = nearest_codes(z, codebook)
  zq = jnp.take(codebook.astype(jnp.float32), codes, axis=0)
  codebook_loss = jnp.mean((zq - jax.lax.stop_gradient(z)) ** 2)
  commitment_loss = jnp.mean((jax.lax.stop_gradient(zq) - z) ** 2)
  zq_st = z + jax.lax.stop_gradient(zq - z)
  return zq_st, codes, codebook_loss, commitment_loss


def codebook_metrics(codes, codebook_size) -> Dict[str, jax.Array]:
  """usage: fraction of codebook entries used at least once in `codes`; perplexity: exp(entropy) of the
  empirical code distribution (= codebook_size when uniform, 1 when a single code is used)."""
  counts = jnp.bincount(codes.reshape(-1), length=codebook_size).astype(jnp.float32)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return dict(usage=jnp.mean(counts > 0), perplexity=jnp.exp(entropy))


def init_vq_stats(codebook) -> Dict[str, jax.Array]:
  """Quantizer statistics: cluster_size [K] and embed_sum [K,D] (EMA codebook updates), usage [K]
  (a faster EMA of assignments per step, for dead-code restart).

  Starting at cluster_size=1, embed_sum=codebook keeps codebook == embed_sum / cluster_size."""
  embed_sum = jnp.array(codebook, jnp.float32, copy=True)  # own buffer: the state is donated to the step
  ones = jnp.ones(embed_sum.shape[:1], jnp.float32)
  return dict(cluster_size=ones, embed_sum=embed_sum, usage=ones + 0.0)


def ema_update(stats, z_flat, codes, decay, eps=1e-5) -> Tuple[Dict[str, jax.Array], jax.Array]:
  """One EMA codebook step (VQ-VAE-2 / L-Verse AugVAE); returns (new_stats, new_codebook).

  cluster_size <- decay*cluster_size + (1-decay)*counts; embed_sum <- decay*embed_sum + (1-decay)*sum z;
  codebook = embed_sum / laplace(cluster_size), laplace(c) = (c + eps) / (n + K*eps) * n, n = sum c.
  """
  k = stats["cluster_size"].shape[0]
  onehot = jax.nn.one_hot(codes.reshape(-1), k, dtype=jnp.float32)
  z_flat = z_flat.reshape(-1, z_flat.shape[-1]).astype(jnp.float32)
  cluster = decay * stats["cluster_size"] + (1 - decay) * onehot.sum(0)
  embed_sum = decay * stats["embed_sum"] + (1 - decay) * jnp.einsum(
      "nk,nd->kd", onehot, z_flat, precision=jax.lax.Precision.HIGHEST)
  n = cluster.sum()
  smoothed = (cluster + eps) / (n + k * eps) * n
  return dict(cluster_size=cluster, embed_sum=embed_sum), embed_sum / smoothed[:, None]


def track_usage(stats, codes, decay) -> Dict[str, jax.Array]:
  """usage <- decay * usage + (1 - decay) * assignments of each code in this step."""
  k = stats["usage"].shape[0]
  counts = jnp.bincount(codes.reshape(-1), length=k).astype(jnp.float32)
  return dict(stats, usage=decay * stats["usage"] + (1 - decay) * counts)


def restart_dead_codes(key, stats, codebook, z_flat, codes, threshold):
  """Codes whose `usage` (see track_usage) is below `threshold` are replaced by encoder outputs of this batch.

  Replacement vectors are drawn without replacement with probability proportional to their
  quantization error ||z - e_code||^2 (k-means++ style): uniform draws would mostly pick copies of
  the most common content (e.g. flat background), which then stay unused. A restarted code's usage is
  reset to max(N/K, 2*threshold) (N vectors, K codes) so it has a grace period before it can be
  restarted again; embed_sum is reset consistently for EMA mode. Returns (stats, codebook, num_restarted).
  """
  z_flat = z_flat.reshape(-1, z_flat.shape[-1]).astype(jnp.float32)
  n, k = z_flat.shape[0], codebook.shape[0]
  err = jnp.sum((z_flat - jnp.take(codebook.astype(jnp.float32), codes.reshape(-1), axis=0)) ** 2, -1)
  logits = jnp.log(err + 1e-6 * jnp.mean(err) + 1e-12)
  if n >= k:  # Gumbel top-k = sampling k distinct vectors proportionally to err
    idx = jax.lax.top_k(logits + jax.random.gumbel(key, (n,)), k)[1]
  else:
    idx = jax.random.categorical(key, logits, shape=(k,))
  dead = stats["usage"] < threshold
  fresh = jnp.maximum(n / k, 2.0 * threshold)
  new_codebook = jnp.where(dead[:, None], z_flat[idx], codebook.astype(jnp.float32))
  stats = dict(usage=jnp.where(dead, fresh, stats["usage"]),
               cluster_size=jnp.where(dead, fresh, stats["cluster_size"]),
               embed_sum=jnp.where(dead[:, None], z_flat[idx] * fresh, stats["embed_sum"]))
  return stats, new_codebook.astype(codebook.dtype), jnp.sum(dead)


# ----------------------------------------------------------------------------- pure API

def to_model_range(images_uint8):
  """uint8 [0,255] -> float32 [-1,1] (taming's Normalize(0.5, 0.5))."""
  return jnp.asarray(images_uint8, jnp.float32) / 127.5 - 1.0


def to_uint8(images):
  """[-1,1] float -> uint8 [0,255] (clamped)."""
  return jnp.round(jnp.clip((images + 1.0) * 127.5, min=0.0, max=255.0)).astype(jnp.uint8)


def encode(params, images, vq_config):
  """images float [-1,1] [B,H,W,3] -> int32 codes [B, h*w] (raster order: row * w + col)."""
  s = vq_config.image_size
  if images.ndim != 4 or images.shape[1:] != (s, s, 3):
    raise ValueError(f"vqgan.encode: images must be [B,{s},{s},3] (config.vqgan.image_size={s}), "
                     f"got {images.shape}")
  return VQGAN(vq_config).apply({"params": params}, images, method=VQGAN.encode)


def decode(params, codes, vq_config):
  """int codes [B, h*w] -> float32 images [B,H,W,3] clipped to [-1,1]."""
  g = latent_grid(vq_config)
  if codes.ndim != 2 or codes.shape[1] != g * g:
    raise ValueError(f"vqgan.decode: codes must be [B,{g * g}] for config.vqgan (grid {g}x{g}), got {codes.shape}")
  out = VQGAN(vq_config).apply({"params": params}, codes, method=VQGAN.decode)
  return jnp.clip(out, min=-1.0, max=1.0)


def init_params(vq_config, rng, boxed=False):
  """Randomly initialised params (nested dict; `boxed` keeps nn.LogicallyPartitioned leaves)."""
  params = _init_fn(_config_key(vq_config))(rng)
  return params if boxed else nn.meta.unbox(params)


def _config_key(vq_config) -> str:
  return json.dumps(vq_config.to_dict(), sort_keys=True, default=list)


@functools.lru_cache(maxsize=8)
def _init_fn(config_json):
  """Jitted boxed init per config (eager init would dispatch hundreds of small ops)."""
  import ml_collections
  cfg = ml_collections.ConfigDict(json.loads(config_json))
  s = cfg.image_size
  return jax.jit(lambda key: VQGAN(cfg).init(key, jnp.zeros((1, s, s, 3), jnp.float32))["params"])


def abstract_params(vq_config):
  """ShapeDtypeStructs of the params (no compute): used for shape checks and the f16 layout tests."""
  return _abstract_params(_config_key(vq_config))


@functools.lru_cache(maxsize=8)
def _abstract_params(config_json):
  return nn.meta.unbox(jax.eval_shape(_init_fn(config_json), jax.random.PRNGKey(0)))


def flatten_params(params) -> Dict[str, np.ndarray]:
  return {"/".join(k): np.asarray(v) for k, v in flax.traverse_util.flatten_dict(params).items()}


def unflatten_params(flat: Dict[str, Any]):
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def check_params(params, vq_config, source="params"):
  """Raises ValueError naming every missing, extra or mis-shaped key against the config's layout."""
  want = {k: tuple(v.shape) for k, v in flatten_params_shapes(abstract_params(vq_config)).items()}
  got = {k: tuple(np.shape(v)) for k, v in flatten_params_shapes(params).items()}
  errors = [f"  shape of {k}: got {got[k]}, config.vqgan ({vq_config.variant}) expects {want[k]}"
            for k in sorted(set(want) & set(got)) if want[k] != got[k]]
  errors += [f"  missing: {k} {want[k]}" for k in sorted(set(want) - set(got))]
  errors += [f"  unexpected: {k} {got[k]}" for k in sorted(set(got) - set(want))]
  if errors:
    raise ValueError(f"{source} does not match config.vqgan (variant {vq_config.variant!r}):\n"
                     + "\n".join(errors[:30]) + (f"\n  ... {len(errors) - 30} more" if len(errors) > 30 else ""))


def flatten_params_shapes(params):
  return {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(params).items()}


def save_params_npz(path, params):
  """Writes params as an .npz of 'a/b/c' -> array (the format `load_params` and the converter use)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **flatten_params(jax.device_get(params)))
  os.replace(tmp, path)


def _find_params(path) -> Tuple[str, Optional[str]]:
  """-> ('npz', file) or ('orbax', checkpoints dir) for a file, a tokenizer dir or a workdir."""
  if os.path.isfile(path):
    if not path.endswith(".npz"):
      raise ValueError(f"vqgan.load_params: {path} is not an .npz; convert taming checkpoints first with "
                       f"`python -m magvlt_jax.convert.taming_vqgan --input {path} --output X.npz`")
    return "npz", path
  for d in (path, os.path.join(path, "tokenizer")):
    if os.path.isfile(os.path.join(d, PARAMS_FILE)):
      return "npz", os.path.join(d, PARAMS_FILE)
  for d in (path, os.path.join(path, "checkpoints"), os.path.join(path, "tokenizer", "checkpoints")):
    if os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d)):  # orbax step directories
      return "orbax", d
  raise FileNotFoundError(f"vqgan.load_params: no tokenizer params at {path} (looked for {PARAMS_FILE}, "
                          f"tokenizer/{PARAMS_FILE} and orbax steps in ./, checkpoints/, tokenizer/checkpoints/)")


def load_params(path, vq_config):
  """Loads tokenizer params from an .npz (converter output or trainer export), a tokenizer directory or
  a workdir (WORKDIR/tokenizer/params.npz, else the latest orbax checkpoint there); shape-checked."""
  kind, where = _find_params(path)
  if kind == "npz":
    with np.load(where) as f:
      params = unflatten_params({k: f[k] for k in f.files})
  else:
    from magvlt_jax import checkpoints  # orbax import only when needed
    params = checkpoints.load_params(where)
  check_params(params, vq_config, source=where)
  dtype = jnp.dtype(vq_config.param_dtype)
  return jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
