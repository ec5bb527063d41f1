"""Fault tolerance of the real entry point (`python -m magvlt_jax.main`, in subprocesses):
a run SIGKILLed at a random step after its first checkpoint and restarted ends bit-identical to an
uninterrupted run (params, optimizer state, step, the next data batch); a 2-process run through
`magvlt_jax.tools.local_cluster` (jax.distributed on localhost) trains and writes one checkpoint."""
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
}
_STEPS, _EVERY = 60, 10  # 50-250 ms a step on a loaded 2-core box: a kill window of seconds


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
                          timeout=600, check=False)
  text = open(log).read()
  assert proc.returncode == 0, (  # a multi-process failure often starts far from the end
      "\n".join(l for l in text.splitlines() if "Error" in l or "error" in l)[-3000:]
      + "\n...\n" + text[-3000:])


def _complete_steps(directory):
  """Finalized checkpoint steps (orbax renames `<step>.orbax-checkpoint-tmp-*` when done)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _kill_after_first_checkpoint(cmd, ckpt_dir, log, delay):
  with open(log, "w") as f:
    proc = subprocess.Popen(cmd, cwd=_ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    try:
      deadline = time.time() + 600
      while not _complete_steps(ckpt_dir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
      time.sleep(delay)
      proc.send_signal(signal.SIGKILL)
      proc.wait(timeout=60)
    finally:
      if proc.poll() is None:
        proc.kill()
  assert proc.returncode == -signal.SIGKILL, open(log).read()[-3000:]


def _final_state(workdir, step):
  """(train-state tree of numpy arrays, iterator state) of checkpoint `step` (no target needed)."""
  path = os.path.join(workdir, "checkpoints", str(step))
  state = ocp.StandardCheckpointer().restore(os.path.join(path, "state"))
  data = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(os.path.join(path, "data"))
  return state, data["iterator"]


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

  a, a_data = _final_state(ref, _STEPS)
  b, b_data = _final_state(crash, _STEPS)
  assert int(a["step"]) == int(b["step"]) == _STEPS
  assert a_data == b_data and a_data["next_batch"] == _STEPS
  flat_a, tree_a = jax.tree_util.tree_flatten_with_path(a)
  flat_b, tree_b = jax.tree_util.tree_flatten_with_path(b)
  assert tree_a == tree_b
  assert any("opt_state" in jax.tree_util.keystr(p) for p, _ in flat_a)
  for (path, x), (_, y) in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=f"{jax.tree_util.keystr(path)} differs after resume")
  spm = os.path.join(ref, "text", "spm.model")
  batch_a, batch_b = _next_batch(ref, a_data, spm), _next_batch(crash, b_data, spm)
  assert sorted(batch_a) == sorted(batch_b)
  for k in batch_a:
    np.testing.assert_array_equal(batch_a[k], batch_b[k], err_msg=f"next batch {k!r}")


@pytest.mark.slow
def test_two_process_local_cluster_run_writes_one_checkpoint(tmp_path):
  workdir = str(tmp_path / "pod")
  overrides = {"train.num_steps": 2, "train.checkpoint_every": 2, "data.global_batch_size": 16,
               "vqgan.checkpoint": write_tokenizer(str(tmp_path / "tokenizer"))}
  # Text tokenizer trained up front (the processes of a pod share it); the dataset is built by
  # process 0 inside the run while the other waits at the barrier.
  text_lib.get_or_train_tokenizer(small_config(**overrides), workdir)
  cmd = [sys.executable, "-m", "magvlt_jax.tools.local_cluster", "--processes=2",
         "--devices_per_process=2", "--"] + main_cmd(workdir, **overrides)[3:]
  log = str(tmp_path / "pod.log")
  _run(cmd, log)
  out = open(log).read()
  for pid in (0, 1):
    assert f"[p{pid}]" in out and f"(host {pid} of 2)" in out, out[-3000:]
  assert "global batch 16, 4 devices" in out
  assert _complete_steps(os.path.join(workdir, "checkpoints")) == [2]
  # Saved from 4 devices over 2 processes; read back here on one (a target with its sharding).
  params = checkpoints.load_params(workdir, step=2)
  assert params and all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  data = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      os.path.join(workdir, "checkpoints", "2", "data"))
  assert data["iterator"]["next_batch"] == 2
  assert os.path.exists(os.path.join(workdir, "samples", "step_2", "t2i.png"))  # once, by p0
