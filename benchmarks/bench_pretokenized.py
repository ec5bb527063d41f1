"""What pre-tokenized data (config.train.pretokenized, data/pretokenized.py) saves: train-step
FLOPs per example (XLA-counted) and measured tiny step time, encoder in the step vs codes read from
the table.

  python benchmarks/bench_pretokenized.py flops --variant=base     # lowering only, no run
  python benchmarks/bench_pretokenized.py step --workdir=/tmp/bench_pretok --images=300 \
      --steps=20 --rounds=6

flops: XLA's cost analysis of the lowered gradient of the objective's loss (one fixed task each,
abstract params: nothing runs; layers unrolled so XLA counts every one) at batch 4, with the
batch's `image` encoded in the step vs `image_codes` read; the difference is what the table saves,
the rest (MixSel's in-step encode of its pixel-mixed image included) stays. Per task and as the
expectation over config.train.task_weights. One JSON line.

step: a COCO-format folder of 640x480 JPEGs (bench_input_pipeline.make_coco_folder), the tiny
config on it with a random-init tiny VQ-GAN (same FLOPs as a trained one) saved as the frozen
tokenizer, `prepare_data --tokenize --crops=K` timed once, then both modes compiled (in-step encode
with cache_image_codes=off, and the table) and timed in interleaved segments of --steps steps for
--rounds rounds: (a) the jitted train step alone on one fixed device batch, (b) the trainer's loop
body (real iterator, DevicePrefetch one step ahead). Median wall and process-CPU seconds per step
(CPU time is the steadier number on a shared box: other jobs stretch wall time, not our CPU
seconds); one JSON line.
"""
import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))
sys.path.insert(0, _HERE)
from magvlt_jax import configs_util  # noqa: E402
from magvlt_jax import image_tokenizers  # noqa: E402
from magvlt_jax import objectives  # noqa: E402
from magvlt_jax import sequence as seq  # noqa: E402
from magvlt_jax.models import transformer  # noqa: E402


class _Text:
  eos_id, sep_id = 1, 2


def _flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def step_flops(config, batch: int = 4) -> dict:
  """{task: {'encode': per-example FLOPs with the encoder in the step, 'codes': reading codes}}."""
  config.model.scan_layers = False  # XLA counts a while body once: unroll for the count
  tok = image_tokenizers.get(config)
  model = transformer.from_config(config)
  params = transformer.param_shapes(config)
  tok_params = jax.eval_shape(tok.init_params, jax.random.key(0))
  s, n_txt = int(config.data.image_size), int(config.sequence.text_length)
  sds = jax.ShapeDtypeStruct
  full = {"image": sds((batch, s, s, 3), jnp.uint8),
          "image_lr": sds((batch, s, s // 2, 3), jnp.uint8),
          "image_tb": sds((batch, s // 2, s, 3), jnp.uint8), "text": sds((batch, n_txt), jnp.int32),
          "text_length": sds((batch,), jnp.int32),
          "image_codes": sds((batch, tok.num_tokens), jnp.int32)}
  out = {}
  for task in (seq.Task.T2I, seq.Task.I2T, seq.Task.IT2IT):
    row = {}
    for mode in ("encode", "codes"):
      obj = objectives.create(config, model, tok, _Text())
      if mode == "codes":
        obj.read_cached_codes()
      b = {k: full[k] for k in obj.batch_keys}
      grad = jax.grad(lambda p, tp, b, o=obj, t=int(task):
                      o.loss_fn(p, tp, b, jax.random.key(0), t)[0])
      row[mode] = _flops(grad, params, tok_params, b) / batch
    out[seq.Task(task).name] = row
  return out


def flops_main(args):
  from bench_encoder_flops import encoder_flops  # pylint: disable=import-outside-toplevel
  from magvlt_jax.tools import aot_compile  # pylint: disable=import-outside-toplevel
  config = configs_util.load_config(f"configs/magvlt.py:{args.variant}")
  enc = encoder_flops(config)
  per_task = step_flops(config)
  w = np.asarray(config.train.task_weights, np.float64)
  w = w / w.sum()
  expect = {m: float(sum(wi * per_task[t][m] for wi, t in zip(w, ("T2I", "I2T", "IT2IT"))))
            for m in ("encode", "codes")}
  g = lambda x: round(x / 1e9, 3)
  print(json.dumps({
      "variant": args.variant, "image_size": int(config.data.image_size),
      "use_mixsel": bool(config.train.use_mixsel), "task_weights": list(config.train.task_weights),
      "encoder_gflop_per_image": g(enc),
      "analytic_transformer_train_gflop_per_example":
          g(aot_compile.analytic_train_flops(config, 1)),
      "xla_step_gflop_per_example":
          {t: {m: g(v) for m, v in r.items()} for t, r in per_task.items()},
      "xla_step_gflop_per_example_expected": {m: g(v) for m, v in expect.items()},
      "saved_gflop_per_example": g(expect["encode"] - expect["codes"]),
      "saved_share_of_step": round(1 - expect["codes"] / expect["encode"], 4)}))


def _setup_data(args):
  from bench_input_pipeline import make_coco_folder  # pylint: disable=import-outside-toplevel
  from magvlt_jax.models import vqgan  # pylint: disable=import-outside-toplevel
  from magvlt_jax.tools import prepare_data  # pylint: disable=import-outside-toplevel
  root = os.path.join(args.workdir, "coco")
  if not os.path.exists(os.path.join(root, "annotations", "captions_train2014.json")):
    make_coco_folder(root, args.images)
  config = configs_util.load_config(f"configs/magvlt.py:{args.variant}")
  config.data.name, config.data.path = "coco_captions_folder", root
  config.data.data_dir = os.path.join(args.workdir, "data")
  tok_dir = os.path.join(args.workdir, "tokenizer")
  if not os.path.exists(os.path.join(tok_dir, vqgan.PARAMS_FILE)):
    params = image_tokenizers.get(config).init_params(jax.random.key(0))
    vqgan.save_params_npz(os.path.join(tok_dir, vqgan.PARAMS_FILE), params)
  config.vqgan.checkpoint = tok_dir
  config.train.pretokenized_crops = args.crops
  t0 = time.perf_counter()
  prepare_data.prepare(config, workdir=args.workdir, tokenize_crops=args.crops)
  return config, time.perf_counter() - t0


class _Runner:
  """One mode's compiled step, state, fixed device batch and live input feed."""

  def __init__(self, config, workdir, text_tok, tok_params, mode: str, warmup: int):
    from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    from magvlt_jax.data import pretokenized  # pylint: disable=import-outside-toplevel
    from magvlt_jax.train import prefetch  # pylint: disable=import-outside-toplevel
    from magvlt_jax.train import trainer  # pylint: disable=import-outside-toplevel
    c = config.copy_and_resolve_references()
    c.train.cache_image_codes = "off"
    c.train.pretokenized = "auto" if mode == "table" else ""
    table = pretokenized.for_training(c, image_tokenizers.get(c), tok_params, workdir=workdir)
    self.setup = trainer.Setup(c, workdir, text_tok, tok_params, cached_codes=table is not None)
    it = pipeline.create_train_iterator(c, text_tok, workdir=workdir, pretokenized_table=table)
    self.state, self.rng = self.setup.init_state(0), self.setup.base_rng(1)
    self.metrics = self.setup.empty_metrics()
    self.fixed = self.setup.global_batch(next(it))
    self.feed = prefetch.DevicePrefetch(it, self.setup.global_batch)
    self.step_only(warmup)
    self.loop(warmup)

  def _step(self, batch):
    self.state, self.metrics = self.setup.step_fn(self.state, batch, self.setup.tokenizer_params,
                                                  self.rng, self.metrics)

  def step_only(self, steps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per step of the jitted step alone, on one fixed device batch."""
    jax.block_until_ready(self.state)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
      self._step(self.fixed)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps

  def loop(self, steps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per step of the trainer's loop body: real batches, prefetched
    one step ahead (CPU time includes the reader threads)."""
    jax.block_until_ready(self.state)
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
      batch, _ = next(self.feed)
      self._step(batch)
      self.feed.prefetch()
    jax.block_until_ready(self.state)
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def step_main(args):
  from magvlt_jax import text as text_lib  # pylint: disable=import-outside-toplevel
  config, prepare_s = _setup_data(args)
  workdir = args.workdir
  text_tok = text_lib.get_or_train_tokenizer(config, workdir)
  tok_params = image_tokenizers.params_for_run(config, workdir)
  runners = {m: _Runner(config, workdir, text_tok, tok_params, m, args.warmup)
             for m in ("encode_in_step", "table")}
  keys = ("step_only_s", "step_only_cpu_s", "loop_s", "loop_cpu_s")
  times = {m: {k: [] for k in keys} for m in runners}
  loads = [os.getloadavg()[0]]
  for _ in range(args.rounds):  # interleaved: slow drifts of the box's load hit both modes alike
    for m, r in runners.items():
      for k, v in zip(keys, r.step_only(args.steps) + r.loop(args.steps)):
        times[m][k].append(v)
    loads.append(os.getloadavg()[0])
  med = {m: {k: round(float(np.median(v)), 4) for k, v in t.items()} for m, t in times.items()}
  print(json.dumps({
      "variant": args.variant, "images": args.images, "crops": args.crops,
      "global_batch": int(config.data.global_batch_size), "steps_per_segment": args.steps,
      "rounds": args.rounds, "prepare_and_tokenize_s": round(prepare_s, 1), "median": med,
      "all": {m: {k: [round(x, 4) for x in v] for k, v in t.items()} for m, t in times.items()},
      "speedup": {k: round(med["encode_in_step"][k] / med["table"][k], 3) for k in keys},
      "load_average_1min": [round(x, 2) for x in loads], "cpu_count": os.cpu_count()}))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("what", choices=("flops", "step"))
  p.add_argument("--variant", default=None,
                 help="configs/magvlt.py variant (default: base for flops, tiny for step)")
  p.add_argument("--workdir", default="/tmp/bench_pretokenized")
  p.add_argument("--images", type=int, default=300)
  p.add_argument("--crops", type=int, default=8)
  p.add_argument("--steps", type=int, default=20, help="timed steps per segment")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--rounds", type=int, default=6, help="interleaved segments per mode")
  args = p.parse_args(argv)
  if args.what == "flops":
    args.variant = args.variant or "base"
    flops_main(args)
  else:
    args.variant = args.variant or "tiny"
    step_main(args)


if __name__ == "__main__":
  main()
