"""magvlt_jax at the official benchmark's shapes (../shared/anchors/bench_official.py), so the two
stacks can be timed side by side on one machine.

  python benchmarks/bench_vs_official.py --size small          # CPU: what DEVICE=cpu SIZE=small times
  python benchmarks/bench_vs_official.py --size base --dtype bfloat16 --train_batches 64 \
      --sample_batches 1,32 --i2t_candidates 64                 # GPU: bench_official's defaults

Shapes (bench_official.py): the official_base config (324 slots, 16384 image + 49408 text
vocabulary, the taming f16 VQGAN); SIZE=small shrinks the transformer to 256 wide x 4 layers x 4
heads and the VQGAN to 32 base channels, 64 z channels, 64-dim codes (16384 codes). Random
weights. Figures, each the median of --repeats calls after one warm-up (compile) call:
  train_b{B}      the trainer's own train_step (steps.train_step: AdamW, clip 4.0, the
                  non-finite guard) on the T2I task only, label-smoothed CE on the masked image
                  slots, no UnrollMask / MixSel, fed codes, as the official figure (which feeds
                  codes to a minimal T2I trainer around the official model);
  sample_t2i_b{B} 10 masked decoding steps + VQ decode to pixels (decoders.MaskedDecoder);
  sample_i2t      one image: VQ encode, --i2t_candidates captions x 12 steps, likelihood rerank
                  of the candidates when more than one (the official path reranks with CLIP).
--breakdown 1,8 adds where a T2I call goes (whole loop, its forwards alone, the sampling maths
alone, the VQ decode). Writes JSON (--out) with the same keys as bench_official.py.
--train_flops 8 prints XLA's FLOP count of that train step at batch 8 instead (compiles only).
"""
import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decoding import timed  # noqa: E402  (first call s, median of the next `repeats`)
from magvlt_jax import configs_util, decoders, image_tokenizers, rerank  # noqa: E402
from magvlt_jax.models import transformer  # noqa: E402
from magvlt_jax.objectives import magvlt as magvlt_objective  # noqa: E402
from magvlt_jax.train import optimizer as optimizer_lib  # noqa: E402
from magvlt_jax.train import steps as steps_lib  # noqa: E402
from magvlt_jax.train import train_state  # noqa: E402

EOS, SEP = 49407, 49406  # CLIP's EOS (= pad) and a spare id for the SEP slot
CAPTION_LEN = 13  # "a close up of a vase with different flowers in it" + EOS in ClipBPE ids


def official_shapes(size: str, dtype: str = "float32"):
  """The config bench_official.py times: official_base / official_large, or base shrunk (small)."""
  variant = "official_large" if size == "large" else "official_base"
  config = configs_util.load_config(f"configs/magvlt.py:{variant}")
  if size == "small":
    config.model.embed_dim, config.model.num_layers, config.model.num_heads = 256, 4, 4
    v = config.vqgan
    v.base_channels, v.z_channels, v.embed_dim = 32, 64, 64
  elif size not in ("base", "large"):
    raise ValueError(f"--size={size!r}: expected small, base or large")
  config.model.dtype = dtype
  config.vqgan.dtype = dtype
  config.decoding.t2i_steps = 10
  config.decoding.i2t_steps = 12
  config.decoding.rerank = "likelihood"
  return config


def _caption(config, batch):
  n_txt = int(config.sequence.text_length)
  rng = np.random.RandomState(0)
  text = np.full((batch, n_txt), EOS, np.int32)
  text[:, :CAPTION_LEN - 1] = rng.randint(300, 40000, (1, CAPTION_LEN - 1))
  return text, np.full((batch,), CAPTION_LEN, np.int32)


def _train_step(config, batch):
  """The trainer's jitted T2I train step at bench_official.py's settings, and a batch of codes."""
  config.train.task_weights = (1.0, 0.0, 0.0)
  config.train.use_unroll = config.train.use_mixsel = False
  model = transformer.from_config(config)
  objective = magvlt_objective.MagvltObjective(config, model, lambda tp, codes: codes, EOS, SEP)
  tx = optimizer_lib.make_optimizer(config)
  step = jax.jit(functools.partial(steps_lib.train_step, objective=objective, tx=tx,
                                   schedule=optimizer_lib.learning_rate_schedule(config),
                                   max_nonfinite_in_row=int(config.train.max_nonfinite_in_row)),
                 donate_argnums=(0,))
  n_img, vocab = int(config.sequence.image_tokens), int(config.sequence.image_vocab_size)
  text, length = _caption(config, batch)
  data = {"image": np.random.RandomState(1).randint(0, vocab, (batch, n_img)).astype(np.int32),
          "text": text, "text_length": length}
  data["image_lr"] = data["image_tb"] = data["image"]  # unused without MixSel
  return step, objective, tx, data


def train_bench(config, params, batch, repeats):
  step, objective, tx, data = _train_step(config, batch)
  holder = {"state": train_state.TrainState.create(jax.tree.map(jnp.array, params), tx)}
  metrics = steps_lib.empty_metrics(objective)
  rng = jax.random.key(0)

  def run(_):
    holder["state"], _ = step(holder["state"], data, None, rng, metrics)
    return holder["state"].step
  first, dt = timed(run, repeats)
  return {"batch": batch, "step_s": dt, "samples_per_s": batch / dt, "first_call_s": first}


def train_flops(config, batch):
  """XLA's FLOP count of the compiled train step (lowered on abstract params: nothing runs)."""
  step, objective, tx, data = _train_step(config, batch)
  params = jax.eval_shape(lambda: transformer.init_params(config, jax.random.key(0)))
  state = jax.eval_shape(lambda p: train_state.TrainState.create(p, tx), params)
  metrics = jax.eval_shape(lambda: steps_lib.empty_metrics(objective))
  cost = step.lower(state, data, None, jax.random.key(0), metrics).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {"batch": batch, "gflop": float(cost["flops"]) / 1e9}


def t2i_fn(config, model, image_tokenizer):
  dec = decoders.create(config, model, eos_id=EOS, vocab_limit=0)
  _, run = dec.task_fn("t2i")
  decode_fn = jax.jit(run)
  pixels_fn = jax.jit(image_tokenizer.decode)

  def t2i(params, tok_params, key, text, length):
    out = decode_fn(params, key, np.float32(0.0), text, length)
    return pixels_fn(tok_params, out.image_codes)
  return t2i


def sample_bench(config, params, tok_params, batch, repeats):
  model = transformer.from_config(config)
  t2i = t2i_fn(config, model, image_tokenizers.get(config))
  text, length = _caption(config, batch)
  first, dt = timed(lambda i: t2i(params, tok_params, jax.random.key(i), text, length), repeats)
  return {"batch": batch, "call_s": dt, "images_per_s": batch / dt, "first_call_s": first}


def t2i_breakdown(config, params, tok_params, batch, repeats):
  """Where a T2I call goes: the whole loop (no VQ), its 10 transformer forwards alone, the
  per-step sampling maths alone (image_step on fixed logits), and the VQ decode."""
  from magvlt_jax import decoding, decoding_image, sequence  # pylint: disable=import-outside-toplevel
  model = transformer.from_config(config)
  spec = decoding.spec_from_config(config, "t2i", eos_id=EOS)
  steps, n_img = spec.num_steps, spec.layout.n_img
  text, length = _caption(config, batch)
  logits_fn = decoders.model_logits_fn
  loop = jax.jit(lambda p, k: decoding.text_to_image(logits_fn(model, p), spec, k, text,
                                                     length).image_codes)

  @jax.jit
  def forwards(p):
    attn = sequence.attention_mask(spec.layout, length)

    def body(i, acc):  # inputs change with i, so the forward cannot be hoisted out of the loop
      masked = jnp.broadcast_to(jnp.arange(n_img) >= i * (n_img // steps), (batch, n_img))
      inputs = sequence.build_input(spec.layout, jnp.full((batch, n_img), i, jnp.int32), text,
                                    masked, None, image_vocab_size=spec.image_vocab_size)
      out = logits_fn(model, p)(inputs, attn, layout=spec.layout, outputs=("image",))["image"]
      return acc + out.sum(axis=(1, 2))
    return jax.lax.fori_loop(0, steps, body, jnp.zeros((batch,), jnp.float32))

  keep = decoding_image.keep_table(steps, n_img, "cosine")
  temps = decoding_image.linear_schedule(spec.image_temperature, steps)
  gumbel = decoding_image.linear_schedule(spec.gumbel_scale, steps)

  @jax.jit
  def sampling(key, logits):
    def body(i, carry):
      codes, masked, conf = carry
      return decoding_image.image_step(jax.random.fold_in(key, i), logits, codes, masked,
                                       jnp.ones_like(masked), conf, i, order="maskgit", keep=keep,
                                       temperatures=temps, gumbel_scales=gumbel)
    init = (jnp.zeros((batch, n_img), jnp.int32), jnp.ones((batch, n_img), bool),
            jnp.zeros((batch, n_img), jnp.float32))
    return jax.lax.fori_loop(0, steps, body, init)[0]

  logits = jax.random.normal(jax.random.key(5), (batch, n_img, spec.image_vocab_size))
  codes = np.random.RandomState(4).randint(0, spec.image_vocab_size, (batch, n_img)).astype(np.int32)
  pixels = jax.jit(image_tokenizers.get(config).decode)
  return {"batch": batch,
          "loop_s": timed(lambda i: loop(params, jax.random.key(i)), repeats)[1],
          "forwards_s": timed(lambda i: forwards(params), repeats)[1],
          "sampling_maths_s": timed(lambda i: sampling(jax.random.key(i), logits), repeats)[1],
          "vq_decode_s": timed(lambda i: pixels(tok_params, codes), repeats)[1]}


def i2t_bench(config, params, tok_params, candidates, repeats):
  model = transformer.from_config(config)
  tok = image_tokenizers.get(config)
  dec = decoders.create(config, model, eos_id=EOS, vocab_limit=0)
  _, run = dec.task_fn("i2t")
  _, loglik = dec.loglik_fn("text")
  encode = jax.jit(tok.encode)
  decode_fn = jax.jit(run)
  score_fn = jax.jit(loglik)
  image = np.random.RandomState(2).randint(0, 256, (1, tok.image_size, tok.image_size, 3), np.uint8)

  def call(i):
    codes = jnp.repeat(encode(tok_params, image), candidates, axis=0)
    out = decode_fn(params, jax.random.key(i), np.float32(0.0), codes)
    if candidates == 1:
      return out.text_ids
    scores = score_fn(params, codes, out.text_ids, out.text_length)
    return out.text_ids[rerank.best_of(scores, candidates)[0]]
  first, dt = timed(call, repeats)
  return {"images": 1, "candidates": candidates, "call_s": dt, "first_call_s": first}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="small", help="small | base | large (bench_official SIZE)")
  ap.add_argument("--dtype", default="float32", help="compute dtype (bfloat16 on GPU/TPU)")
  ap.add_argument("--train_batches", default="1,8")
  ap.add_argument("--sample_batches", default="1,8")
  ap.add_argument("--i2t_candidates", type=int, default=1, help="0: skip the I2T figure")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--breakdown", default="", help="comma list of T2I batches to break down")
  ap.add_argument("--out", default="", help="write ours_<size>_<platform>.json into this folder")
  ap.add_argument("--train_flops", default="", help="comma list of batches: print the train "
                  "step's XLA FLOP count and exit (compiles only)")
  args = ap.parse_args(argv)
  config = official_shapes(args.size, args.dtype)
  if args.train_flops:
    for b in args.train_flops.split(","):
      print(json.dumps(train_flops(config, int(b))), flush=True)
    return None
  params = transformer.init_params(config, jax.random.key(0))
  tok_params = image_tokenizers.get(config).init_params(jax.random.key(1))
  out = {"size": args.size, "device": jax.devices()[0].device_kind, "jax": jax.__version__,
         "params_transformer": int(sum(x.size for x in jax.tree.leaves(params))),
         "loadavg_start": os.getloadavg()}
  batches = lambda s: [int(b) for b in s.split(",") if b]
  for b in batches(args.sample_batches):
    out[f"sample_t2i_b{b}"] = sample_bench(config, params, tok_params, b, args.repeats)
    print(f"sample_t2i_b{b}", out[f"sample_t2i_b{b}"], flush=True)
  for b in batches(args.breakdown):
    out[f"t2i_breakdown_b{b}"] = t2i_breakdown(config, params, tok_params, b, args.repeats)
    print(f"t2i_breakdown_b{b}", out[f"t2i_breakdown_b{b}"], flush=True)
  if args.i2t_candidates:
    out["sample_i2t"] = i2t_bench(config, params, tok_params, args.i2t_candidates, args.repeats)
    print("sample_i2t", out["sample_i2t"], flush=True)
  for b in batches(args.train_batches):
    out[f"train_b{b}"] = train_bench(config, params, b, args.repeats)
    print(f"train_b{b}", out[f"train_b{b}"], flush=True)
  out["loadavg_end"] = os.getloadavg()
  print(json.dumps(out, indent=1))
  if args.out:
    path = os.path.join(args.out, f"ours_{args.size}_{jax.devices()[0].platform}.json")
    with open(path, "w", encoding="utf-8") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
