"""The tokenizer trainer's edges: data, LPIPS weights, metric writer, image metrics, evaluation, export."""
import functools
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax.models import lpips as lpips_lib
from magvlt_jax.models import vqgan


# ----------------------------------------------------------------------------- image quality (jittable)

def psnr(x, y):
  """Per-image PSNR in dB of images in [-1,1] (computed on the [0,1] scale, peak 1)."""
  x = (jnp.clip(x, min=-1.0, max=1.0) + 1.0) / 2.0
  y = (jnp.clip(y, min=-1.0, max=1.0) + 1.0) / 2.0
  mse = jnp.mean((x.astype(jnp.float32) - y.astype(jnp.float32)) ** 2, axis=(1, 2, 3))
  return 10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10))


def _gaussian_blur(x, window=11, sigma=1.5):
  """Separable 'valid' Gaussian filter over H and W of [B,H,W,C]."""
  t = jnp.arange(window, dtype=jnp.float32) - (window - 1) / 2
  g = jnp.exp(-t ** 2 / (2 * sigma ** 2))
  g = g / g.sum()
  c = x.shape[-1]
  kh = jnp.tile(g.reshape(window, 1, 1, 1), (1, 1, 1, c))
  kw = jnp.tile(g.reshape(1, window, 1, 1), (1, 1, 1, c))
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.lax.conv_general_dilated(x, kh, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)
  return jax.lax.conv_general_dilated(x, kw, (1, 1), "VALID", dimension_numbers=dn, feature_group_count=c)


def ssim(x, y):
  """Per-image SSIM (Wang et al. 2004: Gaussian window 11, sigma 1.5, K1 .01, K2 .03) on the [0,1] scale,
  averaged over channels (as skimage.metrics.structural_similarity(gaussian_weights=True, channel_axis=-1,
  use_sample_covariance=False, data_range=1))."""
  x = (jnp.clip(x, min=-1.0, max=1.0).astype(jnp.float32) + 1.0) / 2.0
  y = (jnp.clip(y, min=-1.0, max=1.0).astype(jnp.float32) + 1.0) / 2.0
  c1, c2 = 0.01 ** 2, 0.03 ** 2
  mx, my = _gaussian_blur(x), _gaussian_blur(y)
  sxx = _gaussian_blur(x * x) - mx * mx
  syy = _gaussian_blur(y * y) - my * my
  sxy = _gaussian_blur(x * y) - mx * my
  s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
  return jnp.mean(s, axis=(1, 2, 3))


# ----------------------------------------------------------------------------- data

def _tokenizer_data_config(config):
  """The data config with the selected tokenizer's batch size (config.<kind>.train.batch_size)."""
  from magvlt_jax import image_tokenizers  # pylint: disable=import-outside-toplevel
  batch_size = image_tokenizers.section_of(config).train.batch_size
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.data.global_batch_size = batch_size
    cfg.data.eval_batch_size = batch_size
  return cfg


class ImageIterator:
  """Host-local uint8 image batches [B,S,S,3] from the data pipeline (no text tokenizer).

  Eval batches drop the padding rows (valid=False) of the last batch."""

  def __init__(self, config, workdir, data_state=None, train=True):
    from magvlt_jax.data import pipeline  # imported lazily: the data stack is the heaviest import
    cfg = _tokenizer_data_config(config)
    make = pipeline.create_train_iterator if train else pipeline.create_eval_iterator
    self._it = make(cfg, None, workdir=workdir)
    if data_state is not None:
      self._it.set_state(data_state)

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._it)
    images = np.asarray(batch["image"])
    return images[np.asarray(batch["valid"])] if "valid" in batch else images

  def get_state(self):
    return self._it.get_state()


def train_images(config, workdir, data_state=None):
  return ImageIterator(config, workdir, data_state, train=True)


def eval_images(config, workdir, max_images):
  """Up to `max_images` eval-split images (uint8), in batches, one pass."""
  seen = 0
  for batch in ImageIterator(config, workdir, train=False):
    if seen >= max_images:
      return
    if len(batch):
      yield batch[: max_images - seen]
      seen += len(batch)


def grid_batch(config, workdir, n=8):
  return next(iter(eval_images(config, workdir, n)))


# ----------------------------------------------------------------------------- weights, logging, export

def load_lpips(vcfg):
  if not vcfg.loss.vgg_weights or vcfg.loss.perceptual_weight == 0:
    logging.info("tokenizer: perceptual (LPIPS) loss OFF (config.vqgan.loss.vgg_weights is empty; give the "
                 "torchvision vgg16 state dict and the lpips vgg.pth heads, comma-separated, to enable it)")
    return None
  logging.info("tokenizer: LPIPS weights from %s", vcfg.loss.vgg_weights)
  return lpips_lib.load_params(vcfg.loss.vgg_weights)


def make_writer(workdir):
  from magvlt_jax.train import metric_writer  # TRAIN's writer: TensorBoard (no TF) + metrics.jsonl
  return metric_writer.create(workdir)


def check_finite(metrics, step):
  if not math.isfinite(metrics["loss"]):
    raise FloatingPointError(f"tokenizer training diverged at step {step}: loss={metrics['loss']}; "
                             "lower config.vqgan.optimizer.learning_rate or config.vqgan.loss.disc_weight")


@functools.lru_cache(maxsize=4)
def _round_trip_fn(vcfg_json):
  import ml_collections
  vcfg = ml_collections.ConfigDict(json.loads(vcfg_json))

  def fn(params, images):
    x = vqgan.to_model_range(images)
    codes = vqgan.encode(params, x, vcfg)
    return codes, vqgan.decode(params, codes, vcfg)
  return jax.jit(fn)


def round_trip(params, images, vcfg):
  """uint8 images -> (codes, reconstructions in [-1,1]), jitted per config."""
  return _round_trip_fn(_config_key(vcfg))(params, images)


def _config_key(vcfg):
  # Only what encode/decode depend on, so changing e.g. train.num_steps reuses the compiled function.
  arch = {k: v for k, v in vcfg.to_dict().items()
          if k not in ("train", "loss", "optimizer", "discriminator", "checkpoint")}
  return json.dumps(arch, sort_keys=True, default=list)


def recon_grid(params, images, vcfg):
  """[1, 2H, N*W, 3] uint8: originals on top, reconstructions below."""
  _, recon = round_trip(params, images, vcfg)
  recon = np.asarray(vqgan.to_uint8(recon))
  top, bottom = np.concatenate(list(images), axis=1), np.concatenate(list(recon), axis=1)
  return np.concatenate([top, bottom], axis=0)[None]


def evaluate(config, workdir, params, max_images=None):
  """Reconstruction PSNR/SSIM over the eval split and codebook usage/perplexity of all its codes."""
  vcfg = config.vqgan
  return evaluate_round_trip(config, workdir, params, functools.partial(round_trip, vcfg=vcfg),
                             vcfg.codebook_size, max_images)


def evaluate_round_trip(config, workdir, params, round_trip_fn, codebook_size, max_images=None):
  """`evaluate` for any tokenizer: round_trip_fn(params, uint8 images) -> (codes, recon in [-1,1])."""
  if not max_images:
    max_images = config.data.synthetic.num_eval if config.data.name == "synthetic" else 1024
  codes_all, psnrs, ssims, blank = [], [], [], []
  for images in eval_images(config, workdir, max_images):
    codes, recon = round_trip_fn(params, images)
    x = vqgan.to_model_range(images)
    psnrs.append(np.asarray(psnr(x, recon)))
    ssims.append(np.asarray(ssim(x, recon)))
    codes_all.append(np.asarray(codes))
    blank.append(np.asarray(psnr(jnp.zeros_like(x), x)))
  codes = np.concatenate(codes_all)
  cm = jax.device_get(vqgan.codebook_metrics(jnp.asarray(codes), codebook_size))
  return dict(psnr=float(np.mean(np.concatenate(psnrs))), ssim=float(np.mean(np.concatenate(ssims))),
              codebook_usage=float(cm["usage"]), perplexity=float(cm["perplexity"]),
              num_images=int(len(codes)), psnr_blank_gray=float(np.mean(np.concatenate(blank))))


def export(workdir, params, result, history):
  """WORKDIR/tokenizer/params.npz (final params) and eval.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  out = os.path.join(workdir, "tokenizer")
  vqgan.save_params_npz(os.path.join(out, vqgan.PARAMS_FILE), params)
  with open(os.path.join(out, "eval.json"), "w") as f:
    json.dump(dict(result, history=history[-5:]), f, indent=2)
  logging.info("tokenizer: wrote %s; eval %s", os.path.join(out, vqgan.PARAMS_FILE),
               {k: v for k, v in result.items()})
