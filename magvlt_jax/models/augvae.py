"""L-Verse's feature-augmented VQ-VAE (AugVAE, paper section 3.3 / Figure 2; SPEC.md section 6).

AugVAE-ML (`stage="ml"`): E(4, C) then three E(2, C) give four latents (64, 32, 16, 8 px side at
256 px input; level 0 is the finest), all quantized by ONE codebook (one `quantize/embedding`
param, so patches of every scale fill the same K codes). Decoders run coarse to fine:
  h3 = G(2, C)(q3);  h2 = G(2, C)([h3, q2]);  h1 = G(2, C)([h2, q1]);  x = G(4, 3)([h1, q0])
([a, b] = channel concatenation, previous tensor first).
AugVAE-SL (`stage="sl"`, fine-tuned from ML by `ml_to_sl`): only levels 0 and 1 of the encoder,
only level 1 (the 32x32 map, 1024 tokens) quantized; each concatenation becomes a 1x1 conv
(`expand_1`, `expand_0`) doubling the previous tensor's channels, so dec_1 and dec_0 keep their
ML input width (2C) and their ML params:  h1 = G(2, C)(expand_1(q1));  x = G(4, 3)(expand_0(h1)).

Our choices where the paper is silent (its appendix A is not in our copy):
- E(f, d): conv3x3 to `hidden_channels`; log2(f) stages of `num_res_blocks` taming ResnetBlocks +
  stride-2 Downsample; `num_res_blocks` more blocks; norm, swish, conv3x3 to d.
- G(f, d): conv3x3 to `hidden_channels`; `num_res_blocks` blocks; log2(f) stages of
  nearest x2 Upsample(+conv) + `num_res_blocks` blocks; norm, swish, conv3x3 to d. The blocks are
  models/vqgan_layers.py's (one implementation); no attention.
- Codebook dim = latent channels C (no pre-quant conv); quantizer math is vqgan.py's (float32,
  straight-through, commitment loss, EMA update): the paper runs AugVAE in fp32 for the VQ.
- `ml_to_sl` initialises expand_* as [I, I] (each channel copied twice), a deterministic start
  that keeps every ML param; losses (reconstruction + perceptual + beta * commitment, EMA codebook)
  live in train/augvae_trainer.py.
- quantizer.l2_normalize (off in the paper variants): cosine lookup as in vqgan.VQGAN, every level's
  latent a unit vector (level 0 too in SL, so enc_1 reads what it read in ML).

Measured at tiny size (64 px, configs/augvae.py:tiny; benchmarks/RESULTS.md, "AugVAE vs VQ-GAN at
tiny size, equal training FLOPs"): ML reconstructs from level 0 (16x16 codes) and leaves levels 1-3
on a handful of codes within 50 steps, so SL, which keeps level 1 alone, starts from a collapsed
level and needs dead-code restart to use more than ~8 codes; at the tiny VQ-GAN's training FLOPs SL
reconstructs best with little or no ML (28.9 dB without ML, 28.1 with 10% of the budget on ML,
23.7 with half), a little below the tiny VQ-GAN (29.7 dB).
"""
import functools
import json
import math
from typing import Any, Dict, List

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax.models import vqgan
from magvlt_jax.models import vqgan_layers as L

STAGES = ("ml", "sl")
NUM_LEVELS = {"ml": 4, "sl": 2}  # encoder levels built; SL quantizes only level 1
FACTORS = (4, 2, 2, 2)  # downsampling of E per level (level 0 = E(4, C))


def level_sides(cfg) -> List[int]:
  """Latent side per ML level: image_size/4, /8, /16, /32."""
  return [cfg.image_size // (4 * 2 ** i) for i in range(4)]


def sl_grid(cfg) -> int:
  return level_sides(cfg)[1]


def validate(cfg, key="augvae"):
  if cfg.stage not in STAGES:
    raise ValueError(f"config.{key}.stage={cfg.stage!r}: expected one of {STAGES}")
  if cfg.image_size % 32:
    raise ValueError(f"config.{key}.image_size={cfg.image_size} must be a multiple of 32 (the ML "
                     f"encoder downsamples by 4 * 2**3)")
  for name in ("latent_channels", "hidden_channels"):
    if cfg[name] % cfg.norm_groups:
      raise ValueError(f"config.{key}.norm_groups={cfg.norm_groups} must divide config.{key}.{name}="
                       f"{cfg[name]}")


class _Coder(nn.Module):
  """E(factor, out) ("down") or G(factor, out) ("up"); see the module docstring."""
  factor: int
  out_channels: int
  direction: str
  hidden_channels: int
  num_res_blocks: int
  groups: int
  norm_type: str
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    lvl = functools.partial(L.Level, self.hidden_channels, self.num_res_blocks, False,
                            groups=self.groups, norm_type=self.norm_type, **kw)
    x = L.conv(self.hidden_channels, 3, "conv_in", **kw)(x.astype(self.dtype))
    if self.direction == "up":
      x = lvl("none", name="pre")(x)
    for i in range(int(math.log2(self.factor))):
      x = lvl(self.direction, name=f"stage_{i}")(x)
    if self.direction == "down":
      x = lvl("none", name="post")(x)
    x = nn.swish(L.norm(self.norm_type, self.groups, "norm_out", **kw)(x))
    return L.conv(self.out_channels, 3, "conv_out", **kw)(x)


class AugVAE(nn.Module):
  """`AugVAE(config.augvae, stage)`; stage defaults to config.stage. Methods: `__call__` (training
  forward), `encode` (codes per quantized level), `decode_levels`, `codebook`."""
  config: Any
  stage: str = ""

  def _stage(self):
    return self.stage or self.config.stage

  def setup(self):
    cfg = self.config
    validate(cfg)
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    arch = dict(hidden_channels=cfg.hidden_channels, num_res_blocks=cfg.num_res_blocks,
                groups=cfg.norm_groups, norm_type=cfg.norm_type, **kw)
    c = cfg.latent_channels
    n = NUM_LEVELS[self._stage()]
    self.encoders = [_Coder(FACTORS[i], c, "down", name=f"enc_{i}", **arch) for i in range(n)]
    # dec_i produces the input of level i-1's decoder (dec_0 produces RGB).
    self.decoders = [_Coder(FACTORS[i], 3 if i == 0 else c, "up", name=f"dec_{i}", **arch)
                     for i in range(n)]
    self.quantize = vqgan.VectorQuantizer(cfg.codebook_size, c, kw["param_dtype"])  # the shared codebook
    if self._stage() == "sl":
      self.expand = [L.conv(2 * c, 1, f"expand_{i}", **kw) for i in range(n)]

  def _l2(self):
    return bool(self.config.get("quantizer", {}).get("l2_normalize", False))

  def codebook(self):
    """The shared codebook as used for lookup: unit rows with quantizer.l2_normalize (cosine lookup,
    vqgan.VQGAN.codebook's option), else the raw EMA codebook."""
    return vqgan.unit(self.quantize()) if self._l2() else self.quantize()

  def quantized_levels(self):
    return (0, 1, 2, 3) if self._stage() == "ml" else (1,)

  def latents(self, images):
    """images [-1,1] [B,H,W,3] -> continuous latents per encoder level, float32; unit vectors with
    quantizer.l2_normalize (every level, quantized or not, so enc_{i+1} reads the same input in ML
    and SL)."""
    zs, x = [], images
    for enc in self.encoders:
      x = vqgan.unit(enc(x)) if self._l2() else enc(x).astype(jnp.float32)
      zs.append(x)
    return zs

  def decode_levels(self, zq: Dict[int, jax.Array]):
    """Quantized latents {level: [B,h,w,C]} -> float32 images [B,H,W,3] (not clipped)."""
    dt = jnp.dtype(self.config.dtype)
    h = None
    for i in reversed(range(len(self.decoders))):
      if self._stage() == "ml":
        q = zq[i].astype(dt)
        x = q if h is None else jnp.concatenate([h, q], axis=-1)
      else:
        x = self.expand[i](zq[i].astype(dt) if h is None else h)
      h = L.constrain(self.decoders[i](x))
    return h.astype(jnp.float32)

  def encode(self, images):
    """-> {level: int32 codes [B, h*w]} (raster order) for each quantized level."""
    zs = self.latents(images)
    cb = self.codebook()
    return {i: vqgan.nearest_codes(zs[i].reshape(zs[i].shape[0], -1, zs[i].shape[-1]), cb)
            for i in self.quantized_levels()}

  def decode(self, codes: Dict[int, jax.Array]):
    sides = level_sides(self.config)
    cb = self.codebook().astype(jnp.float32)
    zq = {i: jnp.take(cb, c.reshape(c.shape[0], sides[i], sides[i]), axis=0) for i, c in codes.items()}
    return self.decode_levels(zq)

  def __call__(self, images):
    """Training forward: recon [B,H,W,3] f32; z, codes: {level: latents [B,h,w,C] f32 / codes
    [B,h*w]}; commitment_loss, codebook_loss: means over quantized levels (the trainer adds the
    codebook loss only without the EMA update, quantizer.use_ema=False)."""
    zs = self.latents(images)
    cb = self.codebook()
    zq, codes, losses = {}, {}, []
    for i in self.quantized_levels():
      zq[i], c, codebook_loss, commitment = vqgan.quantize(zs[i], cb)
      codes[i] = c.reshape(c.shape[0], -1)
      losses.append((codebook_loss, commitment))
    codebook_loss, commitment = jnp.mean(jnp.array(losses), axis=0)
    return dict(recon=self.decode_levels(zq), z={i: zs[i] for i in zq}, codes=codes,
                codebook_loss=codebook_loss, commitment_loss=commitment)


# ----------------------------------------------------------------------------- shared EMA step

def flat_latents(out):
  """All quantized levels' latents [N, C] and codes [N] in one batch: the shared codebook's EMA
  statistics see every level's assignments."""
  z = jnp.concatenate([v.reshape(-1, v.shape[-1]) for _, v in sorted(out["z"].items())])
  codes = jnp.concatenate([v.reshape(-1) for _, v in sorted(out["codes"].items())])
  return z, codes


# ----------------------------------------------------------------------------- ML -> SL

def ml_to_sl(ml_params, cfg):
  """AugVAE-ML params -> AugVAE-SL params for fine-tuning: enc_0, enc_1, the codebook, dec_1 and
  dec_0 are kept; enc_2/3 and dec_2/3 are dropped; expand_i (1x1, C -> 2C) start as [I, I]."""
  missing = [k for k in ("enc_0", "enc_1", "dec_0", "dec_1", "quantize") if k not in ml_params]
  if missing:
    raise ValueError(f"augvae.ml_to_sl: params lack {missing}; expected AugVAE-ML params")
  c = int(cfg.latent_channels)
  dtype = jnp.dtype(cfg.param_dtype)
  eye = np.eye(c, dtype=np.float32)
  expand = dict(kernel=jnp.asarray(np.concatenate([eye, eye], axis=1)[None, None], dtype),
                bias=jnp.zeros((2 * c,), dtype))
  out = {k: ml_params[k] for k in ("enc_0", "enc_1", "dec_0", "dec_1", "quantize")}
  out.update(expand_0=dict(expand), expand_1=dict(expand))
  return out


# ----------------------------------------------------------------------------- pure API

def init_params(cfg, rng, stage=None, boxed=False):
  params = _init_fn(vqgan._config_key(cfg), stage or cfg.stage)(rng)  # pylint: disable=protected-access
  return params if boxed else nn.meta.unbox(params)


@functools.lru_cache(maxsize=8)
def _init_fn(config_json, stage):
  import ml_collections
  cfg = ml_collections.ConfigDict(json.loads(config_json))
  s = cfg.image_size
  return jax.jit(lambda key: AugVAE(cfg, stage).init(key, jnp.zeros((1, s, s, 3), jnp.float32))["params"])


def abstract_params(cfg, stage=None):
  return nn.meta.unbox(jax.eval_shape(_init_fn(vqgan._config_key(cfg), stage or cfg.stage),  # pylint: disable=protected-access
                                      jax.random.PRNGKey(0)))


def encode_sl(params, images, cfg):
  """images float [-1,1] [B,S,S,3] -> int32 codes [B, g*g] of the SL grid (g = S/8)."""
  s = cfg.image_size
  if images.ndim != 4 or images.shape[1:] != (s, s, 3):
    raise ValueError(f"augvae.encode: images must be [B,{s},{s},3] (config.augvae.image_size={s}), "
                     f"got {images.shape}")
  return AugVAE(cfg, "sl").apply({"params": params}, images, method=AugVAE.encode)[1]


def decode_sl(params, codes, cfg):
  """int codes [B, g*g] -> float32 images [B,S,S,3] in [-1,1]."""
  g = sl_grid(cfg)
  if codes.ndim != 2 or codes.shape[1] != g * g:
    raise ValueError(f"augvae.decode: codes must be [B,{g * g}] (AugVAE-SL grid {g}x{g}), got {codes.shape}")
  out = AugVAE(cfg, "sl").apply({"params": params}, {1: codes}, method=AugVAE.decode)
  return jnp.clip(out, min=-1.0, max=1.0)


def encode_ml(params, images, cfg):
  """AugVAE-ML (a training stage, not a registered tokenizer): images float [-1,1] [B,S,S,3] ->
  int32 codes of all four levels in one row [B, sum of side**2] (level 0 first; 340 at 64 px)."""
  codes = AugVAE(cfg, "ml").apply({"params": params}, images, method=AugVAE.encode)
  return jnp.concatenate([codes[i] for i in range(4)], axis=1)


def decode_ml(params, codes, cfg):
  """encode_ml's codes [B, sum of side**2] -> float32 images [B,S,S,3] in [-1,1] (every level)."""
  sides = level_sides(cfg)
  if codes.ndim != 2 or codes.shape[1] != sum(s * s for s in sides):
    raise ValueError(f"augvae.decode_ml: codes must be [B,{sum(s * s for s in sides)}] (levels "
                     f"{sides}), got {codes.shape}")
  split = np.cumsum([s * s for s in sides])[:-1]
  levels = dict(enumerate(jnp.split(codes, split, axis=1)))
  out = AugVAE(cfg, "ml").apply({"params": params}, levels, method=AugVAE.decode)
  return jnp.clip(out, min=-1.0, max=1.0)
