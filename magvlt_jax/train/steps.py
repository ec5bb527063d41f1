"""The jitted transformer train step and its clu metrics, for any objective.

`train_step(state, batch, tokenizer_params, rng, metrics) -> (state, metrics)`:
  - the loss is the config's objective (objectives.create; MAGVLT: one lax.switch over the
    tasks, one program);
  - a non-finite loss or gradient norm skips the update (params and optimizer state are kept,
    `nonfinite_in_row` / `nonfinite_total` count it);
  - once `nonfinite_in_row` reaches `max_nonfinite_in_row` the step halts: it changes nothing but
    `state.step`, so a run never does more than that many skipped updates even though the host
    reads the counters only every config.train.log_every steps (and before a save); the host
    then stops the run with a clear error;
  - `state.step` counts batches consumed (skipped ones too), so it always equals the data
    iterator position; the LR schedule follows optax's own count of applied updates;
  - metrics are clu `Average`s (the generic loss / grad norm / LR / non-finite fields plus the
    objective's own) merged under jit into the running collection passed in (reset by the host
    after each log line); an Average with count 0 (e.g. no I2T batch in a window) is left out of
    the log.
"""
import functools
from typing import Dict

import jax
import jax.numpy as jnp
import optax
from clu import metrics as clu_metrics

from magvlt_jax.objectives import common

# Fields every objective's metrics share; the objective adds its own (Objective.metric_fields).
_GENERIC_FIELDS = {
    "loss": common.average("loss"),
    "grad_norm": common.average("grad_norm", "finite"),
    "learning_rate": common.average("learning_rate"),
    "nonfinite": common.average("nonfinite"),
}


@functools.lru_cache(maxsize=None)
def _collection(fields_key):
  fields = dict(_GENERIC_FIELDS)
  for name, metric in fields_key:
    fields[name] = metric
  return clu_metrics.Collection.create(**fields)


def metrics_class(objective):
  """The clu Collection of the generic fields plus `objective.metric_fields()` (cached per
  objective, so the class identity is stable across calls and never retraces the step)."""
  cached = getattr(objective, "_metrics_class", None)
  if cached is None:
    cached = _collection(tuple(sorted(objective.metric_fields().items())))
    objective._metrics_class = cached  # pylint: disable=protected-access
  return cached


def empty_metrics(objective):
  return metrics_class(objective).empty()


def compute_metrics(collection) -> Dict[str, float]:
  """Host side: {name: value} of every metric that saw at least one sample."""
  collection = jax.device_get(collection)
  out = {}
  for name, metric in vars(collection).items():
    if isinstance(metric, clu_metrics.Average) and int(metric.count) > 0:
      out[name] = float(metric.compute())
  return out


def train_step(state, batch, tok_params, rng, metrics, *, objective: common.Objective,
               tx: optax.GradientTransformation, schedule, max_nonfinite_in_row: int = 0):
  """One optimizer step (see the module docstring). rng: the run's base key.
  max_nonfinite_in_row=0: never halt (the AOT tool and tests of the step alone)."""
  rng = jax.random.fold_in(rng, state.step)
  batch = {k: batch[k] for k in objective.batch_keys}
  # An objective that schedules its task by step (BiART's per-step alternation) is given it.
  loss_fn = (functools.partial(objective.loss_fn, step=state.step) if objective.uses_step
             else objective.loss_fn)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, aux), grads = grad_fn(state.params, tok_params, batch, rng)
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  halted = (state.nonfinite_in_row >= max_nonfinite_in_row if max_nonfinite_in_row > 0
            else jnp.zeros((), bool))
  apply = finite & ~halted
  # Zeroed grads keep NaNs out of the (discarded) update maths.
  grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(apply, a, b), new, old)
  applied = _applied_updates(state.opt_state)
  in_row = jnp.where(finite, 0, state.nonfinite_in_row + 1)
  new_state = state.replace(
      step=state.step + 1,
      params=keep(params, state.params),
      opt_state=keep(opt_state, state.opt_state),
      nonfinite_in_row=jnp.where(halted, state.nonfinite_in_row, in_row).astype(jnp.int32),
      nonfinite_total=(state.nonfinite_total
                       + (~finite & ~halted).astype(jnp.int32)).astype(jnp.int32))
  inputs = dict(objective.metric_inputs(aux), grad_norm=jnp.where(finite, grad_norm, 0.0),
                finite=finite.astype(jnp.float32), nonfinite=1.0 - finite.astype(jnp.float32),
                learning_rate=schedule(applied))
  metrics = metrics.merge(metrics_class(objective).single_from_model_output(**inputs))
  return new_state, metrics


def _applied_updates(opt_state):
  """optax's update count (ScaleByScheduleState / ScaleByAdamState.count) = applied updates."""
  has_count = lambda x: "count" in getattr(x, "_fields", ())  # NamedTuple states, not tuple.count
  for s in jax.tree_util.tree_leaves(opt_state, is_leaf=has_count):
    if has_count(s):
      return s.count
  raise ValueError("optimizer state has no update count")
