"""Mask schedules and mask samplers shared by training and decoding (SPEC sections 4-5).

Training: u ~ U(0,1) per example, r = mask_ratio(u, schedule); count = clamp(round(r * n), 1, n)
over the n valid slots (ceil for fresh masks, floor for UnrollMask subsets and MixSel image regions);
positions are an exact uniform subset (top-k of noise, never a threshold). Padding is never masked.
Decoding: decode_keep_counts gives how many slots stay masked after each step (float32 math).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

SCHEDULES = ("cosine", "linear", "uniform")
ROUNDINGS = ("ceil", "floor")


def _check_schedule(schedule):
  if schedule not in SCHEDULES:
    raise ValueError(f"unknown mask schedule {schedule!r}; expected one of {SCHEDULES}")


def mask_ratio(u, schedule: str):
  """Mask ratio for u in [0, 1]: cosine cos(pi/2 u); linear and uniform u (official i2t rule)."""
  _check_schedule(schedule)
  u = jnp.asarray(u, jnp.float32)
  if schedule == "cosine":
    return jnp.cos(jnp.float32(math.pi / 2) * u)
  return u


def sample_ratio(key, batch: int, schedule: str):
  """Per-example mask ratios: u ~ U(0,1) [B], then mask_ratio(u, schedule)."""
  return mask_ratio(jax.random.uniform(key, (batch,), jnp.float32), schedule)


def mask_count(ratio, n_valid, rounding: str = "ceil"):
  """int32 [B]: clamp(round_fn(ratio * n_valid), 1, n_valid) (0 where n_valid == 0)."""
  if rounding not in ROUNDINGS:
    raise ValueError(f"unknown rounding {rounding!r}; expected one of {ROUNDINGS}")
  n_valid = jnp.asarray(n_valid, jnp.int32)
  raw = jnp.asarray(ratio, jnp.float32) * n_valid.astype(jnp.float32)
  raw = jnp.ceil(raw) if rounding == "ceil" else jnp.floor(raw)
  count = jnp.clip(raw.astype(jnp.int32), min=1)
  return jnp.minimum(count, n_valid)


def topk_mask(scores, count, valid=None):
  """bool [B, N]: the `count[b]` highest-scoring valid slots of each row (exact, ties by index)."""
  scores = jnp.asarray(scores, jnp.float32)
  if valid is not None:
    scores = jnp.where(valid, scores, -jnp.inf)
  order = jnp.argsort(-scores, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1, stable=True)
  selected = ranks < jnp.asarray(count, jnp.int32)[:, None]
  if valid is not None:
    selected = selected & valid
  return selected


def sample_mask(key, ratio, valid, rounding: str = "ceil"):
  """bool [B, N]: a uniform random subset of the valid slots of size mask_count(...)."""
  valid = jnp.asarray(valid, bool)
  ratio = jnp.broadcast_to(jnp.asarray(ratio, jnp.float32), valid.shape[:1])
  count = mask_count(ratio, valid.sum(axis=-1), rounding)
  noise = jax.random.uniform(key, valid.shape, jnp.float32)
  return topk_mask(noise, count, valid)


def remask_subset(key, prev_mask, ratio, rounding: str = "floor"):
  """UnrollMask: uniform subset of prev_mask of size clamp(floor(r' * m), 1, m), m = |prev_mask|."""
  return sample_mask(key, ratio, prev_mask, rounding)


def sample_it2it_masks(key, image_valid, text_valid, image_schedule="cosine",
                       text_schedule="linear", rounding="ceil", u=None):
  """IT2IT: one u per example drives both ratios (r_img = cos(pi/2 u), r_txt = u by default).

  Returns (image_mask [B, n_img], text_mask [B, n_txt], u [B]).
  """
  image_valid = jnp.asarray(image_valid, bool)
  key_u, key_img, key_txt = jax.random.split(key, 3)
  if u is None:
    u = jax.random.uniform(key_u, image_valid.shape[:1], jnp.float32)
  image_mask = sample_mask(key_img, mask_ratio(u, image_schedule), image_valid, rounding)
  text_mask = sample_mask(key_txt, mask_ratio(u, text_schedule), text_valid, rounding)
  return image_mask, text_mask, u


def decode_keep_counts(num_steps: int, n: int, schedule: str = "cosine") -> np.ndarray:
  """int64 [num_steps]: slots still masked after step s (0-based): ceil(r((s+1)/T) * n).

  r is the schedule's remaining-mask ratio at progress t: cos(pi/2 t) (cosine) or 1 - t
  (linear/uniform). float32 math as in the official sampler; the last step leaves 0.
  """
  _check_schedule(schedule)
  if num_steps < 1 or n < 0:
    raise ValueError(f"decode_keep_counts: need num_steps >= 1 and n >= 0, got {num_steps}, {n}")
  t = (np.arange(1, num_steps + 1, dtype=np.float32) / np.float32(num_steps)).astype(np.float32)
  if schedule == "cosine":
    r = np.cos(np.float32(math.pi / 2) * t).astype(np.float32)
  else:
    r = (np.float32(1.0) - t).astype(np.float32)
  keep = np.ceil((r * np.float32(n)).astype(np.float32)).astype(np.int64)
  keep = np.clip(keep, 0, n)
  keep[-1] = 0
  # Never re-mask: keep is non-increasing.
  return np.minimum.accumulate(keep)


def decode_unmask_counts(num_steps: int, n: int, schedule: str = "cosine") -> np.ndarray:
  """int64 [num_steps]: how many slots each step unmasks (sums to n)."""
  keep = decode_keep_counts(num_steps, n, schedule)
  return np.concatenate([[n], keep[:-1]]) - keep
