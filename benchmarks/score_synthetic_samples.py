"""Scores a trained tiny run's samples on more prompts than the training-time grids (16): restores a
checkpoint of WORKDIR, generates T2I images for the first N eval captions and I2T captions for the
same N eval images, and prints the fraction whose colour / shape / place (and all three) match, as
`train/samples.synthetic_scores` computes them (the tokenizer's reconstructions are the T2I ceiling).

  python benchmarks/score_synthetic_samples.py --workdir=/tmp/magvlt_tiny --num=64
  python benchmarks/score_synthetic_samples.py --workdir=/tmp/magvlt_tiny --step=2000 \
      decoding.image_temperature='(1.0, 0.3)'
  python benchmarks/score_synthetic_samples.py --workdir=/tmp/magvlt_tiny --num=128 --candidates=8

`--candidates=N` scores what the Colab `Sampler` returns: the best of N samples per prompt and per
image under config.decoding.rerank (likelihood without CLIP weights); the default scores single
samples, as the grids logged during training do.

Binding (several objects per scene, e.g. data.synthetic.max_objects=2): `t2i_obj_color_place` is
the fraction of the prompts' objects drawn in their place in their colour, `i2t_triple_f1` the
micro F1 of the captions' (colour, shape, place) triples against the image's; right colours on
swapped objects score 0. `*_2obj` keys repeat them over the two-object scenes only
(synthetic.binding_scores).

The model, tokenizer and data come from WORKDIR/config.json; `key=value` overrides (Python
literals) apply on top (decoding.* is what makes sense to change). Prints one JSON line.

`forced_i2t_*` separates learning from decoding: each eval image with its reference caption, only
the colour word (or the shape word, or the first place word) masked, scored right when the model
ranks the true word first among that attribute's words. Captions can only be as right as this.
For the causal systems (ARGVLT, BiART) the word is ranked by its next-token logits after the true
prefix (nothing to mask).
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from magvlt_jax import checkpoints  # noqa: E402
from magvlt_jax import image_tokenizers  # noqa: E402
from magvlt_jax import configs_util  # noqa: E402
from magvlt_jax import sampler  # noqa: E402
from magvlt_jax import sequence as seq  # noqa: E402
from magvlt_jax import text as text_lib  # noqa: E402
from magvlt_jax.data import pipeline  # noqa: E402
from magvlt_jax.data import synthetic  # noqa: E402
from magvlt_jax.train import samples  # noqa: E402
from magvlt_jax.train import trainer  # noqa: E402


# The first word of a place name decides the row ("top" / "middle" / "bottom", or "center").
ATTRIBUTE_WORDS = {"color": tuple(synthetic.COLORS), "shape": synthetic.SHAPES,
                   "place": tuple(dict.fromkeys(p.split()[0] for p in synthetic.PLACES))}


def teacher_forced_i2t(setup, params, batch, tokenizer) -> dict:
  """{'forced_i2t_color', ...}: accuracy of the attribute word with only that word masked."""
  config = setup.config
  layout = seq.layout_from_config(config, seq.Task.I2T)
  codes = setup.image_tokenizer.encode(setup.tokenizer_params, jnp.asarray(batch["image"]))
  text, length = np.asarray(batch["text"]), np.asarray(batch["text_length"])
  rows = np.arange(len(text))

  @jax.jit
  def text_logits(params, inputs, attn):
    if setup.model.causal:  # AR systems: next-token logits of the true prefix (the objective's)
      return setup.objective.logits(params, seq.Task.I2T, codes, jnp.asarray(text),
                                    jnp.asarray(length))[1]
    logits_fn = sampler.model_logits_fn(setup.model, params)
    return logits_fn(inputs, attn, layout=layout, outputs=("text",))["text"]

  out = {}
  for attribute, words in ATTRIBUTE_WORDS.items():
    pieces = [tokenizer.encode_ids(w) for w in words]
    if any(len(p) != 1 for p in pieces):
      continue  # a word spelled with several pieces: no single slot to mask
    ids = np.array([p[0] for p in pieces])
    hits = np.isin(text, ids) & (np.arange(text.shape[1])[None] < length[:, None])
    has = hits.any(axis=1)
    slot = hits.argmax(axis=1)
    masked = np.zeros(text.shape, bool)
    masked[rows[has], slot[has]] = True
    inputs = seq.build_input(layout, codes, jnp.asarray(text), text_masked=jnp.asarray(masked),
                             image_vocab_size=int(config.sequence.image_vocab_size))
    logits = np.asarray(text_logits(params, inputs, seq.attention_mask(layout, jnp.asarray(length))))
    ranked = ids[logits[rows, slot][:, ids].argmax(axis=1)]
    out[f"forced_i2t_{attribute}"] = float((ranked == text[rows, slot])[has].mean()) if has.any() else 0.0
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--step", type=int, default=-1, help="checkpoint step; -1: latest")
  ap.add_argument("--num", type=int, default=64, help="eval examples (prompts and images)")
  ap.add_argument("--seed", type=int, default=123)
  ap.add_argument("--candidates", type=int, default=0,
                  help="0: one sample per prompt / image, as the training-time grids; N: the "
                       "Colab Sampler's best of N (config.decoding.rerank)")
  ap.add_argument("overrides", nargs="*")
  args = ap.parse_args(argv)
  config = checkpoints.load_config(args.workdir)
  if config.data.name != "synthetic":
    raise SystemExit(f"{args.workdir} was trained on data.name={config.data.name!r}; this scores "
                     f"the built-in synthetic data only")
  for item in args.overrides:
    configs_util.apply_override(config, item)
  tokenizer = text_lib.get_or_train_tokenizer(config, args.workdir)
  setup = trainer.Setup(config, args.workdir, tokenizer,
                        image_tokenizers.params_for_run(config, args.workdir))
  store = checkpoints.CheckpointStore(os.path.join(args.workdir, "checkpoints"))
  step = store.latest_step() if args.step < 0 else args.step
  if step is None:
    raise SystemExit(f"no checkpoint in {args.workdir}/checkpoints")
  state, _ = store.restore(step, setup.abstract_state())
  store.close()
  batch = next(iter(pipeline.create_eval_iterator(config, tokenizer, workdir=args.workdir,
                                                  batch_size=args.num)))
  prompts = tokenizer.decode(batch["text"])
  if args.candidates > 0:
    best = sampler.Sampler(config, state.params, setup.tokenizer_params, tokenizer)
    images = np.stack([np.asarray(im) for im in best.text_to_image(
        prompts, n=args.candidates, seed=args.seed)])
    captions = best.image_to_text(batch["image"], n=args.candidates, seed=args.seed + 1)
    recon = best.reconstruct(batch["image"])
  else:
    t2i, i2t = samples.sample_fns(setup)
    k1, k2 = jax.random.split(jax.random.key(args.seed))
    images = np.asarray(t2i(state.params, setup.tokenizer_params, jnp.asarray(batch["text"]),
                            jnp.asarray(batch["text_length"]), k1))
    text_ids, recon = i2t(state.params, setup.tokenizer_params, jnp.asarray(batch["image"]), k2)
    captions = tokenizer.decode(np.asarray(text_ids))
  scores = samples.synthetic_scores(prompts, captions, images, np.asarray(recon))
  scores.update(teacher_forced_i2t(setup, state.params, batch, tokenizer))
  print(json.dumps({"workdir": args.workdir, "step": int(step), "num": int(len(images)),
                    "candidates": args.candidates, "overrides": args.overrides, **{k: round(v, 3) for k, v in sorted(scores.items())}}))


if __name__ == "__main__":
  main()
