"""`--mode=evaluate`: score a trained checkpoint on the validation split and write a report.

    python -m magvlt_jax.main --mode=evaluate --config=configs/magvlt.py:base --workdir=DIR \
        [--config.eval.checkpoint_step=N] [--config.eval.num_t2i=30000] \
        [--config.eval.inception_weights=pt_inception-2015-12-05-6726825d.pth] \
        [--config.eval.compare=OTHER_REPORT.json]

Config merge rule (`merge_config`): the run's own WORKDIR/config.json decides everything that
shapes the params or the data the model was trained with (model, vqgan, sequence, text, data, ...);
the command-line config decides the sections that only steer evaluation: `eval.*`, `decoding.*`,
`sample.*` and `mesh.*` (their file defaults plus any --config.eval.x / --config.decoding.x
overrides), as for --mode=sample.
The data to evaluate on is the trained data's validation split unless eval.data_name /
eval.data_path / eval.split say otherwise (e.g. zero-shot COCO for a CC3M-trained model).

Outputs under WORKDIR/eval/ (or config.eval.output_dir): report_step_N.json (see report.py),
step_N/*.png sample grids and step_N/captions.json, and TensorBoard scalars under WORKDIR/tb/eval.
Same seed (config.eval.seed), same checkpoint and same config -> the same report.
"""
import logging
import os
from typing import Any, Dict, Optional

import jax
import ml_collections

from magvlt_jax.evaluation import report as rep

COMMAND_LINE_SECTIONS = ("eval", "decoding", "sample", "mesh")  # as the sample job


def merge_config(cli_config: ml_collections.ConfigDict, workdir: str) -> ml_collections.ConfigDict:
  """The trained config (WORKDIR/config.json) with eval/decoding/mesh from the command line."""
  from magvlt_jax import checkpoints  # pylint: disable=import-outside-toplevel
  if not os.path.exists(os.path.join(workdir, "config.json")):
    logging.warning("evaluate: no %s/config.json; using the command-line config as is", workdir)
    merged = ml_collections.ConfigDict(cli_config.to_dict())
  else:
    merged = checkpoints.load_config(workdir)
    for section in COMMAND_LINE_SECTIONS:
      if section in cli_config:
        merged[section] = ml_collections.ConfigDict(cli_config[section].to_dict())
  e = merged.eval
  with merged.unlocked():
    if e.get("data_name"):
      merged.data.name = e.data_name
    if e.get("data_path"):
      merged.data.path = e.data_path
    if e.get("split"):
      merged.data.eval_split = e.split
  return merged


def validate_eval(config):
  """Errors naming the config.eval key and the fix (before any model is loaded)."""
  e = config.eval
  for key in ("num_t2i", "num_i2t", "num_inpaint", "num_infill", "num_recon"):
    if int(e.get(key, 0)) < 0:
      raise ValueError(f"config.eval.{key}={e[key]} must be >= 0 (0 skips that task)")
  for key in ("batch_size", "num_grid"):
    if int(e.get(key, 1)) < 1:
      raise ValueError(f"config.eval.{key}={e[key]} must be >= 1")
  if float(e.blur_fid_radius) < 0:
    raise ValueError(f"config.eval.blur_fid_radius={e.blur_fid_radius} must be >= 0 (0: off)")
  if not 0.0 < float(e.text_temperature):
    raise ValueError(f"config.eval.text_temperature={e.text_temperature} must be > 0 (SPEC: 0.5)")
  for key in ("inception_weights", "clip_weights", "spice_corenlp_jar", "compare"):
    path = str(e.get(key, ""))
    if path and not os.path.exists(os.path.expanduser(path)):
      raise FileNotFoundError(f"config.eval.{key}={path!r} does not exist")
  return config


def available_steps(workdir: str):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(d) for d in os.listdir(directory)
                if d.isdigit() and os.path.isdir(os.path.join(directory, d)))


def resolve_step(workdir: str, step: int) -> int:
  """config.eval.checkpoint_step (-1: latest) -> an existing step, or a clear error."""
  steps = available_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"evaluate: no checkpoints under {workdir}/checkpoints; train first "
                            "(--mode=train) or point --workdir at a trained run")
  if step is None or step < 0:
    return steps[-1]
  if step not in steps:
    raise FileNotFoundError(f"config.eval.checkpoint_step={step}: not in {workdir}/checkpoints "
                            f"(available: {steps})")
  return step


NOT_HASHED = ("compare", "output_dir")  # eval keys that cannot change any number in the report


def hashed_config(config) -> Dict[str, Any]:
  """The merged config minus eval.compare / eval.output_dir (so a compare run hashes the same)."""
  d = rep._plain(config)  # pylint: disable=protected-access
  d["eval"] = {k: v for k, v in d["eval"].items() if k not in NOT_HASHED}
  return d


def settings(config) -> Dict[str, Any]:
  """What the numbers depend on besides the params: recorded in the report and compared."""
  d = config.data
  return {
      "variant": config.get("variant", ""),
      "decoding": rep._plain(config.decoding),  # pylint: disable=protected-access
      # The sampler's chunk size (max of this and the candidate counts) decides the PRNG split.
      "sample_batch_size": int(config.sample.batch_size),
      "eval": {k: v for k, v in rep._plain(config.eval).items()  # pylint: disable=protected-access
               if k not in NOT_HASHED},
      "data": {"name": d.name, "path": d.path, "split": d.eval_split,
               "image_size": d.image_size},
  }


def output_dir(config, workdir: str) -> str:
  return config.eval.output_dir or os.path.join(workdir, "eval")


def run(config: ml_collections.ConfigDict, workdir: str, sampler=None) -> Dict[str, Any]:
  """Evaluates WORKDIR's checkpoint; returns the report (also written to disk).

  `sampler`: an already loaded sampler.Sampler of that checkpoint (notebooks, repeated
  evaluations: its compiled decoders are reused); by default it is loaded from the checkpoint.
  """
  from magvlt_jax.evaluation import tasks  # pylint: disable=import-outside-toplevel
  compare_path = config.eval.compare
  config = validate_eval(merge_config(config, workdir))
  step = resolve_step(workdir, config.eval.checkpoint_step)
  out_dir = output_dir(config, workdir)
  grid_dir = os.path.join(out_dir, f"step_{step}")
  logging.info("evaluate: step %d of %s -> %s", step, workdir, out_dir)
  result = tasks.run_all(config, workdir, step, grid_dir, sampler=sampler)
  report = {
      "format": rep.REPORT_FORMAT,
      "checkpoint": {"workdir": os.path.abspath(workdir), "step": int(step)},
      "config_hash": rep.config_hash(hashed_config(config)),
      "settings": settings(config),
      "seeds": result["seeds"],
      "metrics": result["metrics"],
      "counts": result["counts"],
      "timing_s": result["timing_s"],
  }
  problems = rep.check_complete(report)
  if problems:  # every metric is a number or explicitly skipped: anything else is a bug
    raise RuntimeError(f"evaluate: report incomplete: {problems}")
  path = os.path.join(out_dir, f"report_step_{step}.json")
  if jax.process_index() == 0:  # every host computes the same numbers; one writes them
    rep.write_report(path, report)
    _write_tensorboard(config, workdir, step, report, result)
  else:
    logging.info("evaluate: process %d of %d: process 0 writes the report and grids to %s",
                 jax.process_index(), jax.process_count(), out_dir)
  print(summary(report, path))
  if compare_path:
    other = rep.load_report(compare_path)
    print(rep.format_comparison(rep.compare_reports(other, report), compare_path, path))
  return report


def _write_tensorboard(config, workdir: str, step: int, report, result):
  """Scalars eval/<task>/<metric>, the sample grids and a few captions, under WORKDIR/tb/eval."""
  from magvlt_jax.train import metric_writer  # pylint: disable=import-outside-toplevel
  writer = metric_writer.MetricWriter(output_dir(config, workdir),
                                      tb_dir=os.path.join(workdir, "tb", "eval"))
  writer.write_scalars(step, {f"eval/{k}": v for k, v in rep.scalar_metrics(report).items()})
  writer.write_images(step, {f"eval/{k}": v for k, v in result["grids"].items()})
  texts = {}
  for task, rows in result["samples"].items():
    if rows:
      texts[f"eval/{task}"] = "\n\n".join(
          f"{r['candidate']}  (reference: {r['references'][0]})" for r in rows[:8])
  writer.write_texts(step, texts)
  writer.flush()
  writer.close()


def summary(report, path: Optional[str] = None) -> str:
  lines = [f"evaluation of step {report['checkpoint']['step']} (config {report['config_hash']})"
           + (f" -> {path}" if path else "")]
  for task, metrics in report["metrics"].items():
    parts = []
    for name, value in metrics.items():
      parts.append(f"{name}=skipped" if rep.is_skipped(value) else f"{name}={value:.4g}")
    lines.append(f"  {task} (n={report['counts'].get(task, 0)}): " + ", ".join(parts))
  return "\n".join(lines)
