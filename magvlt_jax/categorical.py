"""Categorical sampling with ONE uniform per draw (inverse CDF over the softmax), exact in
distribution, for the decoding loops and UnrollMask.

`jax.random.categorical` adds a Gumbel to every logit: one image step at [B, 256, 16384] draws
B * 4.2M random numbers and two logs of each (134M at batch 32), which on a CPU costs more than
the transformer forward that made the logits. Here: p = exp(l - max l), u ~ U[0, 1) per slot, and
the id is the first whose running sum of p exceeds u * sum(p). The running sum is two-level (sums
of blocks of BLOCK ids, a scan over the blocks, then a scan inside the chosen block), so the work
is one pass over the vocabulary plus scans of V / BLOCK and BLOCK entries. Ids of zero
probability (-inf logits) are never drawn: the target is kept strictly below the total mass, so
the first id whose running sum exceeds it always has mass. Deterministic for a key.
"""
import jax
import jax.numpy as jnp

BLOCK = 128


def _below(x):
  """The largest float32 strictly below x (x > 0): keeps a target inside [0, mass)."""
  return jnp.nextafter(x, jnp.zeros_like(x))


def _first_above(cum, target):
  """int32: index of the first entry of the running sums `cum` [..., n] greater than target."""
  return jnp.sum(cum <= target[..., None], axis=-1, dtype=jnp.int32)


def sample(key, logits, temperature=1.0):
  """One draw per slot from softmax(logits / temperature) over the last axis.

  Returns (ids int32 [...], logp float32 [...]): logp = log softmax(logits / T)[id]. Same
  distribution as jax.random.categorical (tests/test_categorical.py checks the frequencies),
  different draws for the same key.
  """
  logits = jnp.asarray(logits, jnp.float32) / jnp.asarray(temperature, jnp.float32)
  vocab = logits.shape[-1]
  top = jnp.max(logits, axis=-1, keepdims=True)
  mass = jnp.exp(logits - top)  # the max id has mass 1: the total is >= 1
  blocks = -(-vocab // BLOCK)
  if blocks * BLOCK != vocab:
    pad = [(0, 0)] * (logits.ndim - 1) + [(0, blocks * BLOCK - vocab)]
    mass = jnp.pad(mass, pad)
  mass = mass.reshape(logits.shape[:-1] + (blocks, BLOCK))
  block_mass = mass.sum(axis=-1)
  block_cum = jnp.cumsum(block_mass, axis=-1)
  total = block_cum[..., -1]
  u = jax.random.uniform(key, logits.shape[:-1], jnp.float32)
  target = jnp.minimum(u * total, _below(total))
  b = jnp.minimum(_first_above(block_cum, target), blocks - 1)
  start = jnp.take_along_axis(block_cum - block_mass, b[..., None], axis=-1)[..., 0]
  inner = jnp.take_along_axis(mass, b[..., None, None], axis=-2)[..., 0, :]
  inner_cum = jnp.cumsum(inner, axis=-1)
  rest = jnp.clip(target - start, 0.0, _below(inner_cum[..., -1]))
  j = jnp.minimum(_first_above(inner_cum, rest), BLOCK - 1)
  ids = (b * BLOCK + j).astype(jnp.int32)
  logp = (jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0] - top[..., 0]
          - jnp.log(total))
  return ids, logp
