"""How much of a synthetic scene survives the image tokenizer: trains the tiny tokenizer of
config.image_tokenizer (VQ-GAN by default) with config overrides (or loads a trained one) and scores its reconstructions with synthetic.read_scene
(colour, shape, place and all three right), plus code usage, code entropy and `probe_color` /
`probe_shape` (a linear classifier on each image's bag of codes, `code_probe`). T2I samples can at
best match their prompts as often as the reconstructions do; a near-uniform code distribution on
these flat-background scenes means the transformer has to learn noise.

  python benchmarks/bench_tokenizer_synthetic.py --workdir=/tmp/tok_l2 \
      vqgan.loss.reconstruction=l2 vqgan.train.num_steps=1200 vqgan.train.batch_size=8
  python benchmarks/bench_tokenizer_synthetic.py --tokenizer=/tmp/magvlt_tiny/tokenizer
  python benchmarks/bench_tokenizer_synthetic.py --tokenizer=/tmp/aug/tokenizer --stage=ml image_tokenizer=augvae

Overrides are `key=value` on configs/magvlt.py:tiny (Python literals; strings as they are).
Prints one JSON line; --grid writes originals above reconstructions as a PNG.
"""
import argparse
import collections
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from magvlt_jax import configs_util  # noqa: E402
from magvlt_jax.data import synthetic  # noqa: E402
from magvlt_jax import image_tokenizers  # noqa: E402
from magvlt_jax.models import augvae, vqgan  # noqa: E402
from magvlt_jax.train import augvae_trainer  # noqa: E402


class AugVAEML:
  """AugVAE-ML's full reconstruction (all four levels' codes: 340 per 64 px image) behind the
  registry's uint8 encode / decode, for --stage=ml (ML is a training stage, not a tokenizer)."""

  def __init__(self, config):
    self.cfg = config.augvae
    self.image_size, self.vocab_size = int(self.cfg.image_size), int(self.cfg.codebook_size)

  def encode(self, params, images_uint8):
    return augvae.encode_ml(params, vqgan.to_model_range(images_uint8), self.cfg)

  def decode(self, params, codes):
    return vqgan.to_uint8(augvae.decode_ml(params, codes, self.cfg))

  def load_params(self, tok_dir):
    return image_tokenizers.load_checked_npz(os.path.join(tok_dir, augvae_trainer.ML_PARAMS_FILE), "augvae",
                                             augvae.abstract_params(self.cfg, "ml"), "AugVAE-ML")


def score(config, vq_params, num_images: int, seed: int, tok=None):
  """(scores dict, originals, reconstructions); `tok` defaults to config's image tokenizer."""
  tok = tok or image_tokenizers.get(config)
  size = tok.image_size
  data = list(synthetic.examples(num_images, seed=seed, size=size))
  images = jnp.asarray(np.stack([img for _, img, _, _ in data]))
  encode, decode = jax.jit(tok.encode), jax.jit(tok.decode)
  codes = np.asarray(encode(vq_params, images))
  recon = np.asarray(decode(vq_params, jnp.asarray(codes)))
  out = synthetic.match_rates([list(s.objects) for _, _, _, s in data],
                              [synthetic.read_scene(r) for r in recon])
  counts = np.array(list(collections.Counter(codes.ravel().tolist()).values()), np.float64)
  p = counts / counts.sum()
  out.update(codes_used=int(len(counts)), code_entropy_bits=float(-(p * np.log2(p)).sum()),
             num_images=num_images)
  probe_data = list(synthetic.examples(800, seed=seed + 1, size=size))
  probe_codes = np.concatenate([np.asarray(encode(vq_params, jnp.asarray(np.stack(
      [img for _, img, _, _ in probe_data[i:i + 100]])))) for i in range(0, len(probe_data), 100)])
  out.update(code_probe([s.objects[0] for _, _, _, s in probe_data], probe_codes,
                        tok.vocab_size))
  return out, np.asarray(images), recon


def code_probe(objects, codes, codebook_size: int, train_fraction: float = 0.75) -> dict:
  """How directly the codes name colour and shape: a least-squares linear classifier on each
  image's bag of codes (code counts, position ignored), fit on the first 3/4 of the images and
  scored on the rest. A tokenizer that spreads colour over combinations of shared codes scores
  low here, and the transformer then has to learn those combinations in both directions."""
  bags = np.stack([np.bincount(c.ravel(), minlength=codebook_size) for c in codes]).astype(np.float64)
  features = np.concatenate([bags, np.ones((len(bags), 1))], axis=1)
  n_fit = int(len(bags) * train_fraction)
  out = {}
  for attr in ("color", "shape"):
    labels = np.array([getattr(o, attr) for o in objects])
    classes = sorted(set(labels))
    onehot = (labels[:, None] == np.array(classes)[None]).astype(np.float64)
    weights = np.linalg.lstsq(features[:n_fit], onehot[:n_fit], rcond=None)[0]
    predicted = np.array(classes)[(features[n_fit:] @ weights).argmax(axis=1)]
    out[f"probe_{attr}"] = float((predicted == labels[n_fit:]).mean())
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("overrides", nargs="*", help="key=value overrides of configs/magvlt.py:tiny")
  parser.add_argument("--workdir", help="train a tokenizer into WORKDIR/tokenizer")
  parser.add_argument("--tokenizer", help="score an existing tokenizer directory instead")
  parser.add_argument("--num_images", type=int, default=96)
  parser.add_argument("--seed", type=int, default=99, help="synthetic seed of the scored scenes")
  parser.add_argument("--grid", help="write originals / reconstructions (16 each) to this PNG")
  parser.add_argument("--stage", default="", choices=("", "ml"),
                      help="ml: score AugVAE-ML's full reconstruction (ml_params.npz) instead of the tokenizer")
  args = parser.parse_args()
  config = configs_util.load_config("configs/magvlt.py:tiny")
  for item in args.overrides:
    configs_util.apply_override(config, item)
  train_s = None
  if args.tokenizer:
    tok_dir = args.tokenizer
  elif args.workdir:
    start = time.time()
    image_tokenizers.get(config).train(config, args.workdir)
    train_s = time.time() - start
    tok_dir = os.path.join(args.workdir, "tokenizer")
  else:
    raise SystemExit("give --workdir (train) or --tokenizer (score only)")
  tok = AugVAEML(config) if args.stage == "ml" else image_tokenizers.get(config)
  result, images, recon = score(config, tok.load_params(tok_dir), args.num_images, args.seed, tok)
  result.update(train_s=train_s, overrides=args.overrides, tokenizer=tok_dir, stage=args.stage or "tokenizer")
  print(json.dumps(result), flush=True)
  if args.grid:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    from magvlt_jax.train.samples import image_grid  # pylint: disable=import-outside-toplevel
    grid = np.concatenate([image_grid(images[:16], 8), image_grid(recon[:16], 8)], 0)
    Image.fromarray(grid).save(args.grid)


if __name__ == "__main__":
  main()
