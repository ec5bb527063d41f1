"""X-LXMERT's SPADE generator training (`--mode=train_generator`; also the second half of the
grid_kmeans tokenizer's `train`): `train_tokenizer(config, workdir)`.

Per step: frozen grid features of the real images -> nearest centroid ids -> their centroids (the
generator's input, as the paper: quantized grid features) -> fake images. Losses (paper D.5):
  D: hinge(real, fake) * w_adv + [CE(cls(real), ids) + CE(cls(fake), ids)] * w_acgan
  G: -D_adv(fake) * w_adv + CE(cls(fake), ids) * w_acgan
     + w_fm * sum_k Huber(D_k(fake), D_k(real)) + w_perc * sum_k Huber(E_k(fake), E_k(real))
     + w_pix * mean |fake - real|   (ours; 0 at base, the paper has no pixel term)
with D_k the discriminator's block outputs and E_k EfficientNet-Lite0's 4 stage maps (the paper's
ResNet-50 is not in the project); Huber delta 1 averaged over each map, weights (1, 1, 10, 10).
Adam (0, 0.999), TTUR 4e-4 (G) / 1e-4 (D); one power iteration of every spectral norm per step.
A single-device loop like the AugVAE trainer: no orbax checkpoints or resume for the generator (a
rerun starts it over; the k-means stage does resume). The data, metric writer and PSNR / SSIM
evaluation are the VQ-GAN trainer's edges (train/vqgan_io.py).

Writes WORKDIR/tokenizer/: kmeans.npz (tools/fit_kmeans.py), params.npz (backbone, centroids,
generator: read by the grid_kmeans tokenizer), eval.json.
"""
import functools
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from magvlt_jax import image_tokenizers
from magvlt_jax import kmeans
from magvlt_jax.models import grid_features
from magvlt_jax.models import spade
from magvlt_jax.models import vqgan
from magvlt_jax.train import vqgan_io


def huber(a, b):
  """Mean Huber (delta 1) of a - b: 0.5 x^2 inside |x| <= 1, |x| - 0.5 outside."""
  return jnp.mean(optax.huber_loss(a.astype(jnp.float32), b.astype(jnp.float32), delta=1.0))


def _ce(logits, ids):
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, ids))


def _to255(x):
  return (x + 1.0) * 127.5


def make_optimizers(cfg):
  o = cfg.optimizer
  return (optax.adam(o.g_learning_rate, b1=o.b1, b2=o.b2), optax.adam(o.d_learning_rate, b1=o.b1, b2=o.b2))


def init_state(cfg, rng, g_tx, d_tx):
  k_g, k_d = jax.random.split(rng)
  g = int(cfg.grid)
  gen = spade.generator_from_config(cfg)
  disc = spade.discriminator_from_config(cfg)
  g_params, g_spec = spade.init(gen, k_g, jnp.zeros((1, g, g, grid_features.feature_dim(cfg)), jnp.float32))
  s = int(cfg.image_size)
  d_params, d_spec = spade.init(disc, k_d, jnp.zeros((1, s, s, 3), jnp.float32))
  return dict(step=jnp.zeros((), jnp.int32), g_params=g_params, g_spec=g_spec, d_params=d_params,
              d_spec=d_spec, g_opt=g_tx.init(g_params), d_opt=d_tx.init(d_params))


def inputs(frozen, images, cfg):
  """uint8 images -> (x in [-1, 1], cluster ids [B, g, g], centroid grid [B, g, g, D])."""
  ids = kmeans.assign(grid_features.grid_features(frozen["backbone"], images, cfg), frozen["centroids"])
  return vqgan.to_model_range(images), ids, jnp.take(frozen["centroids"], ids, axis=0)


def generator_loss(g_params, state, frozen, batch, rng, cfg):
  """-> (loss, (fake, metrics)); batch = (x, ids, centroid grid)."""
  x, ids, grid = batch
  w = cfg.loss
  gen, disc = spade.generator_from_config(cfg), spade.discriminator_from_config(cfg)
  fake = gen.apply({"params": g_params, "spectral": state["g_spec"]}, grid, deterministic=False,
                   rngs={"noise": rng})
  d_vars = {"params": state["d_params"], "spectral": state["d_spec"]}
  out_f = disc.apply(d_vars, fake)
  out_r = jax.lax.stop_gradient(disc.apply(d_vars, x))
  adv = -jnp.mean(out_f["adv"])
  ac = _ce(out_f["cls"], ids)
  fm = sum(huber(a, b) for a, b in zip(out_f["features"], out_r["features"]))
  perc = jnp.zeros((), jnp.float32)
  if w.perceptual > 0:
    e_f = grid_features.stage_maps(frozen["perceptual"], _to255(fake))
    e_r = jax.lax.stop_gradient(grid_features.stage_maps(frozen["perceptual"], _to255(x)))
    perc = sum(huber(e_f[k], e_r[k]) for k in e_f)
  pix = jnp.mean(jnp.abs(fake - x.astype(jnp.float32)))
  loss = (w.adversarial * adv + w.acgan * ac + w.feature_matching * fm + w.perceptual * perc
          + w.pixel * pix)
  return loss, (fake, dict(g_loss=loss, g_adv=adv, g_acgan=ac, feature_matching=fm, perceptual=perc,
                           pixel_l1=pix))


def discriminator_loss(d_params, state, batch, fake, cfg):
  x, ids, _ = batch
  w = cfg.loss
  disc = spade.discriminator_from_config(cfg)
  d_vars = {"params": d_params, "spectral": state["d_spec"]}
  out_r, out_f = disc.apply(d_vars, x), disc.apply(d_vars, fake)
  hinge = jnp.mean(jax.nn.relu(1.0 - out_r["adv"])) + jnp.mean(jax.nn.relu(1.0 + out_f["adv"]))
  ac = _ce(out_r["cls"], ids) + _ce(out_f["cls"], ids)
  loss = w.adversarial * hinge + w.acgan * ac
  acc = jnp.mean(jnp.argmax(out_r["cls"], -1) == ids)
  return loss, dict(d_loss=loss, d_hinge=hinge, d_acgan=ac, d_real=jnp.mean(out_r["adv"]),
                    d_fake=jnp.mean(out_f["adv"]), d_cls_accuracy=acc)


def train_step(state, frozen, images, *, cfg, g_tx, d_tx):
  """One G and one D update on the same batch (D sees G's fakes from before its update)."""
  batch = inputs(frozen, images, cfg)
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), state["step"])
  (_, (fake, g_metrics)), g_grads = jax.value_and_grad(generator_loss, has_aux=True)(
      state["g_params"], state, frozen, batch, rng, cfg)
  (_, d_metrics), d_grads = jax.value_and_grad(discriminator_loss, has_aux=True)(
      state["d_params"], state, batch, jax.lax.stop_gradient(fake), cfg)
  g_up, g_opt = g_tx.update(g_grads, state["g_opt"], state["g_params"])
  d_up, d_opt = d_tx.update(d_grads, state["d_opt"], state["d_params"])
  g_params = optax.apply_updates(state["g_params"], g_up)
  d_params = optax.apply_updates(state["d_params"], d_up)
  new = dict(step=state["step"] + 1, g_params=g_params, d_params=d_params, g_opt=g_opt, d_opt=d_opt,
             g_spec=spade.spectral_update(g_params, state["g_spec"]),
             d_spec=spade.spectral_update(d_params, state["d_spec"]))
  metrics = dict(g_metrics, **d_metrics, loss=g_metrics["g_loss"] + d_metrics["d_loss"],
                 psnr=jnp.mean(vqgan_io.psnr(batch[0], fake)))
  return new, metrics


def frozen_params(cfg, centroids, backbone=None):
  """The fixed inputs of the step: backbone, centroids and the perceptual network."""
  if backbone is None:
    backbone = grid_features.load_backbone(cfg.backbone_weights, (cfg.feature_layer,))
  frozen = dict(backbone=backbone, centroids=jnp.asarray(centroids, jnp.float32))
  if cfg.loss.perceptual > 0:
    frozen["perceptual"] = grid_features.load_backbone(cfg.loss.perceptual_weights, grid_features.PERCEPTUAL_LAYERS)
  return frozen


def tokenizer_params(state, frozen):
  return dict(backbone=frozen["backbone"], centroids=frozen["centroids"],
              generator=dict(params=state["g_params"], spectral=state["g_spec"]))


def train_generator(config, workdir, centroids, backbone=None):
  """Trains the generator for config.grid_kmeans.train.num_steps; returns (tokenizer params, history)."""
  cfg = config.grid_kmeans
  frozen = frozen_params(cfg, centroids, backbone)
  g_tx, d_tx = make_optimizers(cfg)
  state = init_state(cfg, jax.random.PRNGKey(cfg.seed), g_tx, d_tx)
  step_fn = jax.jit(functools.partial(train_step, cfg=cfg, g_tx=g_tx, d_tx=d_tx))
  iterator = vqgan_io.train_images(config, workdir)
  writer = vqgan_io.make_writer(workdir)
  tok = image_tokenizers.get(config)
  grid_images = vqgan_io.grid_batch(config, workdir)
  history, t0 = [], time.time()
  for step in range(cfg.train.num_steps):
    state, metrics = step_fn(state, frozen, next(iterator))
    done = step + 1
    if done % cfg.train.log_every == 0 or done == cfg.train.num_steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      m["steps_per_sec"] = done / (time.time() - t0)
      vqgan_io.check_finite(m, done)
      writer.write_scalars(done, {f"generator/{k}": v for k, v in m.items()})
      history.append(dict(step=done, **m))
      logging.info("generator: step %d  %s", done, {k: round(v, 4) for k, v in m.items()})
    if done % cfg.train.image_every == 0 or done == cfg.train.num_steps:
      params = tokenizer_params(state, frozen)
      recon = np.asarray(tok.decode(params, tok.encode(params, grid_images)))
      writer.write_images(done, {"generator/reconstructions": np.concatenate(
          [np.concatenate(list(grid_images), 1), np.concatenate(list(recon), 1)], 0)[None]})
  writer.close()
  return jax.device_get(tokenizer_params(state, frozen)), history


def train_tokenizer(config, workdir):
  """k-means (resumed if interrupted, skipped when finished), then the generator; writes
  WORKDIR/tokenizer/params.npz and eval.json. Returns the eval metrics."""
  from magvlt_jax.tools import fit_kmeans  # pylint: disable=import-outside-toplevel
  cfg = config.grid_kmeans
  if cfg.feature_source != "effnet_lite0":
    raise ValueError("the generator trains on pixels through the backbone: config.grid_kmeans.feature_source "
                     f"={cfg.feature_source!r}; precomputed npz features cover k-means only "
                     "(python -m magvlt_jax.tools.fit_kmeans)")
  t0 = time.time()
  backbone = grid_features.load_backbone(cfg.backbone_weights, (cfg.feature_layer,))
  centroids, km_history = fit_kmeans.fit_vocabulary(config, workdir, backbone)
  params, history = train_generator(config, workdir, centroids, backbone)
  tok = image_tokenizers.get(config)
  round_trip = jax.jit(lambda p, im: (lambda c: (c, tok.decode_float(p, c)))(tok.encode(p, im)))
  result = vqgan_io.evaluate_round_trip(config, workdir, params, round_trip, tok.vocab_size)
  result.update(train_seconds=time.time() - t0, kmeans_inertia=km_history[-1][1] if km_history else None)
  vqgan_io.export(workdir, params, result, history)
  return result
