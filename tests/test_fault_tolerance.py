"""Fault tolerance of the real entry point (`python -m magvlt_jax.main`, in subprocesses):
a run SIGKILLed at a random step after its first checkpoint and restarted ends bit-identical to an
uninterrupted run (params, optimizer state, step, the next data batch), for the transformer
trainer and the tokenizer trainer; through
`magvlt_jax.tools.local_cluster` (jax.distributed on localhost): a 2-process run writes one
checkpoint, 4 processes resume it and match one 4-device process, and the evaluate and sample
jobs under 2 processes write each output once."""
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from magvlt_jax import checkpoints
from magvlt_jax import text as text_lib

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# tests/test_train.py:small_config as command-line overrides (what a user would type).
_SMALL = {
    "vqgan.base_channels": 8, "vqgan.z_channels": 16, "vqgan.embed_dim": 16,
    "vqgan.codebook_size": 32, "vqgan.train.batch_size": 8, "vqgan.train.num_steps": 2,
    "vqgan.train.log_every": 100, "vqgan.train.image_every": 100,
    "vqgan.train.checkpoint_every": 100, "model.num_layers": 1, "model.embed_dim": 32,
    "model.num_heads": 2, "data.synthetic.num_train": 64, "data.synthetic.num_eval": 16,
    "data.global_batch_size": 8, "train.log_every": 50, "train.sample_every": 100000,
    "train.num_sample_prompts": 2, "optimizer.warmup_steps": 1, "decoding.t2i_steps": 2,
    "decoding.i2t_steps": 2, "train.use_unroll": False, "train.use_mixsel": False,
    "train.final_samples": False,  # the sample compile is most of a leg's time (on in `pod`)
}
_STEPS, _EVERY = 60, 10  # 50-250 ms a step on a loaded 2-core box: a kill window of seconds
_TIMEOUT = 1200  # a hang guard per run: a 4-process leg took 8-10 min on a 2-core box at load 14-21


def main_cmd(workdir, **overrides):
  """The `python -m magvlt_jax.main` command line of the tiny trainer in `workdir`."""
  values = dict(_SMALL, **overrides)
  return ([sys.executable, "-m", "magvlt_jax.main", "--config=configs/magvlt.py:tiny",
           f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in values.items()])


def small_config(**overrides):
  from magvlt_jax.configs_util import load_config  # pylint: disable=import-outside-toplevel
  c = load_config("configs/magvlt.py:tiny")
  c.update_from_flattened_dict(dict(_SMALL, **overrides))
  return c


def write_tokenizer(directory):
  """A random-init image tokenizer in `directory` (its training is tests/test_vqgan_trainer.py's
  business; skipping it here saves a compile per run)."""
  from magvlt_jax.models import vqgan  # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  vqgan.save_params_npz(os.path.join(directory, vqgan.PARAMS_FILE),
                        vqgan.init_params(small_config().vqgan, jax.random.key(0)))
  return directory


def _env():
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT)


def _run(cmd, log):
  with open(log, "w") as f:
    proc = subprocess.run(cmd, cwd=_ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                          timeout=_TIMEOUT, check=False)
  text = open(log).read()
  assert proc.returncode == 0, (  # a multi-process failure often starts far from the end
      "\n".join(l for l in text.splitlines() if "Error" in l or "error" in l)[-3000:]
      + "\n...\n" + text[-3000:])


def _complete_steps(directory):
  """Finalized checkpoint steps (orbax renames `<step>.orbax-checkpoint-tmp-*` when done)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _kill_when(cmd, log, ready, poll_s, delay=0.0):
  """Starts `cmd`, polls `ready()` every poll_s until it returns something truthy (or the run
  ends), waits `delay` and SIGKILLs it. Returns ready()'s last value."""
  seen = None
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=_ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + 600
      while proc.poll() is None and time.time() < deadline:
        seen = ready()
        if seen:
          break
        time.sleep(poll_s)
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
  assert proc.returncode == -signal.SIGKILL, open(log).read()[-3000:]
  return seen


def _kill_after_first_checkpoint(cmd, ckpt_dir, log, delay):
  _kill_when(cmd, log, lambda: _complete_steps(ckpt_dir), 0.02, delay)


def _partial_saves(directory):
  """Checkpoints being written: orbax's `<step>.orbax-checkpoint-tmp*` folders."""
  if not os.path.isdir(directory):
    return []
  return [n for n in os.listdir(directory) if "orbax-checkpoint-tmp" in n]


def _kill_during_a_save(cmd, ckpt_dir, log):
  """SIGKILLs the run while its second checkpoint is being written (its tmp folder exists).
  Returns the partial folder's name (empty if the run died or finished first)."""
  partial = _kill_when(cmd, log, lambda: _complete_steps(ckpt_dir) and _partial_saves(ckpt_dir),
                       0.002)
  return partial[0] if partial else ""


def _final_state(workdir, step, checkpoint_dir="checkpoints"):
  """(train-state tree of numpy arrays, iterator state) of checkpoint `step` (no target needed)."""
  path = os.path.join(workdir, checkpoint_dir, str(step))
  # Against a target on this process's one device: the saved sharding may name devices (a
  # 4-device run) that this process does not have.
  meta = ocp.StandardCheckpointer().metadata(os.path.join(path, "state"))
  meta = getattr(meta, "item_metadata", meta)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device),
                        getattr(meta, "tree", meta))
  state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"), target)
  data = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(path, "data"))
  return state, data["iterator"]


def _assert_bit_identical(ref, crash, checkpoint_dir, keys=("opt_state",), steps=_STEPS):
  """Checkpoint `steps` of both runs: equal step, iterator state and every leaf, bit for bit."""
  a, a_data = _final_state(ref, steps, checkpoint_dir)
  b, b_data = _final_state(crash, steps, checkpoint_dir)
  assert int(a["step"]) == int(b["step"]) == steps
  assert a_data == b_data and a_data["next_batch"] == steps
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  for key in keys:
    assert any(key in jax.tree_util.keystr(p) for p, _ in flat_a), key
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=f"{jax.tree_util.keystr(path)} differs after resume")
  return a_data, b_data


def _next_batch(workdir, data_state, spm):
  from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  config = checkpoints.load_config(workdir)
  iterator = pipeline.create_train_iterator(config, text_lib.TextTokenizer.load(spm),
                                            workdir=workdir)
  iterator.set_state(data_state)
  return next(iterator)


@pytest.mark.slow
def test_sigkill_then_resume_is_bit_identical(tmp_path):
  ref, crash = str(tmp_path / "ref"), str(tmp_path / "crash")
  common = {"train.num_steps": _STEPS, "train.checkpoint_every": _EVERY,
            "vqgan.checkpoint": write_tokenizer(str(tmp_path / "tokenizer"))}
  # Uninterrupted reference (it also trains the text tokenizer and prepares the data, which the
  # interrupted run then reuses: same files, so same inputs).
  _run(main_cmd(ref, **common), str(tmp_path / "ref.log"))
  shared = dict(common, **{"text.spm_model": os.path.join(ref, "text", "spm.model"),
                           "data.data_dir": os.path.join(ref, "data")})
  crash_ckpts = os.path.join(crash, "checkpoints")
  delay = random.uniform(0.0, 0.5)  # a random step after the first checkpoint
  _kill_after_first_checkpoint(main_cmd(crash, **shared), crash_ckpts, str(tmp_path / "kill.log"),
                               delay)
  done = _complete_steps(crash_ckpts)
  assert done and max(done) < _STEPS, (
      f"the kill {delay:.2f}s after the first checkpoint came too late (checkpoints {done})")
  _run(main_cmd(crash, **shared), str(tmp_path / "resume.log"))
  resume_log = open(tmp_path / "resume.log").read()
  assert re.search(rf"[Rr]estor\w* checkpoint step {max(done)}\b", resume_log), resume_log[-3000:]
  assert f"training steps {max(done)}..{_STEPS}" in resume_log

  a_data, b_data = _assert_bit_identical(ref, crash, "checkpoints")
  spm = os.path.join(ref, "text", "spm.model")
  batch_a, batch_b = _next_batch(ref, a_data, spm), _next_batch(crash, b_data, spm)
  assert sorted(batch_a) == sorted(batch_b)
  for k in batch_a:
    np.testing.assert_array_equal(batch_a[k], batch_b[k], err_msg=f"next batch {k!r}")


@pytest.mark.slow
def test_tokenizer_sigkill_then_resume_is_bit_identical(tmp_path):
  """The same for `--mode=train_tokenizer` (VQ-GAN; the GAN step is on from step 5, so both
  steps are compiled before the first checkpoint and the kill lands in the GAN phase), killed
  while its second checkpoint is being written: the restart must take the first one, never the
  partial save."""
  ref, crash = str(tmp_path / "ref"), str(tmp_path / "crash")
  steps = 30
  common = {"vqgan.train.num_steps": steps, "vqgan.train.checkpoint_every": _EVERY,
            "vqgan.train.log_every": _EVERY, "vqgan.loss.disc_start": 5,
            "vqgan.train.batch_size": 4,
            "vqgan.optimizer.warmup_steps": 2, "vqgan.discriminator.base_channels": 8,
            "data.data_dir": str(tmp_path / "data")}
  cmd = lambda workdir: main_cmd(workdir, **common) + ["--mode=train_tokenizer"]
  _run(cmd(ref), str(tmp_path / "ref.log"))
  crash_ckpts = os.path.join(crash, "tokenizer", "checkpoints")
  partial = _kill_during_a_save(cmd(crash), crash_ckpts, str(tmp_path / "kill.log"))
  done = _complete_steps(crash_ckpts)
  assert partial and done == [_EVERY], (
      f"the kill did not land inside the second save (complete {done}, partial {partial!r})")
  assert partial in os.listdir(crash_ckpts)  # the cut-off save is still on disk
  _run(cmd(crash), str(tmp_path / "resume.log"))
  resume_log = open(tmp_path / "resume.log").read()
  assert re.search(rf"[Rr]estor\w* checkpoint step {max(done)}\b", resume_log), resume_log[-3000:]
  assert f"tokenizer: training steps {max(done)}..{steps}" in resume_log
  a_data, b_data = _assert_bit_identical(ref, crash, os.path.join("tokenizer", "checkpoints"),
                                         keys=("opt_state", "disc_params", "disc_opt_state"),
                                         steps=steps)
  from magvlt_jax.train import vqgan_io  # pylint: disable=import-outside-toplevel
  config = checkpoints.load_config(ref)
  np.testing.assert_array_equal(next(vqgan_io.train_images(config, ref, a_data)),
                                next(vqgan_io.train_images(config, crash, b_data)))


def _cluster_cmd(processes, devices, workdir, mode="train", **overrides):
  return ([sys.executable, "-m", "magvlt_jax.tools.local_cluster", f"--processes={processes}",
           f"--devices_per_process={devices}", "--", f"--mode={mode}"]
          + main_cmd(workdir, **overrides)[3:])


def _assert_same_params(a, b, what, lr=None):
  """Equal up to float noise (the cross-process all-reduce sums in another order: ~1e-8 apart).
  Attention key biases (`bk`) have an exactly zero gradient (softmax is shift invariant), so
  Adam turns their rounding noise into updates of up to ~lr per step: there, |diff| < 0.1 lr."""
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b and flat_a
  for (path, x), (_, y) in zip(flat_a, flat_b):
    name, x, y = jax.tree_util.keystr(path), np.asarray(x), np.asarray(y)
    if lr is not None and "'bk'" in name:
      assert np.max(np.abs(x - y)) < 0.1 * lr, f"{what} {name}"
    else:
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=f"{what} {name}")


# One tiny pod setup for the multi-process tests: global batch 16 on 4 devices; a constant LR
# after warm-up (end_lr_factor=1), so a run stopped at step 2 and resumed to 4 follows the same
# schedule as an uninterrupted run to 4. The text tokenizer is shared; the data is built once,
# by process 0 of the first run, while the other process waits at the barrier.
_POD = {"train.checkpoint_every": 2, "data.global_batch_size": 16, "optimizer.end_lr_factor": 1.0}


@pytest.fixture(scope="module")
def pod(tmp_path_factory):
  """{'root', 'overrides', 'workdir'}: a 2-process x 2-device run to step 2 (one checkpoint)."""
  root = tmp_path_factory.mktemp("pod")
  overrides = dict(_POD, **{"vqgan.checkpoint": write_tokenizer(str(root / "tokenizer")),
                            "data.data_dir": str(root / "data")})
  text_lib.get_or_train_tokenizer(small_config(**overrides), str(root / "shared"))
  overrides["text.spm_model"] = str(root / "shared" / "text" / "spm.model")
  workdir = str(root / "pod")
  log = str(root / "pod2.log")
  _run(_cluster_cmd(2, 2, workdir, **overrides,
                    **{"train.num_steps": 2, "train.final_samples": True}), log)  # p0 writes them
  return {"root": root, "overrides": overrides, "workdir": workdir, "log": open(log).read()}


@pytest.mark.slow
def test_resume_with_another_process_count_matches_one_process(pod):
  """2 processes x 2 devices to step 2 -> resumed by 4 processes x 1 device to step 4 == one
  process with 4 devices to step 4 (checkpoints at 2 and 4 compared)."""
  out, workdir, root = pod["log"], pod["workdir"], pod["root"]
  for pid in (0, 1):
    assert f"[p{pid}]" in out and f"(host {pid} of 2)" in out, out[-3000:]
  assert "global batch 16, 4 devices" in out
  assert _complete_steps(os.path.join(workdir, "checkpoints")) == [2]
  assert os.path.exists(os.path.join(workdir, "samples", "step_2", "t2i.png"))  # once, by p0

  log4 = str(root / "pod4.log")
  _run(_cluster_cmd(4, 1, workdir, **pod["overrides"], **{"train.num_steps": 4}), log4)
  out4 = open(log4).read()
  for pid in range(4):
    assert f"(host {pid} of 4)" in out4, out4[-3000:]
  assert re.search(r"\[p0\].*[Rr]estor\w* checkpoint step 2\b", out4), out4[-3000:]
  assert "training steps 2..4, global batch 16, 4 devices" in out4
  assert "differ from the interrupted run" not in out4  # the iterator state fits any host count

  ref = str(root / "ref")
  env = dict(_env(), JAX_NUM_CPU_DEVICES="4")
  with open(root / "ref.log", "w") as f:
    proc = subprocess.run(main_cmd(ref, **pod["overrides"], **{"train.num_steps": 4}), cwd=_ROOT,
                          env=env, stdout=f, stderr=subprocess.STDOUT, timeout=_TIMEOUT, check=False)
  ref_log = open(root / "ref.log").read()
  assert proc.returncode == 0, ref_log[-3000:]
  assert "training steps 0..4, global batch 16, 4 devices" in ref_log
  assert _complete_steps(os.path.join(workdir, "checkpoints")) == [2, 4]
  for step in (2, 4):
    _assert_same_params(checkpoints.load_params(ref, step=step),
                        checkpoints.load_params(workdir, step=step), f"params at step {step}",
                        lr=small_config().optimizer.peak_lr)
    assert _final_state(ref, step)[1] == _final_state(workdir, step)[1] == {
        "next_batch": step, "records": 64, "seed": 0, "global_batch": 16, "split": "train"}
  a, b = _final_state(ref, 4)[0], _final_state(workdir, 4)[0]
  assert int(a["step"]) == int(b["step"]) == 4
  _assert_same_params(a["opt_state"], b["opt_state"], "optimizer state at step 4")


@pytest.mark.slow
def test_evaluate_and_sample_jobs_under_two_processes_write_once(pod):
  """--mode=evaluate and --mode=sample on the pod's checkpoint, 2 processes: every process
  loads it, process 0 alone writes the report / the samples, the others say so."""
  workdir, root = pod["workdir"], pod["root"]
  small_eval = {f"eval.{k}": 2 for k in ("num_t2i", "num_i2t", "num_inpaint", "num_infill",
                                         "num_recon", "batch_size", "num_grid")}
  log = str(root / "eval2.log")
  _run(_cluster_cmd(2, 2, workdir, "evaluate", **pod["overrides"], **small_eval), log)
  out = open(log).read()
  step = max(_complete_steps(os.path.join(workdir, "checkpoints")))
  assert re.search(r"\[p1\].*evaluate: process 1 of 2: process 0 writes", out), out[-3000:]
  assert not re.search(r"\[p0\].*process 0 of 2: process 0 writes", out)
  report = os.path.join(workdir, "eval", f"report_step_{step}.json")
  assert os.path.isfile(report)
  names = os.listdir(os.path.join(workdir, "eval"))
  assert not [n for n in names if "tmp" in n], names  # no half-written or duplicate temp files

  log = str(root / "sample2.log")
  _run(_cluster_cmd(2, 2, workdir, "sample", **pod["overrides"], **{"sample.batch_size": 2}), log)
  out = open(log).read()
  assert re.search(r"\[p1\].*sample: process 1 of 2: process 0 writes", out), out[-3000:]
  assert re.search(r"\[p0\].*sample: 2 images, 2 captions written to", out), out[-3000:]
  assert len(re.findall(r"images, \d+ captions written to", out)) == 1
  final = os.path.join(workdir, "samples", "final")
  assert sorted(os.listdir(os.path.join(final, "t2i"))) == ["000000.png", "000001.png"]
  assert len(open(os.path.join(final, "t2i.jsonl")).read().splitlines()) == 2
