"""Host batches put on the mesh one step ahead (double buffering), paired with the data-iterator
state *after* that batch, so a checkpoint written at step k records the position of batch k, not
of the batch already prefetched for step k+1.

Use: `batch, data_state = next(feed)`; dispatch the (asynchronous) step on `batch`; then
`feed.prefetch()` reads, converts and transfers the next host batch while the step runs. At most
two batches live on the devices: the one in use and the next.
"""
from typing import Any, Callable, Iterator, Tuple


class DevicePrefetch:
  """Iterates (device batch, iterator state after it) from a host iterator with get_state()."""

  def __init__(self, iterator: Iterator, put: Callable[[Any], Any]):
    self._iterator, self._put = iterator, put
    self._next = None

  def prefetch(self) -> None:
    """Reads and transfers the next batch now (no-op if one is already waiting)."""
    if self._next is None:
      host_batch = next(self._iterator)
      self._next = (self._put(host_batch), self._iterator.get_state())

  def __iter__(self):
    return self

  def __next__(self) -> Tuple[Any, Any]:
    self.prefetch()
    out, self._next = self._next, None
    return out
