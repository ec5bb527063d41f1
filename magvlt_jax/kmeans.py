"""Mini-batch k-means in JAX (Sculley 2010): the visual vocabulary of X-LXMERT.

    state = kmeans.init_state(samples, k, rng)      # k distinct samples as the first centroids
    state, inertia = kmeans.update(state, batch)    # one mini-batch step (jitted)
    ids = kmeans.assign(batch, state["centroids"])  # nearest centroid, int32 (jitted)
    kmeans.save(path, state); state = kmeans.load(path)

Each centroid moves towards the mean of the points assigned to it with a per-centroid rate
1 / (points it has seen), so after one pass it is the running mean of its points (the batch form
of Sculley's per-sample rule). The state is plain arrays (centroids [K, D] float32, counts [K]
float32, step int32) so a run resumes exactly from its saved file (`fit`'s resume test).

Sharding: `update_fn(mesh)` jits the step with the batch split over the mesh's data axes and the
centroids replicated; the per-cluster sums are a one-hot matmul, so XLA all-reduces them.
"""
import functools
import logging
import os
import time
from typing import Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np


def _sq_distances(x, centroids):
  """||x - c||^2 for every pair, [N, K] float32 (the expanded form: one matmul)."""
  x = x.astype(jnp.float32)
  c = centroids.astype(jnp.float32)
  return (jnp.sum(x * x, axis=-1, keepdims=True) - 2.0 * x @ c.T + jnp.sum(c * c, axis=-1)[None, :])


@jax.jit
def assign(x, centroids):
  """Nearest-centroid ids int32 for x [..., D] (leading shape kept)."""
  lead = x.shape[:-1]
  d = _sq_distances(x.reshape(-1, x.shape[-1]), centroids)
  return jnp.argmin(d, axis=-1).astype(jnp.int32).reshape(lead)


def inertia(x, centroids):
  """Mean squared distance of x [N, D] to its nearest centroid: the k-means objective."""
  return jnp.mean(jnp.maximum(jnp.min(_sq_distances(x, centroids), axis=-1), 0.0))


def init_state(samples, k: int, rng) -> dict:
  """Centroids = k distinct rows of `samples` [N >= k, D] chosen at random (the usual mini-batch
  k-means seeding; k-means++ over 10,000 centres costs a pass per centre)."""
  samples = np.asarray(samples, np.float32).reshape(-1, np.shape(samples)[-1])
  if len(samples) < k:
    raise ValueError(f"kmeans.init_state: {len(samples)} samples for k={k} clusters; the first "
                     f"batches must hold at least k grid cells (raise the init pool or lower k)")
  idx = np.asarray(jax.random.choice(rng, len(samples), (k,), replace=False))
  return dict(centroids=jnp.asarray(samples[idx]), counts=jnp.zeros((k,), jnp.float32),
              step=jnp.zeros((), jnp.int32))


def _update(state, x):
  x = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  c = state["centroids"]
  d = _sq_distances(x, c)
  ids = jnp.argmin(d, axis=-1)
  one_hot = jax.nn.one_hot(ids, c.shape[0], dtype=jnp.float32)  # [N, K]
  n = jnp.sum(one_hot, axis=0)
  sums = one_hot.T @ x  # [K, D]
  counts = state["counts"] + n
  rate = jnp.where(n > 0, 1.0 / jnp.maximum(counts, 1.0), 0.0)[:, None]
  # c + (sum_x - n c) / counts: the running mean over every point the centroid has received
  centroids = c + rate * (sums - n[:, None] * c)
  batch_inertia = jnp.mean(jnp.maximum(jnp.min(d, axis=-1), 0.0))
  return dict(centroids=centroids, counts=counts, step=state["step"] + 1), batch_inertia


update = jax.jit(_update)


def update_fn(mesh=None, rules=None):
  """The jitted step; with a mesh of several devices the batch [N, D] is split over its data axes."""
  if mesh is None or mesh.size == 1:
    return update
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from magvlt_jax import parallel  # pylint: disable=import-outside-toplevel
  rep = NamedSharding(mesh, P())
  data = parallel.batch_sharding(mesh, rules)
  return jax.jit(_update, in_shardings=(rep, data), out_shardings=(rep, rep))


def save(path: str, state: dict, **extra):
  """Atomically writes the state (+ extra scalars/arrays, e.g. the data iterator position)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{k: np.asarray(v) for k, v in jax.device_get(state).items()},
           **{f"extra_{k}": np.asarray(v) for k, v in extra.items()})
  os.replace(tmp, path)


def load(path: str):
  """(state, extra) from `save`; FileNotFoundError / ValueError name the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"kmeans.load: no k-means state at {path}")
  with np.load(path) as f:
    missing = {"centroids", "counts", "step"} - set(f.files)
    if missing:
      raise ValueError(f"kmeans.load: {path} lacks {sorted(missing)}; not a kmeans.save file")
    state = dict(centroids=jnp.asarray(f["centroids"], jnp.float32), counts=jnp.asarray(f["counts"], jnp.float32),
                 step=jnp.asarray(f["step"], jnp.int32))
    extra = {k[len("extra_"):]: f[k] for k in f.files if k.startswith("extra_")}
  return state, extra


def fit(batches: Callable[[int], Iterator[np.ndarray]], k: int, num_steps: int, *, seed: int = 0,
        init_batches: int = 1, state_path: Optional[str] = None, save_every: int = 0,
        log_every: int = 10, step_fn=None):
  """Runs (or resumes) mini-batch k-means for `num_steps` updates.

  batches(start): an iterator of feature batches [..., D] beginning at update `start` (the caller
  makes the order deterministic, so a resumed run sees the batches an uninterrupted one would);
  the first `init_batches` of batches(0) seed the centroids. state_path: resume from / save to this
  npz (every `save_every` steps and at the end). Returns (state, history of (step, inertia))."""
  step_fn = step_fn or update
  state = None
  if state_path and os.path.isfile(state_path):
    state, _ = load(state_path)
    if state["centroids"].shape[0] != k:
      raise ValueError(f"kmeans.fit: {state_path} holds {state['centroids'].shape[0]} centroids, the "
                       f"config asks for k={k}; delete it or set num_clusters to match")
    logging.info("kmeans: resuming from %s at step %d", state_path, int(state["step"]))
  if state is None:
    it = batches(0)
    pool = [np.asarray(next(it)) for _ in range(init_batches)]
    state = init_state(np.concatenate([p.reshape(-1, p.shape[-1]) for p in pool]), k, jax.random.PRNGKey(seed))
  start = int(state["step"])
  history, t0 = [], time.time()
  it = batches(start)
  for step in range(start, num_steps):
    state, value = step_fn(state, jnp.asarray(next(it)))
    done = step + 1
    if done % max(log_every, 1) == 0 or done == num_steps:
      value = float(value)
      history.append((done, value))
      rate = (done - start) / max(time.time() - t0, 1e-9)
      logging.info("kmeans: step %d/%d  inertia %.4f  (%.2f steps/s, eta %.0fs)", done, num_steps,
                   value, rate, (num_steps - done) / max(rate, 1e-9))
    if state_path and ((save_every and done % save_every == 0) or done == num_steps):
      save(state_path, state)
  return state, history
