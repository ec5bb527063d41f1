"""categorical.sample: one-uniform inverse-CDF sampling has the categorical distribution."""
import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from magvlt_jax import categorical


def _frequencies(ids, vocab):
  return np.bincount(np.asarray(ids).reshape(-1), minlength=vocab)


def test_frequencies_match_softmax_chi_square():
  # 300 ids: three blocks of 128, the last one padded; a few ids of zero probability.
  vocab, draws, temperature = 300, 60000, 1.4
  logits = np.random.RandomState(0).normal(0.0, 1.0, vocab).astype(np.float32)
  logits[[5, 130, 299]] = -np.inf
  batch = jnp.broadcast_to(jnp.asarray(logits), (draws, vocab))
  ids, logp = jax.jit(categorical.sample)(jax.random.key(0), batch, temperature)
  probs = np.asarray(jax.nn.softmax(jnp.asarray(logits) / temperature), np.float64)
  counts = _frequencies(ids, vocab)
  assert counts[[5, 130, 299]].sum() == 0  # zero-probability ids are never drawn
  live = probs > 0
  expected = probs[live] / probs[live].sum() * draws
  chi2, p_value = stats.chisquare(counts[live], expected * counts.sum() / expected.sum())
  assert p_value > 1e-3, (chi2, p_value)
  # The test has power: the untempered probabilities (T = 1, not 1.4) are rejected.
  wrong = np.asarray(jax.nn.softmax(jnp.asarray(logits)), np.float64)[live]
  assert stats.chisquare(counts[live], wrong / wrong.sum() * counts.sum())[1] < 1e-6
  # logp is the tempered log-probability of the drawn id.
  np.testing.assert_allclose(np.asarray(logp), np.log(probs[np.asarray(ids)]), rtol=1e-5, atol=1e-5)


def test_peaked_and_one_hot_rows():
  # A near-one-hot row (the low-temperature end of decoding) and a row with one finite logit.
  vocab = 1000
  rows = np.full((2, vocab), -np.inf, np.float32)
  rows[0] = 0.0
  rows[0, 777] = 30.0
  rows[1, 3] = 0.0
  ids, logp = categorical.sample(jax.random.key(1), jnp.asarray(np.repeat(rows[None], 500, 0)))
  ids = np.asarray(ids)
  assert (ids[:, 1] == 3).all()
  np.testing.assert_allclose(np.asarray(logp)[:, 1], 0.0, atol=1e-6)
  assert (ids[:, 0] == 777).mean() > 0.99


def test_deterministic_for_a_key_and_independent_across_slots():
  logits = jnp.zeros((4, 64, 16384), jnp.float32)
  a, _ = categorical.sample(jax.random.key(3), logits)
  b, _ = categorical.sample(jax.random.key(3), logits)
  c, _ = categorical.sample(jax.random.key(4), logits)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert (np.asarray(a) != np.asarray(c)).mean() > 0.99
  # Uniform logits: every block and every offset inside a block is reached about evenly.
  ids = np.asarray(a).reshape(-1)
  blocks = np.bincount(ids // categorical.BLOCK, minlength=16384 // categorical.BLOCK)
  _, p_value = stats.chisquare(blocks)
  assert p_value > 1e-3
