"""Training loop: a tiny end-to-end run (tokenizer + transformer + samples) that resumes from its
latest checkpoint, SIGTERM saves and stops, the non-finite guard skips and stops with a message,
and --mode=describe prints the parameter overview ending in `total params: N`."""
import os
import signal

import jax
import numpy as np
import pytest

from magvlt_jax import checkpoints
from magvlt_jax import main as main_lib
from magvlt_jax import parallel
from magvlt_jax.configs_util import load_config
from magvlt_jax.models import transformer
from magvlt_jax.models import vqgan
from magvlt_jax.train import metric_writer
from magvlt_jax.train import steps as steps_lib
from magvlt_jax.train import trainer


def small_config(num_steps=3):
  c = load_config("configs/magvlt.py:tiny")
  v = c.vqgan
  v.base_channels, v.z_channels, v.embed_dim, v.codebook_size = 8, 16, 16, 32
  v.train.batch_size, v.train.num_steps, v.train.log_every = 8, 2, 1
  v.train.image_every, v.train.checkpoint_every = 100, 100
  c.model.num_layers, c.model.embed_dim, c.model.num_heads = 1, 32, 2
  c.data.synthetic.num_train, c.data.synthetic.num_eval = 64, 16
  c.data.global_batch_size = 8
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every = num_steps, 1, 1
  c.train.sample_every, c.train.num_sample_prompts = 1000, 2
  c.optimizer.warmup_steps = 1
  c.decoding.t2i_steps, c.decoding.i2t_steps = 2, 2
  return c


def _rows(workdir, key="train/loss"):
  return [r["step"] for r in metric_writer.read_metrics(workdir) if key in r]


@pytest.mark.slow
def test_end_to_end_train_then_resume(tmp_path):
  workdir = str(tmp_path)
  last = trainer.train_and_evaluate(small_config(num_steps=3), workdir)
  assert np.isfinite(last["loss"]) and last["steps_per_sec"] > 0
  assert os.path.exists(os.path.join(workdir, "tokenizer", vqgan.PARAMS_FILE))
  assert os.path.exists(os.path.join(workdir, "text", "spm.model"))
  assert checkpoints.load_config(workdir).train.num_steps == 3
  assert _rows(workdir) == [1, 2, 3]
  for name in ("t2i.png", "t2i.txt", "i2t.txt", "i2t_images.png", "scores.txt"):
    assert os.path.exists(os.path.join(workdir, "samples", "step_3", name)), name
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(workdir, "tb")))
  store = checkpoints.CheckpointStore(os.path.join(workdir, "checkpoints"))
  assert store.latest_step() == 3
  store.close()
  # A longer run on the same workdir resumes at step 3 (no new tokenizer, no repeated steps) and
  # the data iterator continues where it stopped.
  trainer.train_and_evaluate(small_config(num_steps=5), workdir)
  assert _rows(workdir) == [1, 2, 3, 4, 5]
  setup_abstract = checkpoints.load_params(workdir)
  assert set(setup_abstract) == set(transformer.param_shapes(small_config()))
  store = checkpoints.CheckpointStore(os.path.join(workdir, "checkpoints"))
  assert store.latest_step() == 5
  store.close()


class _FakeIterator:
  """Fixed host batches; optionally sends SIGTERM to this process when batch `term_at` is read."""

  def __init__(self, batch, term_at=None):
    self.batch, self.term_at, self.n = batch, term_at, 0

  def __next__(self):
    self.n += 1
    if self.term_at == self.n:
      os.kill(os.getpid(), signal.SIGTERM)
    return self.batch

  def get_state(self):
    return {"next_batch": self.n}


class _FakeTokenizer:
  eos_id, sep_id, vocab_size = 1, 2, 128


def _fake_batch(c, b=4):
  rng = np.random.default_rng(0)
  s = c.vqgan.image_size
  image = rng.integers(0, 255, (b, s, s, 3), dtype=np.uint8)
  text = np.full((b, c.sequence.text_length), 1, np.int32)
  text[:, :4] = rng.integers(3, 100, (b, 4))
  return {"image": image, "image_lr": image[:, :, ::2], "image_tb": image[:, ::2], "text": text,
          "text_length": np.full((b,), 5, np.int32)}


def _count_guarded_reads(monkeypatch):
  """Counts device->host reads of jax Arrays made while the transfer guard says
  "disallow_explicit". On GPU/TPU the guard itself raises; on CPU an Array already lives in host
  memory, so the guard never fires and this hook on ArrayImpl._value (private jax API; every
  int()/float()/np.asarray()/device_get goes through it) does the counting instead."""
  from jax._src import array as jax_array  # pylint: disable=import-outside-toplevel
  from jax._src import config as jax_config  # pylint: disable=import-outside-toplevel
  original, reads = jax_array.ArrayImpl._value, []

  def counted(self):
    if jax_config.transfer_guard_device_to_host.value == "disallow_explicit":
      reads.append(self.aval.str_short())
    return original.fget(self)

  monkeypatch.setattr(jax_array.ArrayImpl, "_value", property(counted))
  return reads


def test_sigterm_saves_and_nonfinite_guard_stops(tmp_path, monkeypatch):
  c = small_config(num_steps=10)
  c.train.use_unroll = c.train.use_mixsel = False  # smaller program; the loop is under test
  c.train.checkpoint_every, c.train.max_nonfinite_in_row = 100, 2
  vq_params = vqgan.init_params(c.vqgan, jax.random.key(0))
  setup = trainer.Setup(c, str(tmp_path), _FakeTokenizer(), vq_params)
  store = checkpoints.CheckpointStore(str(tmp_path / "checkpoints"), keep=2, save_every=100)
  writer = metric_writer.MetricWriter(str(tmp_path))
  batch = _fake_batch(c)
  # SIGTERM while batch 3 is read, i.e. during step 2 (batch k+1 is prefetched while step k runs):
  # the loop finishes step 2, saves it (off the save interval) with the iterator position of
  # batch 2, not of the prefetched batch 3, and stops.
  state, _ = trainer._loop(c, setup, setup.init_state(0), _FakeIterator(batch, term_at=3), store,
                           writer)
  assert int(state.step) == 2 and store.latest_step() == 2
  _, data_state = store.restore(2, setup.abstract_state())
  assert data_state == {"next_batch": 2}
  # The step donates its input state: every later state is a fresh copy of this host one.
  host = jax.device_get(state)
  fresh = lambda **kw: parallel.shard_train_state(host.replace(**kw), setup.shardings)
  good = host.params
  nan_params = dict(good, output_bias=good["output_bias"] * np.nan)
  # A NaN param makes the loss NaN: the update is skipped (params kept) and counted.
  bad = fresh(params=nan_params)
  new, metrics = setup.step_fn(bad, setup.global_batch(batch), setup.tokenizer_params,
                               setup.base_rng(1), setup.empty_metrics())
  assert int(new.step) == 3 and int(new.nonfinite_in_row) == 1 and int(new.nonfinite_total) == 1
  np.testing.assert_array_equal(np.asarray(new.params["pos_img"]), good["pos_img"])
  assert steps_lib.compute_metrics(metrics)["nonfinite"] == 1.0
  # One more in a row reaches config.train.max_nonfinite_in_row=2: a clear stop.
  with pytest.raises(trainer.NonFiniteError, match=r"2 non-finite losses/gradients in a row"):
    trainer._loop(c, setup, new, _FakeIterator(batch), store, writer)
  # At the limit the step halts: even a finite batch changes nothing but the step count.
  halted, _ = setup.step_fn(fresh(nonfinite_in_row=np.int32(2)), setup.global_batch(batch), setup.tokenizer_params,
                            setup.base_rng(1), setup.empty_metrics())
  assert int(halted.step) == 3 and int(halted.nonfinite_in_row) == 2
  assert int(halted.nonfinite_total) == 0
  np.testing.assert_array_equal(np.asarray(halted.params["pos_img"]), good["pos_img"])
  # Logging every 5 steps, under a guard that forbids any device->host read outside the loop's
  # log/save steps: steps 1-4 never sync, the NaN run still stops with exactly 2 skipped updates.
  c5 = small_config(num_steps=10)
  c5.train.update(log_every=5, checkpoint_every=100, max_nonfinite_in_row=2)
  reads = _count_guarded_reads(monkeypatch)
  with jax.transfer_guard_device_to_host("disallow_explicit"):
    with pytest.raises(trainer.NonFiniteError, match=r"step 5: 2 non-finite .*; 2 skipped updates"):
      trainer._loop(c5, setup, fresh(params=nan_params), _FakeIterator(batch), store, writer)
    c5.train.num_steps = 2 + 4  # a clean run from step 2 to 6, logging only at 5 and 6
    clean, last = trainer._loop(c5, setup, fresh(), _FakeIterator(batch), store, writer)
  assert reads == []  # no read outside the loop's allowed (log/save) steps
  assert int(clean.step) == 6 and np.isfinite(last["loss"])
  store.close()
  writer.close()


def test_describe_prints_total_params(capsys):
  c = load_config("configs/magvlt.py:tiny")
  main_lib.run(c, None, "describe")
  out = capsys.readouterr().out.strip().splitlines()
  assert out[-1] == f"total params: {transformer.param_count(c)}"
  assert any("token_embed" in line for line in out)
