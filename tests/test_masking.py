"""Mask schedules, counts (ceil/floor/clamp), exact subsets, UnrollMask subsets, decode counts."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magvlt_jax import masking


def test_mask_ratio_schedules():
  u = jnp.array([0.0, 0.5, 1.0])
  np.testing.assert_allclose(masking.mask_ratio(u, "cosine"), [1.0, math.cos(math.pi / 4), 0.0], atol=1e-6)
  np.testing.assert_allclose(masking.mask_ratio(u, "linear"), u)
  np.testing.assert_allclose(masking.mask_ratio(u, "uniform"), u)
  with pytest.raises(ValueError, match="schedule"):
    masking.mask_ratio(u, "sqrt2")


@pytest.mark.parametrize("schedule", ["cosine", "linear", "uniform"])
@pytest.mark.parametrize("n", [1, 7, 24, 64])
def test_sample_mask_counts_match_ceil_clamp(schedule, n):
  batch = 16
  u = jnp.linspace(0.0, 1.0, batch)
  ratio = masking.mask_ratio(u, schedule)
  valid = jnp.ones((batch, n), bool)
  mask = masking.sample_mask(jax.random.key(n), ratio, valid)
  expected = np.clip(np.ceil(np.asarray(ratio, np.float32) * np.float32(n)), 1, n)
  assert np.asarray(mask.sum(-1)).tolist() == expected.astype(int).tolist()


def test_sample_mask_respects_valid_and_floor():
  lengths = jnp.array([0, 1, 3, 10, 10])
  valid = jnp.arange(10)[None] < lengths[:, None]
  ratio = jnp.array([0.5, 0.01, 0.5, 0.05, 0.99])
  for rounding, expected in (("ceil", [0, 1, 2, 1, 10]), ("floor", [0, 1, 1, 1, 9])):
    mask = masking.sample_mask(jax.random.key(0), ratio, valid, rounding)
    assert np.asarray(mask.sum(-1)).tolist() == expected
    assert not np.asarray(mask & ~valid).any()  # padding never masked


def test_sample_mask_is_uniform_subset():
  valid = jnp.ones((4000, 8), bool)
  mask = masking.sample_mask(jax.random.key(3), jnp.full((4000,), 0.25), valid)
  assert (np.asarray(mask.sum(-1)) == 2).all()
  freq = np.asarray(mask.mean(0))
  np.testing.assert_allclose(freq, 0.25, atol=0.03)


def test_remask_subset_is_floor_subset_of_previous():
  key1, key2 = jax.random.split(jax.random.key(1))
  valid = jnp.ones((6, 20), bool)
  prev = masking.sample_mask(key1, jnp.array([0.1, 0.3, 0.5, 0.7, 0.9, 1.0]), valid)
  ratio = jnp.array([0.5, 0.5, 0.3, 0.01, 0.6, 0.95])
  new = masking.remask_subset(key2, prev, ratio)
  m = np.asarray(prev.sum(-1))
  expected = np.clip(np.floor(np.asarray(ratio, np.float32) * m.astype(np.float32)), 1, m)
  assert np.asarray(new.sum(-1)).tolist() == expected.astype(int).tolist()
  assert not np.asarray(new & ~prev).any()


def test_it2it_masks_share_u():
  image_valid = jnp.ones((5, 64), bool)
  text_valid = jnp.arange(24)[None] < jnp.array([24, 10, 5, 24, 1])[:, None]
  img, txt, u = masking.sample_it2it_masks(jax.random.key(2), image_valid, text_valid)
  u = np.asarray(u, np.float32)
  exp_img = np.clip(np.ceil(np.cos(np.float32(math.pi / 2) * u) * 64), 1, 64)
  exp_txt = np.clip(np.ceil(u * np.array([24, 10, 5, 24, 1], np.float32)), 1, None)
  assert np.asarray(img.sum(-1)).tolist() == exp_img.astype(int).tolist()
  assert np.asarray(txt.sum(-1)).tolist() == exp_txt.astype(int).tolist()


def test_decode_counts_official_t2i():
  unmask = masking.decode_unmask_counts(10, 256)
  assert unmask.tolist() == [3, 9, 15, 21, 26, 31, 34, 37, 39, 41]
  keep = masking.decode_keep_counts(10, 256)
  assert keep[-1] == 0 and (np.diff(keep) <= 0).all()


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
@pytest.mark.parametrize("steps,n", [(1, 5), (4, 3), (12, 64), (8, 64)])
def test_decode_counts_sum_to_n(schedule, steps, n):
  unmask = masking.decode_unmask_counts(steps, n, schedule)
  assert unmask.sum() == n and (unmask >= 0).all() and len(unmask) == steps
