"""Latency / throughput of MAGVLT's masked decoding loops (transformer only, no VQGAN).

Times T2I (config.decoding.t2i_steps, default 10) and I2T (length probe + i2t_steps, default 12)
at batch 1 and 32, with random params, for each model size. Prints a markdown table and appends
it, with the command line, to benchmarks/RESULTS.md.

  python benchmarks/bench_decoding.py --sizes tiny            # CPU: minutes
  python benchmarks/bench_decoding.py --sizes tiny,base       # base (371M params) needs a GPU/TPU
  python benchmarks/bench_decoding.py --sizes base --dtype bfloat16

Columns: compile = first call (trace + compile + one run); step = steady-state wall time of one
whole decode call (median of --repeats); per-item = step / batch.
"""
import argparse
import datetime
import os
import statistics
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from magvlt_jax import configs_util, decoding  # noqa: E402
from magvlt_jax.models import transformer  # noqa: E402
from magvlt_jax.sampler import model_logits_fn  # noqa: E402

EOS = 1
HEADER = ("| size | task | batch | steps | compile s | decode s | per item ms | device | dtype |\n"
          "|---|---|---|---|---|---|---|---|---|")


def timed(fn, repeats):
  """(compile seconds of fn(0), median seconds of fn(1..repeats))."""
  t = time.perf_counter()
  jax.block_until_ready(fn(0))
  compile_s = time.perf_counter() - t
  times = []
  for i in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(i + 1))
    times.append(time.perf_counter() - t)
  return compile_s, statistics.median(times)


def bench_size(size, batches, repeats, dtype):
  config = configs_util.load_config(f"configs/magvlt.py:{size}")
  config.model.dtype = dtype
  model = transformer.from_config(config)
  params = transformer.init_params(config, jax.random.PRNGKey(0))
  n_txt, n_img = int(config.sequence.text_length), int(config.sequence.image_tokens)
  v_img = int(config.sequence.image_vocab_size)
  t2i_spec = decoding.spec_from_config(config, "t2i", eos_id=EOS)
  i2t_spec = decoding.spec_from_config(config, "i2t", eos_id=EOS)
  t2i = jax.jit(lambda p, k, t, l: decoding.text_to_image(model_logits_fn(model, p), t2i_spec, k,
                                                          t, l).image_codes)
  i2t = jax.jit(lambda p, k, c: decoding.image_to_text(model_logits_fn(model, p), i2t_spec, k,
                                                       c).text_ids)
  rows = []
  device = jax.devices()[0].device_kind
  for b in batches:
    rng = np.random.RandomState(b)
    text = np.full((b, n_txt), EOS, np.int32)
    text[:, :10] = rng.randint(3, 100, (b, 10))
    length = np.full((b,), 11, np.int32)
    codes = rng.randint(0, v_img, (b, n_img)).astype(np.int32)
    for task, fn, steps in (
        ("t2i", lambda i: t2i(params, jax.random.PRNGKey(i), text, length), t2i_spec.num_steps),
        ("i2t", lambda i: i2t(params, jax.random.PRNGKey(i), codes), i2t_spec.num_steps)):
      compile_s, step_s = timed(fn, repeats)
      row = (f"| {size} | {task} | {b} | {steps} | {compile_s:.1f} | {step_s:.3f} | "
             f"{1000 * step_s / b:.1f} | {device} | {dtype} |")
      print(row, flush=True)
      rows.append(row)
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--sizes", default="tiny", help="comma list of tiny,base,large")
  parser.add_argument("--batches", default="1,32")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--dtype", default="float32", help="model compute dtype (bfloat16 on GPU/TPU)")
  parser.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "RESULTS.md"))
  parser.add_argument("--no_append", action="store_true")
  args = parser.parse_args(argv)
  batches = [int(b) for b in args.batches.split(",")]
  print(HEADER)
  rows = []
  for size in args.sizes.split(","):
    rows += bench_size(size.strip(), batches, args.repeats, args.dtype)
  if not args.no_append:
    append_results(args.results, "Decoding latency", "bench_decoding.py", argv, HEADER, rows)
  return rows


def append_results(path, title, script, argv, header, rows, load_note=""):
  """Appends one RESULTS.md section: `## title (time, jax, devices, CPUs, load)`, the command
  line that produced it and the table (shared by the benchmarks that print markdown rows)."""
  command = f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  with open(path, "a", encoding="utf-8") as f:
    f.write(f"\n## {title} ({stamp}, jax {jax.__version__}, "
            f"{jax.device_count()} x {jax.devices()[0].platform}, {os.cpu_count()} CPUs, "
            f"load average {load}{load_note})\n\n`{command}`\n\n"
            + header + "\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
  main()
