"""Checkpoint store: save/restore round trip (incl. optax state types and iterator state), keep-N,
save interval, resume from latest, params-only loading and the shape-mismatch error; a truncated or
corrupted latest step is named and skipped for the previous one, a cut-off save is never restored."""
import logging
import os
import re
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from magvlt_jax import checkpoints
from magvlt_jax.train import train_state as ts_lib


def _state(scale=1.0):
  params = {"dense": {"kernel": jnp.full((3, 4), scale), "bias": jnp.zeros((4,))},
            "embed": {"embedding": jnp.arange(10.0).reshape(5, 2) * scale}}
  tx = optax.adamw(1e-3)
  return ts_lib.TrainState.create(params, tx), tx


def test_save_restore_roundtrip_with_data_state(tmp_path):
  state, tx = _state()
  grads = jax.tree.map(jnp.ones_like, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(step=jnp.asarray(7, jnp.int32), opt_state=opt_state,
                        params=optax.apply_updates(state.params, updates))
  store = checkpoints.CheckpointStore(str(tmp_path / "ckpt"), keep=2, save_every=1)
  data_state = {"epoch": np.int64(1), "index": 42, "seed": [1, 2]}
  assert store.save(7, state, data_state=data_state)
  store.wait()
  fresh, _ = _state(scale=0.0)
  restored, restored_data = store.restore_latest(fresh)
  assert int(restored.step) == 7
  assert restored_data == {"epoch": 1, "index": 42, "seed": [1, 2]}
  # optax state keeps its NamedTuple types (only true when restoring against a target).
  assert type(restored.opt_state[0]) is type(state.opt_state[0])
  for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b))
  store.close()


def test_keep_n_interval_force_and_resume(tmp_path):
  state, _ = _state()
  directory = str(tmp_path / "ckpt")
  store = checkpoints.CheckpointStore(directory, keep=2, save_every=3)
  written = [s for s in range(1, 10) if store.save(s, state.replace(step=jnp.asarray(s)))]
  assert written == [3, 6, 9]
  assert store.save(10, state.replace(step=jnp.asarray(10)), force=True)  # e.g. SIGTERM
  store.wait()
  assert store.all_steps() == [9, 10]
  store.close()
  # A new store on the same directory (a restarted job) resumes from the latest step.
  again = checkpoints.CheckpointStore(directory, keep=2, save_every=3)
  assert again.latest_step() == 10
  restored, data = again.restore_latest(state)
  assert int(restored.step) == 10 and data is None
  again.close()


def test_restore_latest_empty_dir(tmp_path):
  store = checkpoints.CheckpointStore(str(tmp_path / "none"))
  state, _ = _state()
  assert store.restore_latest(state) == (None, None)
  store.close()


def test_load_params_and_shape_mismatch(tmp_path):
  state, _ = _state(scale=2.0)
  store = checkpoints.CheckpointStore(str(tmp_path / "checkpoints"))
  store.save(1, state)
  store.close()
  # From the workdir (which contains checkpoints/), without and with an abstract target.
  params = checkpoints.load_params(str(tmp_path))
  np.testing.assert_allclose(np.asarray(params["dense"]["kernel"]), 2.0)
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
  params = checkpoints.load_params(str(tmp_path / "checkpoints"), abstract=abstract)
  np.testing.assert_allclose(np.asarray(params["embed"]["embedding"]), np.arange(10.0).reshape(5, 2) * 2)
  wrong = dict(abstract, dense={"kernel": jax.ShapeDtypeStruct((3, 8), jnp.float32),
                                "bias": abstract["dense"]["bias"]})
  with pytest.raises(ValueError, match=r"dense/kernel: checkpoint \(3, 4\) vs model \(3, 8\)"):
    checkpoints.load_params(str(tmp_path), abstract=wrong)
  with pytest.raises(FileNotFoundError, match="step 5"):
    checkpoints.load_params(str(tmp_path), step=5)


def test_scanned_vs_unscanned_checkpoint_names_the_flag(tmp_path):
  unscanned = {"block_0": {"w": jnp.ones((2, 3))}, "block_1": {"w": jnp.ones((2, 3))}}
  state, _ = _state()
  store = checkpoints.CheckpointStore(str(tmp_path / "checkpoints"))
  store.save(1, state.replace(params=unscanned, opt_state=()))
  store.close()
  scanned = {"blocks": {"w": jax.ShapeDtypeStruct((2, 2, 3), jnp.float32)}}
  with pytest.raises(ValueError, match=r"set config.model.scan_layers=False .*stack_layers"):
    checkpoints.load_params(str(tmp_path), abstract=scanned)


def test_config_json_roundtrip(tmp_path):
  c = ml_collections.ConfigDict({"train": {"task_weights": (8.0, 1.0, 1.0), "num_steps": 3},
                                 "name": "x"})
  checkpoints.save_config(str(tmp_path), c)
  back = checkpoints.load_config(str(tmp_path))
  assert back.train.task_weights == (8.0, 1.0, 1.0)
  assert back.train.num_steps == 3 and back.name == "x"


def _saved_store(directory, steps):
  state, _ = _state()
  store = checkpoints.CheckpointStore(directory, keep=5, save_every=1)
  for s in steps:
    store.save(s, state.replace(step=jnp.asarray(s)), data_state={"next_batch": s})
  store.wait()
  return store, state


def _truncate_arrays(step_dir):
  """Cuts every array-data file of a step to half (a disk that filled up, a copy cut short)."""
  for root, _, files in os.walk(os.path.join(step_dir, "state")):
    for name in files:
      path = os.path.join(root, name)
      if os.sep + "d" + os.sep in path + os.sep or root.endswith(os.sep + "d"):
        with open(path, "r+b") as f:
          f.truncate(os.path.getsize(path) // 2)


@pytest.mark.parametrize("damage", ["truncated_arrays", "missing_metadata", "garbage_metadata"])
def test_unreadable_latest_falls_back_to_previous(tmp_path, caplog, damage):
  directory = str(tmp_path / "ckpt")
  store, state = _saved_store(directory, [1, 2, 3])
  store.close()
  step3 = os.path.join(directory, "3")
  if damage == "truncated_arrays":
    _truncate_arrays(step3)
  elif damage == "missing_metadata":
    os.remove(os.path.join(step3, "state", "_METADATA"))
  else:
    with open(os.path.join(step3, "state", "_METADATA"), "w") as f:
      f.write("{not json")
  again = checkpoints.CheckpointStore(directory, keep=5, save_every=1)
  with caplog.at_level(logging.INFO):
    restored, data = again.restore_latest(state)
  assert int(restored.step) == 2 and data == {"next_batch": 2}
  log = caplog.text
  assert f"checkpoint {step3} is unreadable" in log
  assert "Restored checkpoint step 2" in log
  # The damaged step is kept aside (not deleted) and no longer listed; the run can save step 3 again.
  assert again.all_steps() == [1, 2]
  assert [n for n in os.listdir(directory) if n.startswith("3.unreadable-")]
  assert again.save(3, state.replace(step=jnp.asarray(3)), force=True)
  again.wait()
  assert again.latest_step() == 3
  again.close()


def test_all_unreadable_is_a_clear_error(tmp_path):
  directory = str(tmp_path / "ckpt")
  store, state = _saved_store(directory, [1, 2])
  store.close()
  for s in ("1", "2"):
    _truncate_arrays(os.path.join(directory, s))
  again = checkpoints.CheckpointStore(directory)
  with pytest.raises(checkpoints.UnreadableCheckpointError,
                     match=rf"no readable checkpoint in {re.escape(directory)}[^\n]*\n.*/2: "):
    again.restore_latest(state)
  again.close()


def test_cut_off_save_is_never_restored(tmp_path):
  """A crash mid-save leaves only orbax's tmp folder: the last complete step is restored."""
  directory = str(tmp_path / "ckpt")
  store, state = _saved_store(directory, [1, 2])
  store.close()
  partial = os.path.join(directory, "3.orbax-checkpoint-tmp-1796345481")
  shutil.copytree(os.path.join(directory, "2"), partial)
  for name in ("commit_success.txt", "_CHECKPOINT_METADATA"):
    os.remove(os.path.join(partial, name))
  _truncate_arrays(partial)
  again = checkpoints.CheckpointStore(directory)
  assert again.latest_step() == 2
  restored, data = again.restore_latest(state)
  assert int(restored.step) == 2 and data == {"next_batch": 2}
  again.close()


def test_shape_mismatch_is_not_treated_as_corruption(tmp_path):
  directory = str(tmp_path / "ckpt")
  store, state = _saved_store(directory, [1, 2])
  store.close()
  other = state.replace(params=dict(state.params, dense={"kernel": jnp.zeros((3, 8)),
                                                         "bias": jnp.zeros((8,))}))
  again = checkpoints.CheckpointStore(directory)
  with pytest.raises(checkpoints.CheckpointMismatchError, match=r"dense/kernel"):
    again.restore_latest(other)
  assert again.all_steps() == [1, 2]  # nothing moved aside
  again.close()
