"""The evaluate job: report format, config hash, compare, config merge, and one tiny end-to-end run."""
import copy
import json

import pytest

from magvlt_jax.evaluation import report as rep


def _report(**metric_overrides):
  metrics = {task: {name: 0.5 for name in names} for task, names in rep.EXPECTED_METRICS.items()}
  metrics["t2i"]["fid"] = rep.skipped("set config.eval.inception_weights")
  for key, value in metric_overrides.items():
    task, name = key.split("__")
    metrics[task][name] = value
  return {"format": rep.REPORT_FORMAT, "checkpoint": {"workdir": "/w", "step": 10},
          "config_hash": "abc", "settings": {"decoding": {"t2i_steps": 10}}, "seeds": {"t2i": 0},
          "metrics": metrics, "counts": {"t2i": 4}, "timing_s": {"t2i": 1.0}}


def test_config_hash_is_stable_and_sensitive():
  from magvlt_jax.configs_util import load_config
  a, b = load_config("configs/magvlt.py:tiny"), load_config("configs/magvlt.py:tiny")
  assert rep.config_hash(a) == rep.config_hash(b)
  # Independent of key insertion order / ConfigDict vs dict, changed by any value.
  assert rep.config_hash(a) == rep.config_hash(json.loads(rep.config_json(a)))
  b.decoding.t2i_steps = 11
  assert rep.config_hash(a) != rep.config_hash(b)


def test_compare_lists_metric_and_setting_differences(tmp_path):
  a = _report()
  b = _report(i2t__cider=0.75, t2i__fid=12.5)
  b["settings"]["decoding"]["t2i_steps"] = 12
  b["timing_s"]["t2i"] = 99.0  # wall-clock differences are not differences between reports
  rows = rep.compare_reports(a, b)
  by_key = {r["key"]: r for r in rows}
  assert set(by_key) == {"metrics/i2t/cider", "metrics/t2i/fid", "settings/decoding/t2i_steps"}
  assert by_key["metrics/i2t/cider"]["delta"] == pytest.approx(0.25)
  assert "delta" not in by_key["metrics/t2i/fid"]  # skipped -> number has no delta
  text = rep.format_comparison(rows, "a.json", "b.json")
  assert " ".join(text.split("\n")[1].split()) == "metrics/i2t/cider 0.5 -> 0.75 (+0.25)"
  assert "skipped -> 12.5" in text
  assert rep.compare_reports(a, copy.deepcopy(a)) == []
  assert "no differences" in rep.format_comparison([], "a", "b")
  # Round trip through disk; a non-report file is refused with a clear message.
  path = rep.write_report(str(tmp_path / "r.json"), a)
  assert rep.compare_reports(rep.load_report(path), a) == []
  (tmp_path / "bad.json").write_text("{}")
  with pytest.raises(ValueError, match="not a magvlt_jax evaluation report"):
    rep.load_report(str(tmp_path / "bad.json"))


def test_check_complete_flags_missing_and_nonfinite():
  assert rep.check_complete(_report()) == []
  bad = _report(i2t__cider=float("nan"))
  del bad["metrics"]["tokenizer"]["psnr"]
  assert rep.check_complete(bad) == ["i2t/cider=nan", "tokenizer/psnr=None"]
  assert rep.scalar_metrics(_report())["i2t/bleu_4"] == 0.5
  assert "t2i/fid" not in rep.scalar_metrics(_report())
