"""Text-side maths of masked iterative decoding (SPEC section 5, official `sample_txt_tok`).

Every step first (re-)masks n_t = max(1, int(R (T - t) / T)) of the R generatable text slots
(the first N slots for captioning, the span for infilling), then samples the masked slots from
logits / temperature restricted to the top-k ids. Text tokens can be re-masked at any step.
Which slots are re-masked depends on the order (config.decoding.order):
  maskgit       (default, official "sample") draw without replacement from softmax(-logp_prev):
                Gumbel top-k on -logp_prev.
  mask_predict  the n_t lowest logp_prev (official "topk", Mask-Predict).
  random        a uniformly random subset.
  raster        the last n_t slots, so text is revealed left -> right.
"""
import jax
import jax.numpy as jnp

from magvlt_jax import categorical, masking

# logp of a slot that has never been sampled: re-masked before any sampled slot.
UNKNOWN_LOGP = -1e4


def remask_count(n_gen, step, num_steps: int):
  """int32 [B]: max(1, int(R (T - t) / T)), 0 where nothing can be generated (R = 0)."""
  n_gen = jnp.asarray(n_gen, jnp.int32)
  count = (n_gen * (num_steps - step)) // num_steps
  return jnp.where(n_gen > 0, jnp.maximum(count, 1), 0).astype(jnp.int32)


def remask(key, logp, valid, step, num_steps: int, order: str):
  """bool [B, n_txt]: the slots to (re-)mask this step, an exact-size subset of `valid`."""
  count = remask_count(valid.sum(axis=-1), step, num_steps)
  n = logp.shape[-1]
  if order == "maskgit":
    scores = -logp + jax.random.gumbel(key, logp.shape, jnp.float32)
  elif order == "mask_predict":
    scores = -logp
  elif order == "random":
    scores = jax.random.gumbel(key, logp.shape, jnp.float32)
  elif order == "raster":
    scores = jnp.broadcast_to(jnp.arange(n, dtype=jnp.float32), logp.shape)
  else:
    raise ValueError(f"config.decoding.order={order!r} is not a text order")
  return masking.topk_mask(scores, count, valid)


def sample_top_k(key, logits, temperature, top_k: int, vocab_limit: int = 0, banned: int = -1):
  """Sample each slot from softmax(logits / temperature) restricted to its top_k ids.

  Exact top-k (lax.top_k, no threshold); ids >= vocab_limit (when > 0) are never drawn (the
  model's text vocabulary may exceed the tokenizer's), nor id `banned` (>= 0). Returns
  (ids int32, logp float32) with logp under the tempered, filtered distribution (official logp_prev).
  """
  logits = jnp.asarray(logits, jnp.float32) / jnp.asarray(temperature, jnp.float32)
  vocab = logits.shape[-1]
  if 0 < vocab_limit < vocab:
    logits = jnp.where(jnp.arange(vocab) < vocab_limit, logits, -jnp.inf)
    vocab = vocab_limit
  if banned >= 0:
    logits = logits.at[..., banned].set(-jnp.inf)
    vocab -= 1
  k = min(int(top_k), vocab) if top_k and top_k > 0 else vocab
  if k >= vocab:
    # Every allowed id is in the top k (the others carry -inf): sample the row, no sort.
    return categorical.sample(key, logits)
  values, indices = jax.lax.top_k(logits, k)
  choice, logp = categorical.sample(key, values)
  ids = jnp.take_along_axis(indices, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
  return ids, logp


def text_step(key, logits, ids, logp, masked, *, temperature, top_k, vocab_limit, banned=-1):
  """Fill the masked slots with new samples; other slots keep their ids and logp."""
  new_ids, new_logp = sample_top_k(key, logits, temperature, top_k, vocab_limit, banned)
  return jnp.where(masked, new_ids, ids), jnp.where(masked, new_logp, logp)


def apply_length(ids, logp, region, old_length, new_length, eos_id: int):
  """Unconditional decoding re-predicts the length: slots >= length become EOS, slots that
  newly enter the caption are marked never-sampled (re-masked first)."""
  n = ids.shape[-1]
  pos = jnp.arange(n)[None, :]
  inside = pos < new_length[:, None]
  entered = inside & (pos >= old_length[:, None]) & region
  ids = jnp.where(inside, ids, eos_id)
  logp = jnp.where(entered, UNKNOWN_LOGP, logp)
  return ids, logp
