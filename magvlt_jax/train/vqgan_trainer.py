"""VQ-GAN tokenizer training: `train_tokenizer(config, workdir)` (full magvlt config).

Losses (taming `VQLPIPSWithDiscriminator`): rec (L1/L2) + perceptual (LPIPS, when
config.vqgan.loss.vgg_weights is given) + codebook + beta * commitment + adaptive-weight hinge GAN
from `loss.disc_start` on. One forward and one vjp through the generator per step: the
reconstruction cotangent is d(nll)/d(recon) + d_weight * d(g_loss)/d(recon), and d_weight compares
the two terms' gradient norms at the decoder's last conv (taming's `calculate_adaptive_weight`).
The steps before `disc_start` are a second jitted variant without any discriminator compute.

Writes WORKDIR/tokenizer/: checkpoints/ (orbax, resumable: state + data-iterator state),
params.npz (final generator params, read by `vqgan.load_params`), eval.json (PSNR/SSIM/usage).
"""
import functools
import json
import logging
import os
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from magvlt_jax import checkpoints, parallel
from magvlt_jax.models import discriminator as disc_lib
from magvlt_jax.models import lpips as lpips_lib
from magvlt_jax.models import vqgan
from magvlt_jax.train import prefetch as prefetch_lib
from magvlt_jax.train import vqgan_io


@struct.dataclass
class VQTrainState:
  step: jnp.ndarray
  params: Any  # generator (encoder, quantizer, decoder): what vqgan.load_params returns
  disc_params: Any
  opt_state: Any
  disc_opt_state: Any
  vq_stats: Any  # cluster_size [K], embed_sum [K, D] (EMA codebook), usage [K] (dead-code restart)


def make_schedule(o, num_steps, key="config.vqgan.optimizer"):
  """Learning rate of optimizer config `o` over `num_steps`: linear warmup over o.warmup_steps, then
  constant or cosine decay to 10% (o.schedule). Shared by the tokenizer trainers; `key` names o."""
  schedule = o.get("schedule", "constant")
  if schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, max(o.warmup_steps, 1),
                                              max(num_steps, o.warmup_steps + 1), o.learning_rate * 0.1)
  if schedule == "constant":
    return (optax.join_schedules([optax.linear_schedule(0.0, o.learning_rate, o.warmup_steps),
                                  optax.constant_schedule(o.learning_rate)], [o.warmup_steps])
            if o.get("warmup_steps", 0) else o.learning_rate)
  raise ValueError(f"{key}.schedule={schedule!r}: expected 'constant' or 'cosine'")


def make_optimizers(vcfg):
  o = vcfg.optimizer
  lr = make_schedule(o, vcfg.train.num_steps)
  make = lambda: optax.adam(lr, b1=o.b1, b2=o.b2)
  return make(), make()


def init_state(vcfg, rng, gen_tx, disc_tx):
  """Boxed (logically partitioned) initial state; unbox with nn.meta.unbox."""
  s = vcfg.image_size
  images = jnp.zeros((1, s, s, 3), jnp.float32)
  k_gen, k_disc = jax.random.split(rng)
  params = vqgan.VQGAN(vcfg).init(k_gen, images)["params"]
  disc_params = disc_lib.from_config(vcfg).init(k_disc, images)["params"]
  codebook = params["quantize"]["embedding"]
  stats = vqgan.init_vq_stats(codebook.value)
  names = dict(cluster_size=("codebook",), usage=("codebook",), embed_sum=("codebook", "embed"))
  stats = {k: nn.LogicallyPartitioned(v, names[k]) for k, v in stats.items()}
  return VQTrainState(step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params,
                      opt_state=gen_tx.init(params), disc_opt_state=disc_tx.init(disc_params), vq_stats=stats)


def _last_layer_vjp(params, feats, dtype):
  """vjp of the decoder's conv_out w.r.t. its kernel at `feats` (taming's `last_layer`)."""
  p = params["decoder"]["conv_out"]
  layer = nn.Conv(p["kernel"].shape[-1], (3, 3), padding="SAME", dtype=dtype)
  _, vjp = jax.vjp(lambda k: layer.apply({"params": {"kernel": k, "bias": p["bias"]}}, feats), p["kernel"])
  return lambda g: vjp(g.astype(dtype))[0]


def adaptive_weight(gw_nll, gw_adv, disc_weight, max_weight):
  """taming: ||d nll/d W_last|| / (||d g_loss/d W_last|| + 1e-4), clamped to [0, max], detached."""
  w = jnp.linalg.norm(gw_nll.astype(jnp.float32)) / (jnp.linalg.norm(gw_adv.astype(jnp.float32)) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, min=0.0, max=max_weight)) * disc_weight


def quantizer_update(q, stats, params, z_flat, codes, key):
  """After the optimizer step, with quantizer config `q`: usage statistics, the EMA codebook step
  (q.use_ema) and dead-code restart (q.dead_code_restart) over latents z_flat [N, D] and their
  codes [N]. Shared by the tokenizer trainers. Returns (params, stats, number restarted)."""
  codebook = params["quantize"]["embedding"]
  stats = vqgan.track_usage(stats, codes, q.usage_decay)
  if q.use_ema:
    ema_stats, codebook = vqgan.ema_update(stats, z_flat, codes, q.ema_decay)
    stats = dict(stats, **ema_stats)
  restarted = jnp.zeros((), jnp.int32)
  if q.dead_code_restart:
    stats, codebook, restarted = vqgan.restart_dead_codes(key, stats, codebook, z_flat, codes,
                                                             q.dead_code_threshold)
  params = dict(params, quantize=dict(params["quantize"], embedding=codebook.astype(
      params["quantize"]["embedding"].dtype)))
  return params, stats, restarted


def reconstruction_loss(x, recon, lpips_params, loss_cfg, dtype):
  """rec (L1 / L2, weighted) + perceptual (LPIPS, when its params are given); -> (sum, (rec, perc)).
  Shared by every tokenizer trainer (VQ-GAN here, AugVAE in augvae_trainer.py)."""
  err = jnp.abs(x - recon) if loss_cfg.reconstruction == "l1" else (x - recon) ** 2
  rec = loss_cfg.reconstruction_weight * jnp.mean(err)
  perc = (loss_cfg.perceptual_weight * jnp.mean(lpips_lib.LPIPS(dtype=dtype).apply({"params": lpips_params}, x, recon))
          if lpips_params is not None else jnp.zeros((), jnp.float32))
  return rec + perc, (rec, perc)


def train_step(state, images, lpips_params, *, vcfg, gen_tx, disc_tx, gan: bool):
  """One generator (+ discriminator when `gan`) update. images: uint8 [B,H,W,3]."""
  lc = vcfg.loss
  dtype = jnp.dtype(vcfg.dtype)
  model, disc = vqgan.VQGAN(vcfg), disc_lib.from_config(vcfg)
  x = vqgan.to_model_range(images)
  rng = jax.random.fold_in(jax.random.PRNGKey(vcfg.seed), state.step)
  k_drop, k_restart = jax.random.split(rng)

  def gen_forward(params):
    out = model.apply({"params": params}, x, deterministic=vcfg.dropout_rate == 0.0, rngs={"dropout": k_drop})
    codebook_term = 0.0 if vcfg.quantizer.use_ema else out["codebook_loss"]
    qloss = lc.codebook_weight * (codebook_term + vcfg.quantizer.beta * out["commitment_loss"])
    return (out["recon"], qloss), out

  (recon, qloss), gen_vjp, out = jax.vjp(gen_forward, state.params, has_aux=True)

  nll_fn = functools.partial(reconstruction_loss, x, lpips_params=lpips_params, loss_cfg=lc, dtype=dtype)
  (nll, (rec, perc)), g_recon = jax.value_and_grad(nll_fn, has_aux=True)(recon)
  metrics = dict(rec_loss=rec, perceptual_loss=perc, codebook_loss=out["codebook_loss"],
                 commitment_loss=out["commitment_loss"])
  disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
  if gan:
    g_loss, g_adv = jax.value_and_grad(
        lambda r: disc_lib.generator_loss(disc.apply({"params": state.disc_params}, r)))(recon)
    last_vjp = _last_layer_vjp(state.params, jax.lax.stop_gradient(out["features"]), dtype)
    d_weight = adaptive_weight(last_vjp(g_recon), last_vjp(g_adv), lc.disc_weight, lc.adaptive_weight_max)
    g_recon = g_recon + d_weight * g_adv

    def d_loss_fn(dp):
      real = disc.apply({"params": dp}, x)
      fake = disc.apply({"params": dp}, jax.lax.stop_gradient(recon))
      return disc_lib.hinge_d_loss(real, fake), (jnp.mean(real), jnp.mean(fake))

    (d_loss, (real_mean, fake_mean)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(state.disc_params)
    d_updates, disc_opt_state = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
    disc_params = optax.apply_updates(state.disc_params, d_updates)
    metrics.update(g_loss=g_loss, d_loss=d_loss, d_weight=d_weight, logits_real=real_mean, logits_fake=fake_mean)
    nll = nll + d_weight * g_loss
  (grads,) = gen_vjp((g_recon, jnp.ones((), jnp.float32)))
  updates, opt_state = gen_tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params, stats, restarted = quantizer_update(vcfg.quantizer, state.vq_stats, params,
                                              out["z"].reshape(-1, out["z"].shape[-1]), out["codes"], k_restart)
  metrics.update(loss=nll + qloss, grad_norm=optax.tree.norm(grads), restarted_codes=restarted,
                 psnr=jnp.mean(vqgan_io.psnr(x, recon)), ssim=jnp.mean(vqgan_io.ssim(x, recon)),
                 **vqgan.codebook_metrics(out["codes"], vcfg.codebook_size))
  new_state = state.replace(step=state.step + 1, params=params, disc_params=disc_params, opt_state=opt_state,
                            disc_opt_state=disc_opt_state, vq_stats=stats)
  return new_state, metrics


def _setup(config, workdir):
  """Mesh, rules, jitted steps and the (restored or fresh) state."""
  vcfg = config.vqgan
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.logical_rules(config.mesh.strategy)
  gen_tx, disc_tx = make_optimizers(vcfg)
  init_fn = functools.partial(init_state, vcfg, gen_tx=gen_tx, disc_tx=disc_tx)
  abstract = parallel.abstract_state(init_fn, jax.random.PRNGKey(0), rules=rules)
  shardings = parallel.state_shardings(abstract, mesh, rules)
  store = checkpoints.CheckpointStore(os.path.join(workdir, "tokenizer", "checkpoints"),
                                      keep=vcfg.train.keep_checkpoints, save_every=vcfg.train.checkpoint_every)
  state, data_state = store.restore_latest(parallel.abstract_with_shardings(abstract, shardings))
  if state is None:
    state = parallel.init_sharded(init_fn, shardings, mesh, rules)(jax.random.PRNGKey(vcfg.seed))
  rep = parallel.replicated(mesh)
  steps = {gan: parallel.jit_train_step(
      functools.partial(train_step, vcfg=vcfg, gen_tx=gen_tx, disc_tx=disc_tx, gan=gan), shardings,
      parallel.batch_sharding(mesh, rules), mesh=mesh, rules=rules, extra_in_shardings=(rep,))
      for gan in (False, True)}
  return mesh, rules, state, data_state, store, steps


def train_tokenizer(config, workdir):
  """Trains (or resumes) the tokenizer; returns the final eval metrics dict."""
  vcfg = config.vqgan
  lpips_params = vqgan_io.load_lpips(vcfg)
  mesh, rules, state, data_state, store, steps = _setup(config, workdir)
  iterator = vqgan_io.train_images(config, workdir, data_state)
  writer = vqgan_io.make_writer(workdir)
  grid_images = vqgan_io.grid_batch(config, workdir)
  start = int(state.step)
  logging.info("tokenizer: training steps %d..%d (batch %d, %s)", start, vcfg.train.num_steps,
               vcfg.train.batch_size, "GAN from step %d" % vcfg.loss.disc_start)
  t0, history = time.time(), []
  # Batch k+1 is read and put on the mesh while step k runs (see train/prefetch.py).
  feed = prefetch_lib.DevicePrefetch(iterator, lambda b: parallel.global_batch(b, mesh, rules))
  for step in range(start, vcfg.train.num_steps):
    batch, data_state = next(feed)
    state, metrics = steps[step >= vcfg.loss.disc_start](state, batch, lpips_params)
    done = step + 1
    if done < vcfg.train.num_steps:
      feed.prefetch()
    if done % vcfg.train.log_every == 0 or done == vcfg.train.num_steps:
      m = {k: float(v) for k, v in jax.device_get(metrics).items()}
      m["steps_per_sec"] = (done - start) / (time.time() - t0)
      vqgan_io.check_finite(m, done)
      writer.write_scalars(done, {f"tokenizer/{k}": v for k, v in m.items()})
      history.append(dict(step=done, **m))
    if done % vcfg.train.image_every == 0 or done == vcfg.train.num_steps:
      writer.write_images(done, {"tokenizer/reconstructions": vqgan_io.recon_grid(state.params, grid_images, vcfg)})
    store.save(done, state, data_state=data_state, force=done == vcfg.train.num_steps)
  store.close()
  params = jax.device_get(state.params)
  result = vqgan_io.evaluate(config, workdir, params)
  result.update(train_steps=int(state.step), train_seconds=time.time() - t0)
  vqgan_io.export(workdir, params, result, history)
  writer.write_scalars(int(state.step), {f"tokenizer/eval_{k}": v for k, v in result.items()
                                         if isinstance(v, (int, float))})
  writer.close()
  return result
