"""Decoding wall time of MAGVLT (masked, 10 / 12 steps) vs ARGVLT (KV cache, one slot per step)
at the same transformer size, through the decoder registry (transformer only, no VQGAN).

Rows: magvlt t2i / i2t (config.decoding.t2i_steps / i2t_steps), argvlt t2i (n_img cached steps),
argvlt i2t (n_txt cached steps, no early stop), and argvlt t2i without the cache (the full causal
pass recomputed every step: what the cache saves). Random params; compile excluded (first call
timed separately); median of --repeats. Prints a markdown table and appends it to RESULTS.md.

  python benchmarks/bench_ar_vs_mask.py --sizes tiny --image_tokens 256   # CPU, paper's 16x16
  python benchmarks/bench_ar_vs_mask.py --sizes base --dtype bfloat16     # GPU / TPU
"""
import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from magvlt_jax import configs_util, decoders, decoding_ar  # noqa: E402
from magvlt_jax.models import transformer  # noqa: E402
from bench_decoding import append_results, timed as _timed  # noqa: E402  (same timing, same RESULTS section)

EOS = 1
HEADER = ("| size | system | task | batch | steps | compile s | decode s | per item ms | "
          "AR / MAGVLT | device | dtype |\n|---|---|---|---|---|---|---|---|---|---|---|")


def _system(system, size, dtype, image_tokens):
  config = configs_util.load_config(f"configs/{system}.py:{size}")
  config.model.dtype = dtype
  if image_tokens:
    config.sequence.image_tokens = image_tokens
  model = transformer.from_config(config)
  params = transformer.init_params(config, jax.random.PRNGKey(0))
  return config, model, params, decoders.create(config, model, eos_id=EOS)


def _fns(system, size, dtype, image_tokens):
  """[(system, task, steps, fn(params, key, text, length, codes))] of one system."""
  config, model, params, dec = _system(system, size, dtype, image_tokens)
  out = []
  for task in ("t2i", "i2t"):
    _, fn = dec.task_fn(task)
    if system == "magvlt":
      steps = int(config.decoding.t2i_steps if task == "t2i" else config.decoding.i2t_steps)
    else:
      steps = int(config.sequence.image_tokens if task == "t2i" else config.sequence.text_length)
    args = (lambda t, l, c: (t, l)) if task == "t2i" else (lambda t, l, c: (c,))
    field = "image_codes" if task == "t2i" else "text_ids"  # the generated output (else XLA drops the loop)
    out.append((system, task, steps, jax.jit(
        lambda p, k, t, l, c, fn=fn, args=args, field=field: getattr(fn(p, k, 0.0, *args(t, l, c)), field))))
  if system == "argvlt":
    spec = dec.spec("t2i")
    out.append((system, "t2i uncached", int(config.sequence.image_tokens), jax.jit(
        lambda p, k, t, l, c: decoding_ar.decode_uncached(model, p, spec, k, text_ids=t,
                                                          text_length=l).image_codes)))
  return config, params, out


def bench_size(size, batches, repeats, dtype, image_tokens):
  rows, device = [], jax.devices()[0].device_kind
  systems = {s: _fns(s, size, dtype, image_tokens) for s in ("magvlt", "argvlt")}
  config = systems["magvlt"][0]
  n_txt, n_img = int(config.sequence.text_length), int(config.sequence.image_tokens)
  for b in batches:
    rng = np.random.RandomState(b)
    text = np.full((b, n_txt), EOS, np.int32)
    text[:, :10] = rng.randint(3, 100, (b, 10))
    length = np.full((b,), 11, np.int32)
    codes = rng.randint(0, int(config.sequence.image_vocab_size), (b, n_img)).astype(np.int32)
    base = {}
    for system, (_, params, fns) in systems.items():
      for name, task, steps, fn in fns:
        compile_s, step_s = _timed(lambda i, fn=fn, params=params: fn(
            params, jax.random.PRNGKey(i), text, length, codes), repeats)
        if system == "magvlt":
          base[task] = step_s
        ratio = f"{step_s / base[task.split()[0]]:.2f}x" if system != "magvlt" else ""
        row = (f"| {size} | {name} | {task} | {b} | {steps} | {compile_s:.1f} | {step_s:.3f} | "
               f"{1000 * step_s / b:.1f} | {ratio} | {device} | {dtype} |")
        print(row, flush=True)
        rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="tiny", help="comma list of tiny,base,large")
  parser.add_argument("--batches", default="1,32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", help="model compute dtype (bfloat16 on GPU/TPU)")
  parser.add_argument("--image_tokens", type=int, default=0,
                      help="override sequence.image_tokens (256: the paper's 16x16 grid); 0 keeps the config's")
  parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  print(HEADER)
  rows = []
  for size in args.sizes.split(","):
    rows += bench_size(size.strip(), batches, args.repeats, args.dtype, args.image_tokens)
  if not args.no_append:
    append_results(args.results, "MAGVLT vs ARGVLT decoding", "bench_ar_vs_mask.py", argv, HEADER,
                   rows, load_note=": measured under load, compare rows of one table only")
  return rows


if __name__ == "__main__":
  main()
