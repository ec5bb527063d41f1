"""The jitted transformer train step and its clu metrics.

`train_step(state, batch, vq_params, rng, metrics) -> (state, metrics)`:
  - the loss is objectives.Objective.loss_fn (one lax.switch over the tasks: one program);
  - a non-finite loss or gradient norm skips the update (params and optimizer state are kept,
    `nonfinite_in_row` / `nonfinite_total` count it; the host stops the run after
    config.train.max_nonfinite_in_row in a row);
  - `state.step` counts batches consumed (skipped ones too), so it always equals the data
    iterator position; the LR schedule follows optax's own count of applied updates;
  - metrics are clu `Average`s merged under jit into the running collection passed in (reset by
    the host after each log line); an Average with count 0 (e.g. no I2T batch in a window) is
    left out of the log.
"""
from typing import Dict

import flax
import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from magvlt_jax import objectives
from magvlt_jax.sequence import Task

BATCH_KEYS = ("image", "image_lr", "image_tb", "text", "text_length")


def _metric(value: str, weight: str = None):
  """An Average of aux[value] weighted by aux[weight] (0/1 selector or a count).

  With a count weight the value is a sum (e.g. correct predictions), so the Average is a ratio.
  """
  @flax.struct.dataclass
  class _Metric(clu_metrics.Average):

    @classmethod
    def from_model_output(cls, **aux):
      w = jnp.asarray(aux[weight] if weight else 1.0, jnp.float32)
      v = jnp.asarray(aux[value], jnp.float32)
      total = v if weight and weight.endswith("_count") else v * w
      return cls(total=total.astype(jnp.float32), count=jnp.round(w).astype(jnp.int32))
  return _Metric


_TASK_NAMES = {Task.T2I: "t2i", Task.I2T: "i2t", Task.IT2IT: "it2it"}


def _metric_fields() -> Dict[str, type]:
  fields = {
      "loss": _metric("loss"),
      "unroll_loss": _metric("unroll_loss", "has_unroll"),
      "mixsel_loss": _metric("mixsel_loss", "has_mixsel"),
      "length_loss": _metric("length_loss", "has_length"),
      "image_accuracy": _metric("image_correct", "image_count"),
      "text_accuracy": _metric("text_correct", "text_count"),
      "length_accuracy": _metric("length_correct", "length_count"),
      "grad_norm": _metric("grad_norm", "finite"),
      "learning_rate": _metric("learning_rate"),
      "nonfinite": _metric("nonfinite"),
  }
  for task, name in _TASK_NAMES.items():
    fields[f"loss_{name}"] = _metric("loss", f"is_{name}")
    fields[f"task_loss_{name}"] = _metric("task_loss", f"is_{name}")
    fields[f"frac_{name}"] = _metric(f"is_{name}")
  return fields


TrainMetrics = clu_metrics.Collection.create(**_metric_fields())


def empty_metrics():
  return TrainMetrics.empty()


def _aux_for_metrics(aux, objective, grad_norm, finite, learning_rate):
  task = aux["task"]
  out = dict(aux, grad_norm=jnp.where(finite, grad_norm, 0.0), finite=finite.astype(jnp.float32),
             nonfinite=1.0 - finite.astype(jnp.float32), learning_rate=learning_rate)
  for t, name in _TASK_NAMES.items():
    out[f"is_{name}"] = (task == int(t)).astype(jnp.float32)
  unroll_tasks = (task == int(Task.T2I)) | (task == int(Task.I2T))
  out["has_unroll"] = (unroll_tasks & objective.use_unroll).astype(jnp.float32)
  out["has_mixsel"] = jnp.float32(objective.use_mixsel)
  out["has_length"] = (task != int(Task.T2I)).astype(jnp.float32)
  return out


def compute_metrics(collection) -> Dict[str, float]:
  """Host side: {name: value} of every metric that saw at least one sample."""
  collection = jax.device_get(collection)
  out = {}
  for name, metric in vars(collection).items():
    if isinstance(metric, clu_metrics.Average) and int(metric.count) > 0:
      out[name] = float(metric.compute())
  return out


def train_step(state, batch, vq_params, rng, metrics, *, objective: objectives.Objective,
               tx: optax.GradientTransformation, schedule):
  """One optimizer step (see the module docstring). rng: the run's base key."""
  rng = jax.random.fold_in(rng, state.step)
  batch = {k: batch[k] for k in BATCH_KEYS}
  grad_fn = jax.value_and_grad(objective.loss_fn, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, vq_params, batch, rng)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  # Zeroed grads keep NaNs out of the (discarded) update maths.
  grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  applied = _applied_updates(state.opt_state)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_in_row=jnp.where(finite, 0, state.nonfinite_in_row + 1).astype(jnp.int32),
      nonfinite_total=(state.nonfinite_total + (~finite).astype(jnp.int32)).astype(jnp.int32))
  aux = _aux_for_metrics(aux, objective, grad_norm, finite, schedule(applied))
  metrics = metrics.merge(TrainMetrics.single_from_model_output(**aux))
  return new_state, metrics


def _applied_updates(opt_state):
  """optax's update count (ScaleByScheduleState / ScaleByAdamState.count) = applied updates."""
  has_count = lambda x: "count" in getattr(x, "_fields", ())  # NamedTuple states, not tuple.count
  for s in jax.tree_util.tree_leaves(opt_state, is_leaf=has_count):
    if has_count(s):
      return s.count
  raise ValueError("optimizer state has no update count")
