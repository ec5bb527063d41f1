"""The transformer training loop: `train_and_evaluate(config, workdir)`.

Order: validate the config; WORKDIR/config.json; the image tokenizer of config.image_tokenizer
(trained first into WORKDIR/tokenizer when config.<kind>.checkpoint is empty and none was
exported there); the text
tokenizer; the mesh; the train state (restored from the latest checkpoint with the data-iterator
state, or initialised sharded); then the loop: jitted step, logging (per-task losses, masked
accuracies, LR, steps/s, ETA) every config.train.log_every, checkpoints every
config.train.checkpoint_every (and on SIGTERM), sample grids every config.train.sample_every and
at the end.
"""
import functools
import logging
import os
import signal
import time

import jax

from magvlt_jax import checkpoints
from magvlt_jax import configs_util
from magvlt_jax import image_tokenizers
from magvlt_jax import objectives
from magvlt_jax import parallel
from magvlt_jax import text as text_lib
from magvlt_jax.data import code_cache
from magvlt_jax.data import pretokenized
from magvlt_jax.models import transformer
from magvlt_jax.train import metric_writer
from magvlt_jax.train import optimizer as optimizer_lib
from magvlt_jax.train import prefetch as prefetch_lib
from magvlt_jax.train import steps as steps_lib
from magvlt_jax.train import train_state as train_state_lib


class NonFiniteError(FloatingPointError):
  """Raised after config.train.max_nonfinite_in_row non-finite steps in a row."""


class _Preemption:
  """SIGTERM -> a flag the loop checks after every step (it then saves and exits cleanly)."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread (e.g. a notebook worker): no handler
      self._previous = None
    return self

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d received: saving a checkpoint and stopping", signum)
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


class Setup:
  """Everything the loop needs, built once (also used by tests and the sampler job)."""

  def __init__(self, config, workdir: str, text_tokenizer, tokenizer_params,
               cached_codes: bool = False):
    """cached_codes: the training batches carry `image_codes` (data/code_cache.py)."""
    self.config, self.workdir, self.text_tokenizer = config, workdir, text_tokenizer
    self.image_tokenizer = image_tokenizers.get(config)
    self.mesh = parallel.make_mesh(config.mesh)
    self.rules = parallel.logical_rules(config.mesh.strategy)
    parallel.check_aux_batch(int(config.data.global_batch_size),
                             int(config.train.get("aux_batch_stride", 1)), self.mesh, self.rules)
    self.model = transformer.from_config(config)
    self.tx = optimizer_lib.make_optimizer(config)
    self.schedule = optimizer_lib.learning_rate_schedule(config)
    self.objective = objectives.create(config, self.model, self.image_tokenizer, text_tokenizer)
    if cached_codes:
      self.objective.read_cached_codes()
    init_fn = functools.partial(_init_state, config, tx=self.tx)
    self.init_fn = init_fn
    self.abstract = parallel.abstract_state(init_fn, jax.random.key(0), rules=self.rules)
    self.shardings = parallel.state_shardings(self.abstract, self.mesh, self.rules)
    rep = parallel.replicated(self.mesh)
    self.tokenizer_params = parallel.put_replicated(tokenizer_params, self.mesh)
    self.step_fn = parallel.jit_train_step(
        functools.partial(steps_lib.train_step, objective=self.objective, tx=self.tx,
                          schedule=self.schedule,
                          max_nonfinite_in_row=int(config.train.max_nonfinite_in_row)),
        self.shardings, parallel.batch_sharding(self.mesh, self.rules), mesh=self.mesh,
        rules=self.rules, extra_in_shardings=(rep, rep, rep))

  def empty_metrics(self):
    # Committed to the mesh like the step's outputs: an uncommitted input would retrace the step.
    return parallel.put_replicated(steps_lib.empty_metrics(self.objective), self.mesh)

  def base_rng(self, seed: int):
    return parallel.put_replicated(jax.random.key(seed), self.mesh)

  def init_state(self, seed: int):
    return parallel.init_sharded(self.init_fn, self.shardings, self.mesh, self.rules)(
        jax.random.key(seed))

  def abstract_state(self):
    return parallel.abstract_with_shardings(self.abstract, self.shardings)

  def global_batch(self, host_batch):
    return parallel.global_batch({k: host_batch[k] for k in self.objective.batch_keys}, self.mesh,
                                 self.rules)


def _init_state(config, rng, *, tx):
  params = transformer.init_params(config, rng, boxed=True)
  return train_state_lib.TrainState.create(params, tx)


def _log_progress(writer, step, num_steps, metrics, t_start, start_step, extra):
  values = steps_lib.compute_metrics(metrics)
  elapsed = max(time.time() - t_start, 1e-9)
  rate = (step - start_step) / elapsed
  values.update(steps_per_sec=rate, eta_min=(num_steps - step) / max(rate, 1e-9) / 60.0, **extra)
  writer.write_scalars(step, {f"train/{k}": v for k, v in values.items()})
  return values


def _host_read(tree):
  """The loop's deliberate device->host reads (log, save and sample steps only). They are allowed
  even under a transfer guard that forbids every other read: the tests run the loop inside
  `jax.transfer_guard_device_to_host("disallow_explicit")` to prove the steady state never syncs."""
  with jax.transfer_guard_device_to_host("allow"):
    return jax.device_get(tree)


def _check_nonfinite(state, limit: int, step: int, seen_total: int) -> int:
  """Reads the on-device counters (one transfer); raises once the in-row count reached `limit`
  (the step itself halted there, so no more than `limit` updates were skipped). Returns the total."""
  in_row, total = (int(x) for x in _host_read((state.nonfinite_in_row, state.nonfinite_total)))
  if total > seen_total:
    logging.warning("by step %d: %d non-finite losses or gradients since the last check, updates "
                    "skipped (%d in a row, %d total)", step, total - seen_total, in_row, total)
  if in_row >= limit:
    raise NonFiniteError(
        f"training stopped at step {step}: {in_row} non-finite losses/gradients in a row "
        f"(config.train.max_nonfinite_in_row={limit}; {total} skipped updates in total, later "
        f"steps halted). Lower config.optimizer.peak_lr, raise "
        f"config.optimizer.warmup_steps, or use model.dtype=float32; the last good checkpoint is "
        f"in the workdir's checkpoints/.")
  return total


def _image_codes(config, tokenizer_params, workdir):
  """(code-cache table or None, pre-tokenized Table or None): at most one is set. A pre-tokenized
  table (config.train.pretokenized) takes precedence over config.train.cache_image_codes: it is
  the explicit choice, and on square data (where the cache applies) its K crops are the identity,
  so its codes are the cache's."""
  image_tokenizer = image_tokenizers.get(config)
  table = pretokenized.for_training(config, image_tokenizer, tokenizer_params, workdir=workdir)
  if table is not None:
    if code_cache.mode_of(config) != "off":
      logging.info("image codes: config.train.pretokenized is set, so "
                   "config.train.cache_image_codes=%r is not used", code_cache.mode_of(config))
    return None, table
  return code_cache.build(config, image_tokenizer.encode, tokenizer_params, workdir=workdir), None


def train_and_evaluate(config, workdir: str):
  """Trains the tokenizer if needed, then the transformer; returns the final metrics dict."""
  configs_util.validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  checkpoints.save_config(workdir, config)
  tokenizer_params = image_tokenizers.params_for_run(config, workdir)
  from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  text_tokenizer = text_lib.get_or_train_tokenizer(config, workdir)
  image_codes, table = _image_codes(config, tokenizer_params, workdir)
  setup = Setup(config, workdir, text_tokenizer, tokenizer_params,
                cached_codes=image_codes is not None or table is not None)
  store = checkpoints.CheckpointStore(os.path.join(workdir, "checkpoints"),
                                      keep=int(config.train.keep_checkpoints),
                                      save_every=int(config.train.checkpoint_every))
  state, data_state = store.restore_latest(setup.abstract_state())
  if state is None:
    state = setup.init_state(int(config.seed))
  iterator = pipeline.create_train_iterator(config, text_tokenizer, workdir=workdir,
                                            image_codes=image_codes, pretokenized_table=table)
  if data_state is not None:
    iterator.set_state(data_state)
  writer = metric_writer.create(workdir)
  from magvlt_jax.train import samples  # pylint: disable=import-outside-toplevel
  try:
    state, last = _loop(config, setup, state, iterator, store, writer)
    if (int(state.step) >= int(config.train.num_steps)
        and config.train.get("final_samples", True)):
      samples.write_samples(config, workdir, setup, state.params, text_tokenizer,
                            int(state.step), writer, final=True)
  finally:
    store.close()
    writer.close()
  return last


def _loop(config, setup, state, iterator, store, writer):
  """Asynchronous: the host dispatches step k, then reads and transfers batch k+1 while it runs;
  it reads device values only on log, save and sample steps (non-finite counters included)."""
  from magvlt_jax.train import samples  # pylint: disable=import-outside-toplevel
  t = config.train
  num_steps, start = int(t.num_steps), int(_host_read(state.step))
  limit, log_every, save_every = (int(t.max_nonfinite_in_row), int(t.log_every),
                                  int(t.checkpoint_every))
  rng = setup.base_rng(int(config.seed) + 1)
  metrics = setup.empty_metrics()
  feed = prefetch_lib.DevicePrefetch(iterator, setup.global_batch)
  logging.info("transformer: training steps %d..%d, global batch %d, %d devices", start,
               num_steps, config.data.global_batch_size, jax.device_count())
  last, t0, seen_total = {}, time.time(), int(_host_read(state.nonfinite_total))
  with _Preemption() as preempt:
    for step in range(start + 1, num_steps + 1):
      batch, data_state = next(feed)
      state, metrics = setup.step_fn(state, batch, setup.tokenizer_params, rng, metrics)
      if step < num_steps and not preempt.requested:
        feed.prefetch()
      final = preempt.requested or step == num_steps
      log, save = step % log_every == 0 or step == num_steps, final or step % save_every == 0
      if log or save:  # never log or save a state past the non-finite limit
        seen_total = _check_nonfinite(state, limit, step, seen_total)
      if log:
        with jax.transfer_guard_device_to_host("allow"):
          last = _log_progress(writer, step, num_steps, metrics, t0, start,
                               {"nonfinite_total": float(seen_total)})
        metrics = setup.empty_metrics()
      if save:
        with jax.transfer_guard_device_to_host("allow"):
          store.save(step, state, data_state=data_state, force=final)
      if step % int(t.sample_every) == 0 and step < num_steps:
        with jax.transfer_guard_device_to_host("allow"):
          samples.write_samples(config, setup.workdir, setup, state.params,
                                setup.text_tokenizer, step, writer)
      if preempt.requested:
        store.wait()  # say "saved" only once the async write is finalized on disk
        logging.warning("stopped by SIGTERM at step %d; checkpoint %d saved in %s", step, step,
                        store.directory)
        break
  store.wait()
  return state, last
