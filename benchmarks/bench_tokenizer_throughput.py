"""Encode / decode throughput of the image tokenizers: VQ-GAN vs AugVAE-ML vs AugVAE-SL (issue 17).

Random params of each tokenizer's configured shapes (speed does not depend on the weights), images
of its configured size, one jitted call per batch; compile excluded (bench_decoding.timed: one
warm-up call, then the median of --repeats). VQ-GAN and AugVAE-SL go through the image-tokenizer
registry (uint8 in, uint8 out, exactly what the trainer and sampler call); AugVAE-ML, a training
stage only, through models/augvae (its four levels: 64x64 + 32x32 + 16x16 + 8x8 codes at 256 px).

  python benchmarks/bench_tokenizer_throughput.py --sizes tiny --batch 8
  python benchmarks/bench_tokenizer_throughput.py --sizes paper --batch 4 --repeats 2   # 256 px

tiny: configs/magvlt.py:tiny's VQ-GAN and configs/augvae.py:tiny (both 64 px -> 8x8 codes);
paper: configs/vqgan.py:f16_16384 (256 px -> 16x16 of 16384) and configs/augvae.py:ml / :sl
(256 px; SL -> 32x32 of 8192). Appends a table to RESULTS.md unless --no_append.
"""
import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from magvlt_jax import configs_util, image_tokenizers  # noqa: E402
from magvlt_jax.models import augvae, vqgan  # noqa: E402
from bench_decoding import append_results, timed  # noqa: E402  (one timer, one RESULTS writer)

HEADER = ("| size | tokenizer | image px | tokens / image | codebook | batch | encode ms/img "
          "| decode ms/img | encode img/s | decode img/s | params | device |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def _configs(size: str):
  """The run config (image_tokenizer + its section) of each tokenizer at `size`."""
  base = configs_util.load_config("configs/magvlt.py:tiny")
  vq, aug = base.copy_and_resolve_references(), base.copy_and_resolve_references()
  aug.image_tokenizer = "augvae"
  if size == "paper":
    vq.vqgan = configs_util.load_config("configs/vqgan.py:f16_16384")
    aug.augvae = configs_util.load_config("configs/augvae.py:sl")
  elif size != "tiny":
    raise ValueError(f"--sizes: unknown size {size!r}; expected tiny or paper")
  return vq, aug


def _registry_fns(config):
  tok = image_tokenizers.get(config)
  params = tok.init_params(jax.random.key(0))
  return (tok.image_size, tok.num_tokens, tok.vocab_size, params,
          jax.jit(tok.encode), jax.jit(tok.decode))


def _ml_fns(cfg):
  """AugVAE-ML: codes of all four levels, decoded together."""
  cfg = cfg.copy_and_resolve_references()
  cfg.stage = "ml"
  params = augvae.init_params(cfg, jax.random.key(0), stage="ml")
  model = augvae.AugVAE(cfg, "ml")
  encode = jax.jit(lambda p, x: model.apply({"params": p}, vqgan.to_model_range(x),
                                            method=augvae.AugVAE.encode))
  decode = jax.jit(lambda p, c: vqgan.to_uint8(model.apply({"params": p}, c,
                                                           method=augvae.AugVAE.decode)))
  tokens = sum(s * s for s in augvae.level_sides(cfg))
  return int(cfg.image_size), tokens, int(cfg.codebook_size), params, encode, decode


def bench_size(size, batch, repeats):
  vq, aug = _configs(size)
  entries = (("vqgan", _registry_fns(vq)), ("augvae-ml", _ml_fns(aug.augvae)),
             ("augvae-sl", _registry_fns(aug)))
  rows = []
  rng = np.random.default_rng(0)
  for name, (px, tokens, vocab, params, encode, decode) in entries:
    images = [jnp.asarray(rng.integers(0, 256, (batch, px, px, 3), np.uint8)) for _ in range(2)]
    codes = encode(params, images[0])
    _, enc_s = timed(lambda i: encode(params, images[i % 2]), repeats)
    _, dec_s = timed(lambda i: decode(params, codes), repeats)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    row = (f"| {size} | {name} | {px} | {tokens} | {vocab} | {batch} | {1e3 * enc_s / batch:.1f} "
           f"| {1e3 * dec_s / batch:.1f} | {batch / enc_s:.1f} | {batch / dec_s:.1f} "
           f"| {n_params:,} | {jax.devices()[0].platform} |")
    print(row, flush=True)
    rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="tiny", help="comma list of tiny,paper")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)
  print(HEADER)
  rows = []
  for size in args.sizes.split(","):
    rows += bench_size(size.strip(), args.batch, args.repeats)
  if not args.no_append:
    append_results(args.results, "Tokenizer encode / decode throughput",
                   "bench_tokenizer_throughput.py", argv, HEADER, rows,
                   load_note=": measured under load, compare rows of one table only")
  return rows


if __name__ == "__main__":
  main()
