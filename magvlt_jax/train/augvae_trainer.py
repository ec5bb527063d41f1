"""AugVAE tokenizer training (L-Verse): AugVAE-ML for config.augvae.train.ml_steps, then AugVAE-SL
fine-tuned from it (`augvae.ml_to_sl`) for train.sl_steps. `train_tokenizer(config, workdir)`.

Losses: the VQ-GAN trainer's reconstruction + perceptual term (`vqgan_trainer.reconstruction_loss`)
+ beta * commitment; the one shared codebook moves by the EMA rule (`vqgan.ema_update`, the paper's;
config.augvae.quantizer.use_ema) over the assignments of every quantized level at once, or with
use_ema=False by a codebook loss (VQ-GAN's); optional dead-code restart
(quantizer.dead_code_restart). Both through `vqgan_trainer.quantizer_update` (one implementation).
The learning-rate schedule is the VQ-GAN trainer's (`make_schedule`), restarted for each stage.
No GAN (L-Verse trains AugVAE without one).
A single-device loop with the VQ-GAN trainer's orbax store (checkpoints.CheckpointStore, one per
stage: state + data-iterator state every train.checkpoint_every steps; a rerun resumes, ML then SL);
data, metric writer and image metrics are the VQ-GAN trainer's edges (train/vqgan_io.py).

Writes WORKDIR/tokenizer/: checkpoints/{ml,sl}/ (orbax), params.npz (SL, read by the "augvae" image
tokenizer), ml_params.npz, eval.json (SL eval PSNR / SSIM / usage / perplexity; ml_eval: the same
for AugVAE-ML's full four-level reconstruction; the last ML metrics per level; train and ML seconds).
"""
import functools
import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import optax

from magvlt_jax import checkpoints
from magvlt_jax.models import augvae
from magvlt_jax.models import vqgan
from magvlt_jax.train import vqgan_io
from magvlt_jax.train import vqgan_trainer

PARAMS_FILE = vqgan.PARAMS_FILE
ML_PARAMS_FILE = "ml_params.npz"


def make_optimizer(cfg, stage):
  """Adam over one stage's steps (train.ml_steps / sl_steps) with the VQ-GAN trainer's schedule
  (config.augvae.optimizer: warmup_steps, schedule constant | cosine); each stage starts it anew."""
  o = cfg.optimizer
  steps = cfg.train.ml_steps if stage == "ml" else cfg.train.sl_steps
  lr = vqgan_trainer.make_schedule(o, steps, key="config.augvae.optimizer")
  return optax.adam(lr, b1=o.b1, b2=o.b2)


def opt_state_step(opt_state):
  """Adam's step count (a per-step seed for dead-code restart without extra state)."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  return next(s for s in jax.tree.leaves(opt_state, is_leaf=is_adam) if is_adam(s)).count


def train_step(params, opt_state, stats, images, lpips_params, *, cfg, stage, tx):
  """One update of `stage` ("ml" | "sl"). images uint8 [B,S,S,3]. Returns (params, opt_state,
  stats, metrics) with per-level usage / perplexity (`usage_l{i}`)."""
  x = vqgan.to_model_range(images)
  model = augvae.AugVAE(cfg, stage)

  q = cfg.quantizer

  def loss_fn(p):
    out = model.apply({"params": p}, x)
    nll, (rec, perc) = vqgan_trainer.reconstruction_loss(x, out["recon"], lpips_params, cfg.loss,
                                                         jnp.dtype(cfg.dtype))
    codebook_term = 0.0 if q.use_ema else out["codebook_loss"]
    return nll + codebook_term + q.beta * out["commitment_loss"], (out, rec, perc)

  (loss, (out, rec, perc)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  # The VQ-GAN trainer's EMA step / dead-code restart, over every level's latents at once.
  z, codes = augvae.flat_latents(out)
  key = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), opt_state_step(opt_state))
  params, stats, restarted = vqgan_trainer.quantizer_update(q, stats, params, z, codes, key)
  metrics = dict(loss=loss, rec_loss=rec, restarted_codes=restarted, perceptual_loss=perc,
                 commitment_loss=out["commitment_loss"], codebook_loss=out["codebook_loss"],
                 psnr=jnp.mean(vqgan_io.psnr(x, out["recon"])),
                 **vqgan.codebook_metrics(codes, cfg.codebook_size))
  for i, c in out["codes"].items():
    m = vqgan.codebook_metrics(c, cfg.codebook_size)
    metrics.update({f"usage_l{i}": m["usage"], f"perplexity_l{i}": m["perplexity"]})
  return params, opt_state, stats, metrics


def fresh_state(params, tx):
  """A stage's train state: its own step count (0 at the stage's start), params, Adam state and the
  quantizer statistics (EMA codebook, usage), all arrays (what the checkpoint store saves)."""
  return dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
              stats=vqgan.init_vq_stats(params["quantize"]["embedding"]))


def _state_step(state, images, lpips_params, **kw):
  params, opt_state, stats, metrics = train_step(state["params"], state["opt_state"], state["stats"], images,
                                                 lpips_params, **kw)
  return dict(step=state["step"] + 1, params=params, opt_state=opt_state, stats=stats), metrics


def _store(cfg, workdir, stage):
  """One orbax store per stage (their states differ in shape): WORKDIR/tokenizer/checkpoints/<stage>."""
  return checkpoints.CheckpointStore(os.path.join(workdir, "tokenizer", "checkpoints", stage),
                                     keep=cfg.train.keep_checkpoints, save_every=cfg.train.checkpoint_every)


def _restore(cfg, store, stage):
  """(state, data_state) of the stage's latest checkpoint, or (None, None)."""
  tx = make_optimizer(cfg, stage)
  abstract = jax.eval_shape(lambda p: fresh_state(p, tx), augvae.abstract_params(cfg, stage))
  return store.restore_latest(abstract)


def _stage(config, state, stage, iterator, writer, lpips_params, store):
  """Runs `stage` from its state's step to its configured steps, saving to `store` every
  train.checkpoint_every steps and at the end (steps numbered from ML's first: SL's offset by
  train.ml_steps); returns (params, history)."""
  cfg = config.augvae
  num_steps, offset = (cfg.train.ml_steps, 0) if stage == "ml" else (cfg.train.sl_steps, cfg.train.ml_steps)
  step_fn = jax.jit(functools.partial(_state_step, cfg=cfg, stage=stage, tx=make_optimizer(cfg, stage)))
  start = int(state["step"])
  history, t0 = [], time.time()
  for step in range(start, num_steps):
    state, metrics = step_fn(state, next(iterator), lpips_params)
    done = step + 1
    if done % cfg.train.log_every == 0 or done == num_steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      m["steps_per_sec"] = (done - start) / (time.time() - t0)
      vqgan_io.check_finite(m, offset + done)
      writer.write_scalars(offset + done, {f"tokenizer_{stage}/{k}": v for k, v in m.items()})
      history.append(dict(step=offset + done, stage=stage, **m))
    store.save(offset + done, state, data_state=iterator.get_state(), force=done == num_steps)
  store.close()
  return jax.device_get(state["params"]), history


def evaluate(config, workdir, params, max_images=None, stage="sl"):
  """Reconstruction PSNR / SSIM over the eval split, codebook usage / perplexity of its codes: the
  SL tokenizer's, or with stage="ml" AugVAE-ML's full reconstruction from all four levels' codes."""
  cfg = config.augvae
  encode, decode = ((augvae.encode_sl, augvae.decode_sl) if stage == "sl"
                    else (augvae.encode_ml, augvae.decode_ml))

  @jax.jit
  def round_trip(p, images):
    codes = encode(p, vqgan.to_model_range(images), cfg)
    return codes, decode(p, codes, cfg)
  return vqgan_io.evaluate_round_trip(config, workdir, params, round_trip, cfg.codebook_size, max_images)


def train_tokenizer(config, workdir):
  """ML training, ML -> SL conversion, SL fine-tuning, evaluation, export; returns the eval dict.
  Resumes from the latest checkpoint: SL's if SL has started (ML's final params from
  ml_params.npz, written when ML ends), else ML's; with the data iterator where it stopped."""
  cfg = config.augvae
  lpips_params = vqgan_io.load_lpips(cfg)
  out_dir = os.path.join(workdir, "tokenizer")
  stores = {s: _store(cfg, workdir, s) for s in augvae.STAGES}
  sl_state, data_state = _restore(cfg, stores["sl"], "sl")
  ml_state = None
  if sl_state is None:
    ml_state, data_state = _restore(cfg, stores["ml"], "ml")
  iterator = vqgan_io.train_images(config, workdir, data_state)
  writer = vqgan_io.make_writer(workdir)
  t0 = time.time()
  start = "resuming SL" if sl_state else "resuming ML" if ml_state else "from scratch"
  logging.info("augvae: ML %d steps, then SL %d steps (batch %d), %s", cfg.train.ml_steps,
               cfg.train.sl_steps, cfg.train.batch_size, start)
  hist_ml = []
  if sl_state is None:
    if ml_state is None:
      ml_state = fresh_state(augvae.init_params(cfg, jax.random.PRNGKey(cfg.seed), stage="ml"),
                             make_optimizer(cfg, "ml"))
    ml, hist_ml = _stage(config, ml_state, "ml", iterator, writer, lpips_params, stores["ml"])
    if jax.process_index() == 0:
      vqgan.save_params_npz(os.path.join(out_dir, ML_PARAMS_FILE), ml)
    sl_state = fresh_state(augvae.ml_to_sl(ml, cfg), make_optimizer(cfg, "sl"))
  else:
    ml = load_ml_params(cfg, out_dir)
  ml_seconds = time.time() - t0
  sl, hist_sl = _stage(config, sl_state, "sl", iterator, writer, lpips_params, stores["sl"])
  train_seconds = time.time() - t0
  result = evaluate(config, workdir, sl)
  result.update(train_seconds=train_seconds, ml_seconds=ml_seconds, ml_last=hist_ml[-1] if hist_ml else {},
                ml_eval=evaluate(config, workdir, ml, stage="ml"))
  if jax.process_index() == 0:
    vqgan.save_params_npz(os.path.join(out_dir, PARAMS_FILE), sl)
    with open(os.path.join(out_dir, "eval.json"), "w") as f:
      json.dump(dict(result, history=(hist_ml + hist_sl)[-5:]), f, indent=2)
  writer.write_scalars(cfg.train.ml_steps + cfg.train.sl_steps,
                       {f"tokenizer/eval_{k}": v for k, v in result.items() if isinstance(v, (int, float))})
  writer.close()
  return result


def load_ml_params(cfg, tok_dir):
  """AugVAE-ML params from TOKENIZER_DIR/ml_params.npz, every key and shape checked."""
  from magvlt_jax import image_tokenizers  # pylint: disable=import-outside-toplevel
  return image_tokenizers.load_checked_npz(os.path.join(tok_dir, ML_PARAMS_FILE), "augvae",
                                           augvae.abstract_params(cfg, "ml"),
                                           f"variant {cfg.variant!r}, AugVAE-ML")
