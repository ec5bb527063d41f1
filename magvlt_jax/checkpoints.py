"""Checkpoints: an orbax CheckpointManager for train states plus the data-iterator state.

Layout of one step (orbax 0.12.x `ocp.args.Composite`):
  DIR/<step>/state/   the train state pytree (StandardSave; restored only against an abstract target,
                      so optax NamedTuples and flax struct dataclasses come back with their types)
  DIR/<step>/data/    the JSON state of the input iterator (JsonSave), so a resumed run sees exactly
                      the batches an uninterrupted run would have seen.

Which steps are written is a save-decision policy (every `save_every` steps, or `force=True`, e.g. on
SIGTERM); which are kept is a preservation policy (the latest `keep`). A save cut off by a crash
leaves only orbax's `<step>.orbax-checkpoint-tmp-*` folder, never a `<step>` one, so it is never
restored; a finalized step that is unreadable later (truncated or corrupted files) is reported by
name, moved aside to `<step>.unreadable-<time>` and `restore_latest` falls back to the previous
step (a checkpoint of another model shape is not corruption: that stays an error). Also here: `load_params`
(params only, shape-checked, for the sampler/eval) and WORKDIR/config.json helpers.
"""
import json
import logging
import os
import time
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

_STATE = "state"
_DATA = "data"
_policies = ocp.checkpoint_managers


class CheckpointMismatchError(ValueError):
  """A readable checkpoint whose shapes do not match the configured model (not corruption)."""


class UnreadableCheckpointError(RuntimeError):
  """No finalized checkpoint in a directory could be read (each one truncated or corrupted)."""


class CheckpointWriteError(RuntimeError):
  """A save failed while writing (disk full, quota, permissions); earlier steps are untouched."""


def _abstract(tree: Any) -> Any:
  """ShapeDtypeStructs for `tree` (arrays or structs); entries without a sharding get this process's
  first device (global device 0 belongs to process 0: on another process it is not addressable).

  Restoring with a sharding-less target makes orbax read the saved sharding, which is unsafe on a
  different topology, so we always give one.
  """
  default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def one(x):
    x = ocp.utils.to_shape_dtype_struct(x)
    if isinstance(x, jax.ShapeDtypeStruct) and getattr(x, "sharding", None) is None:
      x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=default)
    return x

  return jax.tree.map(one, tree)


def _handlers() -> dict:
  # Explicit handlers so a fresh manager (a restarted job) can read metadata before any save.
  return {_STATE: ocp.StandardCheckpointHandler(), _DATA: ocp.JsonCheckpointHandler()}


class CheckpointStore:
  """Saves/restores `{state, data}` per step under `directory` with keep-N preservation.

  `save_every`: the save-decision interval (steps that are not multiples are skipped unless
  `force=True`). `async_save`: write in a background thread (call `wait()` before reading back).
  """

  def __init__(self, directory: str, keep: int = 3, save_every: int = 1, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"CheckpointStore: keep must be >= 1 (config.train.keep_checkpoints), got {keep}")
    if save_every < 1:
      raise ValueError(f"CheckpointStore: save_every must be >= 1 (config.train.checkpoint_every), "
                       f"got {save_every}")
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=_policies.FixedIntervalPolicy(save_every),
        preservation_policy=_policies.LatestN(keep),
        enable_async_checkpointing=async_save,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

  def save(self, step: int, state: Any, data_state: Optional[dict] = None, force: bool = False) -> bool:
    """Saves `state` (+ the iterator's JSON state) at `step`; returns whether it was written."""
    data = {"iterator": _jsonable(data_state)}  # wrapped so that `None` round-trips
    args = ocp.args.Composite(**{_STATE: ocp.args.StandardSave(state), _DATA: ocp.args.JsonSave(data)})
    # An async save's write error surfaces at the next save or wait: both name the failure.
    return self._writing(lambda: self._manager.save(int(step), force=force, args=args), step)

  def _writing(self, fn, step):
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except  (tensorstore/orbax raise many types)
      # Never finalized: the step exists only as <step>.orbax-checkpoint-tmp* (never restored),
      # and the preservation policy deletes nothing after a failed save.
      raise CheckpointWriteError(
          f"checkpoint write failed in {self.directory} (around step {step}; disk full, quota or "
          f"permissions?): {type(e).__name__}: {str(e)[:600]}\nthe complete checkpoints are kept: "
          f"steps {_finalized_steps(self.directory)}; free space and restart to resume from the latest") from e

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return list(self._manager.all_steps())

  def restore(self, step: int, abstract_state: Any) -> tuple:
    """Restores step `step` against `abstract_state` (arrays or ShapeDtypeStructs, with shardings)."""
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available: {self.all_steps()}")
    _check_shapes(self._manager.item_metadata(step)[_STATE], abstract_state, f"{self.directory}/{step}")
    out = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(_abstract(abstract_state)), _DATA: ocp.args.JsonRestore()}))
    data = out[_DATA] or {}
    return out[_STATE], data.get("iterator")

  def restore_latest(self, abstract_state: Any) -> tuple:
    """(state, data_state) of the latest readable step, or (None, None) when there is no checkpoint.

    An unreadable step is logged with its path and the error, moved aside (kept for inspection;
    the run will write that step again) and the previous one is tried."""
    failures = []
    for step in sorted(self.all_steps(), reverse=True):
      where = os.path.join(self.directory, str(step))
      logging.info("Restoring checkpoint step %d from %s", step, self.directory)
      try:
        out = self.restore(step, abstract_state)
      except CheckpointMismatchError:
        raise
      except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
        failures.append(f"  {where}: {type(e).__name__}: {str(e)[:300]}")
        logging.error("checkpoint %s is unreadable (truncated or corrupted?): %s: %s; moved to %s "
                      "and trying the previous step", where, type(e).__name__, str(e)[:300],
                      self._move_aside(step))
        continue
      if failures:
        logging.warning("Restored checkpoint step %d from %s after %d unreadable newer step(s)",
                        step, self.directory, len(failures))
      return out
    if failures:
      raise UnreadableCheckpointError(
          f"no readable checkpoint in {self.directory} (each was moved to <step>.unreadable-*; "
          f"delete them to start from scratch):\n" + "\n".join(failures))
    return None, None

  def _move_aside(self, step: int) -> str:
    """Renames DIR/<step> to DIR/<step>.unreadable-<time> (process 0) and reloads the step list."""
    target = os.path.join(self.directory, f"{step}.unreadable-{int(time.time())}")
    if jax.process_index() == 0:
      os.rename(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      multihost_utils.sync_global_devices(f"magvlt_jax.checkpoints.move_aside_{step}")
    self._manager.reload()
    return target

  def wait(self):
    self._writing(self._manager.wait_until_finished, "pending")

  def close(self):
    self.wait()
    self._manager.close()


def _finalized_steps(directory: str) -> list:
  """Steps on disk (orbax renames <step>.orbax-checkpoint-tmp* to <step> once complete); after a
  failed async save the manager's own list is not to be trusted."""
  names = os.listdir(directory) if os.path.isdir(directory) else []
  return sorted(int(n) for n in names if n.isdigit())


def _jsonable(x: Any) -> Any:
  """numpy scalars/arrays inside an iterator state -> plain JSON types."""
  if isinstance(x, dict):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, (np.ndarray, np.generic)):
    return x.tolist()
  return x


def _leaf_shapes(tree: Any) -> dict:
  """{'a/b/c': shape} for every leaf with a shape (arrays, ShapeDtypeStructs, orbax metadata)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  out = {}
  for path, leaf in flat:
    shape = getattr(leaf, "shape", None)
    if shape is not None:
      out["/".join(_key_name(k) for k in path)] = tuple(shape)
  return out


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _check_shapes(metadata: Any, abstract: Any, where: str, prefix: str = ""):
  """Raises ValueError naming every param path whose saved shape differs from the target's."""
  tree = getattr(metadata, "tree", metadata)
  saved = _leaf_shapes(tree)
  wanted = _leaf_shapes(abstract)
  if prefix:
    saved = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
  if not saved and wanted:  # unreadable metadata, not a model mismatch
    raise RuntimeError(f"checkpoint {where}: its metadata lists no arrays (truncated or corrupted?)")
  bad = [f"  {k}: checkpoint {saved[k]} vs model {wanted[k]}"
         for k in sorted(wanted) if k in saved and saved[k] != wanted[k]]
  missing = [f"  {k}: not in checkpoint" for k in sorted(wanted) if k not in saved]
  if bad or missing:
    lines = bad + missing[:20] + ([f"  ... {len(missing) - 20} more missing"] if len(missing) > 20 else [])
    hint = _layer_layout_hint(saved, wanted)
    raise CheckpointMismatchError(f"checkpoint {where} does not match the configured model "
                     f"(does the config match the one it was trained with?){hint}:\n" + "\n".join(lines))


def _layer_layout_hint(saved: dict, wanted: dict) -> str:
  """Names the scanned/unscanned block layout mismatch (config.model.scan_layers), if that is it."""
  has = lambda shapes, part: any(part in k.split("/") for k in shapes)
  for ckpt, model, value in (("blocks", "block_0", "True"), ("block_0", "blocks", "False")):
    if has(saved, ckpt) and has(wanted, model):
      return (f"; the checkpoint's transformer blocks are {'scanned' if ckpt == 'blocks' else 'unscanned'}: "
              f"set config.model.scan_layers={value} (or convert with transformer."
              f"{'unstack_layers' if ckpt == 'blocks' else 'stack_layers'})")
  return ""


def load_params(directory: str, step: Optional[int] = None, abstract: Any = None) -> Any:
  """Params of a train-state checkpoint (latest step unless `step`), without the optimizer state.

  `directory`: a checkpoints directory, or a workdir containing `checkpoints/`. `abstract`: the
  expected params pytree (arrays or ShapeDtypeStructs, optionally sharded); shapes are checked and a
  mismatch raises ValueError naming the param path. Without `abstract` the saved shapes are used.
  """
  if os.path.isdir(os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  directory = os.path.abspath(directory)
  manager = ocp.CheckpointManager(directory, item_handlers=_handlers(),
                                  options=ocp.CheckpointManagerOptions(read_only=True, create=False))
  steps = list(manager.all_steps())
  if not steps:
    raise FileNotFoundError(f"no checkpoints in {directory}")
  step = max(steps) if step is None or step < 0 else step
  if step not in steps:
    raise FileNotFoundError(f"no checkpoint for step {step} in {directory}; available: {sorted(steps)}")
  meta = getattr(manager.item_metadata(step)[_STATE], "tree", None)
  if abstract is None:
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), meta["params"])
  else:
    _check_shapes({"params": meta["params"]}, {"params": abstract}, f"{directory}/{step}")
  path = os.path.join(directory, str(step), _STATE)
  item = {"params": _abstract(abstract)}
  out = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True))
  manager.close()
  return out["params"]


def save_config(workdir: str, config: ml_collections.ConfigDict):
  """Writes WORKDIR/config.json (process 0 only)."""
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _tuples(x):
  # JSON has no tuples; every sequence in our configs is a tuple.
  if isinstance(x, dict):
    return {k: _tuples(v) for k, v in x.items()}
  if isinstance(x, list):
    return tuple(_tuples(v) for v in x)
  return x


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """Reads WORKDIR/config.json (or a path to a .json file) back into a ConfigDict."""
  path = workdir if workdir.endswith(".json") else os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json at {path}; pass --config explicitly")
  with open(path) as f:
    return ml_collections.ConfigDict(_tuples(json.load(f)))
