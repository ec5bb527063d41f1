"""One GPU benchmark run: magvlt_jax and the official PyTorch MAGVLT at the anchor's settings,
side by side in the same call, written as a ratio table.

On the device machine (prepare once here: `bash benchmarks/prepare_gpu_bench.sh`, which copies
../shared/anchors into the ignored .gpu_bench/ and fetches the three pure-Python wheels the GPU
image lacks: ml-collections, clu, omegaconf):

  run(command="bash benchmarks/gpu_bench.sh", carry=[".gpu_bench"], timeout_s=600)

CPU rehearsal at small shapes (the whole pipeline, both stacks, in ~3 minutes):

  python benchmarks/bench_gpu.py --tiny

Figures (ours; the official where it has one, from ../shared/anchors/bench_official.py run as a
subprocess with DEVICE=cuda SIZE=base|large):
  train_t2i_b64     base, bf16, the trainer's train_step on the T2I task (what the official
                    figure times: T2I, CE on masked slots, AdamW, fp16 autocast there), samples/s
                    and MFU (analytic FLOPs, tools/aot_compile.analytic_train_flops);
  train_full_b64    base, the full 8:1:1 step (VQ-GAN encode of uint8 images, UnrollMask, MixSel,
                    length probe), ours only;
  train_t2i_large_b32  large at batch 32;
  sample_t2i_b32 / sample_t2i_b1   10 steps + VQ decode, images/s and latency;
  sample_i2t_64cand one image, 64 candidates x 12 steps (+ likelihood rerank; official: CLIP rerank
                    stubbed, I2T=1);
  peak memory       jax's peak_bytes_in_use after each figure (cumulative peak).
No TensorFlow on this path: the script refuses to import it (sys.modules guard).
"""
import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.modules.setdefault("tensorflow", None)  # an import of TF below fails loudly
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import numpy as np  # noqa: E402

import bench_vs_official as bvo  # noqa: E402
from magvlt_jax import image_tokenizers  # noqa: E402
from magvlt_jax.models import transformer  # noqa: E402
from magvlt_jax.tools import aot_compile  # noqa: E402

# Dense bf16 peak per chip (vendor figures) for MFU; --peak_tflops overrides.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def _peak_gb():
  stats = jax.devices()[0].memory_stats() or {}
  return round(stats.get("peak_bytes_in_use", 0) / 1e9, 2)


def _peak_flops(args):
  if args.peak_tflops:
    return args.peak_tflops * 1e12
  kind = jax.devices()[0].device_kind
  return next((v * 1e12 for k, v in PEAK_TFLOPS.items() if k in kind), 0.0)


def full_train_bench(config, params, tok_params, batch, repeats):
  """The full 8:1:1 step on uint8 images (VQ encode + UnrollMask + MixSel), random weights."""
  import functools  # pylint: disable=import-outside-toplevel
  from magvlt_jax.objectives import magvlt as obj_lib  # pylint: disable=import-outside-toplevel
  from magvlt_jax.train import optimizer as opt_lib, steps as steps_lib, train_state  # pylint: disable=import-outside-toplevel
  tok = image_tokenizers.get(config)
  model = transformer.from_config(config)
  objective = obj_lib.MagvltObjective(config, model, tok.encode, bvo.EOS, bvo.SEP)
  tx = opt_lib.make_optimizer(config)
  step = jax.jit(functools.partial(steps_lib.train_step, objective=objective, tx=tx,
                                   schedule=opt_lib.learning_rate_schedule(config),
                                   max_nonfinite_in_row=3), donate_argnums=(0,))
  s = tok.image_size
  r = np.random.RandomState(3)
  text, length = bvo._caption(config, batch)  # pylint: disable=protected-access
  data = {"image": r.randint(0, 256, (batch, s, s, 3), np.uint8),
          "image_lr": r.randint(0, 256, (batch, s, s // 2, 3), np.uint8),
          "image_tb": r.randint(0, 256, (batch, s // 2, s, 3), np.uint8),
          "text": text, "text_length": length}
  holder = {"state": train_state.TrainState.create(jax.tree.map(jax.numpy.array, params), tx)}
  metrics, rng = steps_lib.empty_metrics(objective), jax.random.key(0)

  def run(_):
    holder["state"], _ = step(holder["state"], data, tok_params, rng, metrics)
    return holder["state"].step
  first, dt = bvo.timed(run, repeats)
  return {"batch": batch, "step_s": dt, "samples_per_s": batch / dt, "first_call_s": first}


def ours(args):
  """Our figures at the settings of args (base / large, or small with --tiny)."""
  size = "small" if args.tiny else "base"
  out = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  peak = _peak_flops(args)

  def model(size_):
    config = bvo.official_shapes(size_, args.dtype)
    params = transformer.init_params(config, jax.random.key(0))
    tok_params = image_tokenizers.get(config).init_params(jax.random.key(1))
    return config, params, tok_params

  def record(name, fn, flops_config=None):
    t = time.perf_counter()
    try:
      r = fn()
    except Exception as e:  # pylint: disable=broad-except  (OOM etc.: keep the other figures)
      r = {"error": f"{type(e).__name__}: {e}"[:300]}
    r["wall_s"] = round(time.perf_counter() - t, 1)
    r["peak_gb"] = _peak_gb()
    if flops_config is not None and "samples_per_s" in r and peak:
      r["mfu"] = r["samples_per_s"] * aot_compile.analytic_train_flops(flops_config, 1) / peak
    out[name] = r
    print(name, json.dumps(r), flush=True)

  config, params, tok_params = model(size)
  b_s, b_1, b_t = args.sample_batch, 1, args.train_batch
  for b in sorted({b_1, b_s}):
    record(f"sample_t2i_b{b}", lambda b=b: bvo.sample_bench(config, params, tok_params, b, args.repeats))
  record("sample_i2t_64cand", lambda: bvo.i2t_bench(config, params, tok_params, args.candidates,
                                                    args.repeats))
  record(f"train_t2i_b{b_t}", lambda: bvo.train_bench(bvo.official_shapes(size, args.dtype),
                                                      params, b_t, args.repeats), config)
  record(f"train_full_b{b_t}", lambda: full_train_bench(bvo.official_shapes(size, args.dtype),
                                                        params, tok_params, b_t, args.repeats), config)
  del params
  if args.large_batch:
    lconfig, lparams, _ = model("small" if args.tiny else "large")
    record(f"train_t2i_large_b{args.large_batch}",
           lambda: bvo.train_bench(lconfig, lparams, args.large_batch, args.repeats), lconfig)
  return out


def official(args, size, train_b, sample_b, i2t):
  """bench_official.py as a subprocess (its own process: torch and jax never share the GPU)."""
  env = dict(os.environ, DEVICE="cpu" if args.tiny else "cuda", SIZE=size, TRAIN_B=str(train_b),
             SAMPLE_B=sample_b, REPS=str(args.repeats), OUT=args.out,
             PYTHONPATH=os.pathsep.join(p for p in (args.site, os.environ.get("PYTHONPATH", "")) if p))
  if i2t:
    env["I2T"] = "1"
  script = os.path.join(args.anchors, "bench_official.py")
  t = time.perf_counter()
  try:
    proc = subprocess.run([args.torch_python, script], env=env, capture_output=True, text=True,
                          timeout=args.official_timeout, check=False)
  except subprocess.TimeoutExpired:
    return {"error": f"bench_official did not finish in --official_timeout={args.official_timeout} s"}
  path = os.path.join(args.out, f"official_{size}_{env['DEVICE']}.json")
  if proc.returncode or not os.path.exists(path):
    print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
    return {"error": f"bench_official exited {proc.returncode}"}
  with open(path, encoding="utf-8") as f:
    result = json.load(f)
  result["wall_s"] = round(time.perf_counter() - t, 1)
  return result


def _cell(d, key, field):
  v = (d or {}).get(key, {})
  return v.get(field) if isinstance(v, dict) else None


def table(o, base, large, args):
  """Markdown rows: figure | ours | official | ratio (higher is better for ours)."""
  b_t, b_s, lb = args.train_batch, args.sample_batch, args.large_batch
  rows = [  # (label, our key, our field, official dict, official key, field, higher_is_better)
      (f"train T2I samples/s, batch {b_t}", f"train_t2i_b{b_t}", "samples_per_s", base, f"train_b{b_t}", "samples_per_s", True),
      (f"train full 8:1:1 samples/s, batch {b_t}", f"train_full_b{b_t}", "samples_per_s", None, "", "", True),
      (f"train T2I large samples/s, batch {lb}", f"train_t2i_large_b{lb}", "samples_per_s", large, f"train_b{lb}", "samples_per_s", True),
      (f"T2I images/s, batch {b_s}", f"sample_t2i_b{b_s}", "images_per_s", base, f"sample_t2i_b{b_s}", "images_per_s", True),
      ("T2I latency s, batch 1", "sample_t2i_b1", "call_s", base, "sample_t2i_b1", "call_s", False),
      (f"I2T s, 1 image x {args.candidates} candidates", "sample_i2t_64cand", "call_s", base, "sample_i2t_64cand", "call_s", False),
  ]
  lines = ["| figure | ours | official | ours / official | our MFU | our peak GB |",
           "|---|---|---|---|---|---|"]
  for label, key, field, off, okey, ofield, higher in rows:
    if key.startswith("train_t2i_large") and not lb:
      continue
    mine = _cell(o, key, field)
    theirs = _cell(off, okey, ofield) if off else None
    ratio = ""
    if mine and theirs:
      ratio = f"{(mine / theirs if higher else theirs / mine):.2f}x"
    fmt = lambda v: "n/a" if v is None else f"{v:.3g}"
    mfu = _cell(o, key, "mfu")
    lines.append(f"| {label} | {fmt(mine)} | {fmt(theirs)} | {ratio} | "
                 f"{'' if mfu is None else f'{100 * mfu:.1f}%'} | {_cell(o, key, 'peak_gb') or ''} |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--tiny", action="store_true", help="CPU rehearsal: SIZE=small, small batches")
  ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 with --tiny)")
  ap.add_argument("--train_batch", type=int, default=None)
  ap.add_argument("--large_batch", type=int, default=None, help="0: skip large")
  ap.add_argument("--sample_batch", type=int, default=None)
  ap.add_argument("--candidates", type=int, default=None)
  ap.add_argument("--repeats", type=int, default=None)
  ap.add_argument("--peak_tflops", type=float, default=0.0)
  ap.add_argument("--anchors", default=os.path.join(os.path.dirname(HERE), ".gpu_bench", "anchors"))
  ap.add_argument("--site", default="", help="extra PYTHONPATH for the torch run (omegaconf)")
  ap.add_argument("--torch_python", default="",
                  help="python with torch (default: /work/venv_torch/bin/python with --tiny)")
  ap.add_argument("--official_timeout", type=int, default=None, help="s; 300 on GPU, 1200 --tiny")
  ap.add_argument("--skip_official", action="store_true")
  ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/bench_gpu"))
  ap.add_argument("--results", default="", help="append the table to this RESULTS.md")
  args = ap.parse_args(argv)
  tiny = args.tiny
  defaults = dict(dtype="float32" if tiny else "bfloat16", train_batch=2 if tiny else 64,
                  large_batch=0 if tiny else 32, sample_batch=1 if tiny else 32,
                  candidates=2 if tiny else 64, repeats=1 if tiny else 3,
                  official_timeout=1200 if tiny else 300)
  defaults["torch_python"] = "/work/venv_torch/bin/python" if tiny else sys.executable
  for k, v in defaults.items():
    if getattr(args, k) in (None, ""):
      setattr(args, k, v)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.time()
  o = ours(args)
  base = large = None
  if not args.skip_official:
    size = "small" if tiny else "base"
    samples = ",".join(str(b) for b in sorted({1, args.sample_batch}))
    base = official(args, size, args.train_batch, samples, i2t=not tiny)
    print("official", size, json.dumps(base)[:2000], flush=True)
    if args.large_batch and not tiny:
      large = official(args, "large", args.large_batch, "1", i2t=False)
      print("official large", json.dumps(large)[:2000], flush=True)
  md = table(o, base, large, args)
  stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
  load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
  head = (f"bench_gpu ({stamp}, {o['device']}, jax {o['jax']}, {'tiny: SIZE=small on CPU' if tiny else 'base/large'}, "
          f"dtype {args.dtype}, medians of {args.repeats}, load average {load}, {time.time() - t0:.0f} s)")
  print(head + "\n\n" + md, flush=True)
  with open(os.path.join(args.out, "bench_gpu.json"), "w", encoding="utf-8") as f:
    json.dump({"ours": o, "official_base": base, "official_large": large}, f, indent=1)
  with open(os.path.join(args.out, "bench_gpu.md"), "w", encoding="utf-8") as f:
    f.write(head + "\n\n" + md + "\n")
  if args.results:
    with open(args.results, "a", encoding="utf-8") as f:
      f.write(f"\n### {head}\n\n`python benchmarks/bench_gpu.py {' '.join(argv or sys.argv[1:])}`\n\n{md}\n")
  return o, base, large


if __name__ == "__main__":
  main()
