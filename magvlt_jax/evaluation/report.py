"""The evaluation report: a JSON file that two runs can be compared by.

Layout of WORKDIR/eval/report_step_N.json:
  format        REPORT_FORMAT
  checkpoint    {"workdir", "step"}
  config_hash   sha256 (16 hex) of the merged config's canonical JSON (`config_hash`)
  settings      what the numbers depend on: decoding.*, eval.*, data split, model variant
  seeds         PRNG seeds used per task
  metrics       {task: {metric: float | {"skipped": reason}}}
  counts        {task: number of examples scored}
  timing_s      wall-clock seconds per task (informational; ignored by `compare`)
Every metric the job knows (`EXPECTED_METRICS`) is present, as a number or explicitly skipped.
"""
import hashlib
import json
import math
import os
from typing import Any, Dict, List, Mapping

from magvlt_jax.evaluation import caption_metrics

REPORT_FORMAT = "magvlt_jax.eval_report/1"
CAPTION_METRICS = caption_metrics.METRIC_NAMES
IMAGE_METRICS = ("fid", "is", "fd_effnet_lite0", "is_effnet_lite0")
EXPECTED_METRICS = {
    "t2i": IMAGE_METRICS + ("clip_score", "fid_blur", "fd_effnet_lite0_blur"),
    "i2t": CAPTION_METRICS,
    "inpaint": IMAGE_METRICS,
    "infill": CAPTION_METRICS,
    "tokenizer": ("psnr", "ssim", "codebook_usage", "codebook_perplexity", "rfid",
                  "rfd_effnet_lite0"),
}
IGNORED_IN_COMPARE = ("timing_s",)


def skipped(reason: str) -> Dict[str, str]:
  return {"skipped": str(reason)}


def is_skipped(value) -> bool:
  return isinstance(value, Mapping) and "skipped" in value


def _plain(obj):
  """ConfigDicts / tuples / numpy scalars -> JSON-able plain python, deterministically."""
  if hasattr(obj, "to_dict"):
    obj = obj.to_dict()
  if isinstance(obj, Mapping):
    return {str(k): _plain(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
  if isinstance(obj, (list, tuple)):
    return [_plain(v) for v in obj]
  if hasattr(obj, "item") and callable(obj.item):  # numpy / jax scalars
    return obj.item()
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  return str(obj)


def config_json(config) -> str:
  """Canonical JSON of a config (sorted keys, tuples as lists): stable across runs and hosts."""
  return json.dumps(_plain(config), sort_keys=True, separators=(",", ":"))


def config_hash(config) -> str:
  return hashlib.sha256(config_json(config).encode()).hexdigest()[:16]


def check_complete(report: Mapping[str, Any]) -> List[str]:
  """Problems with `report["metrics"]`: every expected metric must be a finite number or skipped."""
  problems = []
  metrics = report.get("metrics", {})
  for task, names in EXPECTED_METRICS.items():
    for name in names:
      value = metrics.get(task, {}).get(name, None)
      if is_skipped(value):
        continue
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        problems.append(f"{task}/{name}={value!r}")
  return problems


def write_report(path: str, report: Mapping[str, Any]) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(_plain(report), f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)  # readers never see a half-written report
  return path


def load_report(path: str) -> Dict[str, Any]:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.eval.compare: report {path!r} not found")
  with open(path) as f:
    report = json.load(f)
  if report.get("format") != REPORT_FORMAT:
    raise ValueError(f"{path}: not a magvlt_jax evaluation report "
                     f"(format={report.get('format')!r}, expected {REPORT_FORMAT!r})")
  return report


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
  """{"a": {"b": 1}} -> {"a/b": 1}; a {"skipped": reason} dict stays one leaf."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value and not is_skipped(value):
      out.update(flatten(value, name + "/"))
    else:
      out[name] = value
  return out


def scalar_metrics(report: Mapping[str, Any]) -> Dict[str, float]:
  """The numeric metrics as "task/name" -> float (for TensorBoard)."""
  return {k: float(v) for k, v in flatten(report["metrics"]).items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)}


def compare_reports(a: Mapping[str, Any], b: Mapping[str, Any]) -> List[Dict[str, Any]]:
  """Differences between two reports: [{"key", "a", "b"[, "delta"]}], metrics first."""
  rows = []
  for section in ("metrics", "checkpoint", "config_hash", "settings", "seeds", "counts"):
    fa = flatten(a[section]) if isinstance(a.get(section), Mapping) else {section: a.get(section)}
    fb = flatten(b[section]) if isinstance(b.get(section), Mapping) else {section: b.get(section)}
    for key in sorted(set(fa) | set(fb)):
      va, vb = fa.get(key), fb.get(key)
      if va == vb:
        continue
      name = key if key == section else f"{section}/{key}"
      row = {"key": name, "a": va, "b": vb}
      if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (va, vb)):
        row["delta"] = vb - va
      rows.append(row)
  return rows


def _fmt(v) -> str:
  if is_skipped(v):
    return "skipped"
  if isinstance(v, float):
    return f"{v:.6g}"
  return json.dumps(v) if not isinstance(v, str) else v


def format_comparison(rows: List[Dict[str, Any]], name_a: str = "A", name_b: str = "B") -> str:
  if not rows:
    return f"reports {name_a} and {name_b}: no differences (metrics and settings identical)"
  lines = [f"differences ({name_a} -> {name_b}):"]
  width = max(len(r["key"]) for r in rows)
  for r in rows:
    delta = f"  ({r['delta']:+.6g})" if "delta" in r else ""
    lines.append(f"  {r['key']:<{width}}  {_fmt(r['a'])} -> {_fmt(r['b'])}{delta}")
  return "\n".join(lines)


def main(argv=None) -> int:
  """`python -m magvlt_jax.evaluation.report A.json B.json`: print the differences only."""
  import sys  # pylint: disable=import-outside-toplevel
  args = sys.argv[1:] if argv is None else list(argv)
  if len(args) != 2:
    print("usage: python -m magvlt_jax.evaluation.report REPORT_A.json REPORT_B.json")
    return 2
  a, b = load_report(args[0]), load_report(args[1])
  print(format_comparison(compare_reports(a, b), args[0], args[1]))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
