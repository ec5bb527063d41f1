"""Training FLOPs per step of the tiny image tokenizers, and the step counts that give each one the
tiny VQ-GAN's total training compute (issue 17: compare tokenizers at an equal training budget).

  python benchmarks/bench_tokenizer_flops.py [key=value ...]

Counts XLA's cost analysis of the compiled train step (abstract params: nothing is initialised or
run) for: the VQ-GAN trainer's step without and with its discriminator (`vqgan_trainer.train_step`,
gan=False / True), AugVAE-ML's and AugVAE-SL's step (`augvae_trainer.train_step`), at each
tokenizer's configured batch size. The budget is config.vqgan.train.num_steps steps of the VQ-GAN
(its discriminator counted from loss.disc_start on); AugVAE's share is split between ML and SL by
--ml_fraction of the FLOPs. Overrides are `key=value` on configs/magvlt.py:tiny, as in
bench_tokenizer_synthetic.py. Prints one JSON line.
"""
import argparse
import functools
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from magvlt_jax import configs_util  # noqa: E402
from magvlt_jax.models import augvae, vqgan  # noqa: E402
from magvlt_jax.train import augvae_trainer, vqgan_trainer  # noqa: E402


def compiled_flops(fn, *args) -> float:
  """XLA's FLOP count of `jax.jit(fn)` compiled for these (abstract) arguments."""
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def _images(cfg, batch):
  return jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.uint8)


def vqgan_step_flops(vcfg, gan: bool) -> float:
  gen_tx, disc_tx = vqgan_trainer.make_optimizers(vcfg)
  init = functools.partial(vqgan_trainer.init_state, vcfg, gen_tx=gen_tx, disc_tx=disc_tx)
  state = nn.meta.unbox(jax.eval_shape(init, jax.random.PRNGKey(0)))
  step = functools.partial(vqgan_trainer.train_step, vcfg=vcfg, gen_tx=gen_tx, disc_tx=disc_tx, gan=gan)
  return compiled_flops(lambda s, x: step(s, x, None), state, _images(vcfg, vcfg.train.batch_size))


def augvae_step_flops(acfg, stage: str) -> float:
  tx = augvae_trainer.make_optimizer(acfg, stage)
  params = augvae.abstract_params(acfg, stage)
  opt_state = jax.eval_shape(tx.init, params)
  stats = jax.eval_shape(vqgan.init_vq_stats, params["quantize"]["embedding"])
  step = functools.partial(augvae_trainer.train_step, cfg=acfg, stage=stage, tx=tx)
  return compiled_flops(lambda p, o, s, x: step(p, o, s, x, None), params, opt_state, stats,
                        _images(acfg, acfg.train.batch_size))


def equal_budget(config, ml_fraction: float) -> dict:
  v, a = config.vqgan, config.augvae
  f = dict(vqgan=vqgan_step_flops(v, gan=False), vqgan_gan=vqgan_step_flops(v, gan=True),
           augvae_ml=augvae_step_flops(a, "ml"), augvae_sl=augvae_step_flops(a, "sl"))
  n = int(v.train.num_steps)
  n_gan = max(0, n - max(0, int(v.loss.disc_start)))
  budget = (n - n_gan) * f["vqgan"] + n_gan * f["vqgan_gan"]
  ml_steps = round(ml_fraction * budget / f["augvae_ml"])
  sl_steps = round((budget - ml_steps * f["augvae_ml"]) / f["augvae_sl"])
  return dict({f"{k}_gflop_per_step": round(x / 1e9, 3) for k, x in f.items()},
              vqgan_batch=int(v.train.batch_size), augvae_batch=int(a.train.batch_size),
              vqgan_steps=n, vqgan_gan_steps=n_gan, budget_tflop=round(budget / 1e12, 3),
              ml_fraction=ml_fraction, augvae_ml_steps=ml_steps, augvae_sl_steps=sl_steps,
              augvae_sl_only_steps=round(budget / f["augvae_sl"]))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/magvlt.py:tiny")
  parser.add_argument("--ml_fraction", type=float, default=0.5,
                      help="share of AugVAE's FLOP budget spent on AugVAE-ML (the rest on SL)")
  args = parser.parse_args(argv)
  config = configs_util.load_config("configs/magvlt.py:tiny")
  for item in args.overrides:
    configs_util.apply_override(config, item)
  out = equal_budget(config, args.ml_fraction)
  out.update(overrides=args.overrides, device=jax.devices()[0].platform)
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
