"""DevicePrefetch: batches in order and equal to the host batches, each paired with the iterator
state right after it, exactly one batch read ahead once prefetch() is called."""
import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax.train import prefetch


class _Counting:
  def __init__(self):
    self.n = 0

  def __next__(self):
    self.n += 1
    return {"x": np.full((2, 3), self.n, np.int32)}

  def get_state(self):
    return {"next_batch": self.n}


def test_order_equality_and_state_pairing():
  it = _Counting()
  feed = prefetch.DevicePrefetch(it, lambda b: jax.tree.map(jnp.asarray, b))
  assert it.n == 0  # nothing read before the first request
  for k in range(1, 5):
    batch, state = next(feed)
    assert isinstance(batch["x"], jax.Array)
    np.testing.assert_array_equal(np.asarray(batch["x"]), np.full((2, 3), k))
    assert state == {"next_batch": k}  # the position of this batch, not of the prefetched one
    assert it.n == k
    feed.prefetch()
    feed.prefetch()  # idempotent: one batch ahead, never more
    assert it.n == k + 1
