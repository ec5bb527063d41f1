"""Image-side maths of masked iterative decoding (SPEC section 5): schedules, token sampling and
the choice of which image slots to reveal (or re-mask) at each step. Pure jnp, float32 throughout.

Orders (config.decoding.order):
  maskgit       (default, official "multinomial-maskgit") reveal the still-masked slots with the
                highest log p(sampled) + g_s * Gumbel, g_s annealed 2.0 -> 0.2; cosine counts;
                revealed tokens stay fixed for ever.
  random        reveal a uniformly random subset of the still-masked slots (cosine counts).
  raster        reveal still-masked slots top-left -> bottom-right (cosine counts).
  mask_predict  X-LXMERT Mask-Predict-K: every step re-predicts the masked slots, then re-masks
                the ceil((1 - (s+1)/T) n) lowest-confidence slots of the region (linear decay), so
                a revealed token may be re-masked later.
Selection is an exact top-k (masking.topk_mask), never a threshold.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax import categorical, masking

ORDERS = ("maskgit", "mask_predict", "random", "raster")
# Official sampler clamps the confidence to the fp16 epsilon before the log.
LOG_CONF_FLOOR = float(math.log(2.0 ** -10))


def check_order(order: str):
  if order not in ORDERS:
    raise ValueError(f"config.decoding.order={order!r}: expected one of {ORDERS}")


def linear_schedule(start_end, num_steps: int) -> np.ndarray:
  """float32 [num_steps]: linspace(start, end, T) (temperatures and Gumbel scales)."""
  start, end = (float(v) for v in start_end)
  return np.linspace(start, end, num_steps, dtype=np.float32)


@functools.lru_cache(maxsize=64)
def keep_table(num_steps: int, n_max: int, schedule: str) -> np.ndarray:
  """int32 [n_max + 1, num_steps]: row n = masking.decode_keep_counts(num_steps, n, schedule).

  Indexed with each example's region size, so regions of any size share one compiled loop.
  """
  rows = [masking.decode_keep_counts(num_steps, n, schedule) for n in range(n_max + 1)]
  return np.stack(rows).astype(np.int32)


def sample_tokens(key, logits, temperature):
  """Categorical sample at every slot of logits / temperature (one uniform per slot:
  categorical.sample, not a Gumbel per vocabulary entry).

  Returns (tokens int32 [B, N], log p(token) float32 [B, N] under the tempered distribution).
  """
  return categorical.sample(key, logits, temperature)


def _reveal_scores(key, order, logp, gumbel_scale):
  n = logp.shape[-1]
  if order == "maskgit":
    return logp + gumbel_scale * jax.random.gumbel(key, logp.shape, jnp.float32)
  if order == "random":
    return jax.random.gumbel(key, logp.shape, jnp.float32)
  # raster: the earliest slot has the highest score.
  return jnp.broadcast_to(-jnp.arange(n, dtype=jnp.float32), logp.shape)


def image_step(key, logits, codes, masked, region, conf, step, *, order, keep, temperatures,
               gumbel_scales):
  """One image refinement step after a forward pass.

  logits: float [B, n, V]; codes int32 [B, n]; masked bool [B, n] (currently masked);
  region bool [B, n] (slots being generated); conf float32 [B, n] (log p of each slot's token
  when it was chosen); step: traced int; keep: int32 [n + 1, T] keep table of the order's
  schedule; temperatures / gumbel_scales: float32 [T].
  Returns (codes, masked, conf) after the step.
  """
  k_sample, k_noise = jax.random.split(key)
  tokens, logp = sample_tokens(k_sample, logits, jnp.asarray(temperatures)[step])
  logp = jnp.maximum(logp, LOG_CONF_FLOOR)
  n_region = region.sum(axis=-1)
  keep_now = jnp.asarray(keep)[n_region, step]
  if order == "mask_predict":
    codes = jnp.where(masked, tokens, codes)
    conf = jnp.where(masked, logp, conf)
    # Re-mask the lowest-confidence slots of the region (ties: later slots first).
    masked = masking.topk_mask(-conf, keep_now, region)
    return codes, masked, conf
  n_masked = masked.sum(axis=-1)
  # Reveal down to keep_now, at least one slot per step while any is masked (official).
  n_reveal = jnp.maximum(n_masked - keep_now, jnp.minimum(n_masked, 1))
  scores = _reveal_scores(k_noise, order, logp, jnp.asarray(gumbel_scales)[step])
  reveal = masking.topk_mask(scores, n_reveal, masked)
  codes = jnp.where(reveal, tokens, codes)
  conf = jnp.where(reveal, logp, conf)
  return codes, masked & ~reveal, conf


def schedule_for_order(order: str) -> str:
  """Mask schedule of an order: linear decay for Mask-Predict-K, cosine otherwise."""
  check_order(order)
  return "linear" if order == "mask_predict" else "cosine"
