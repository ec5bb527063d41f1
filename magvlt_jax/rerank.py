"""Reranking of sampled candidates (SPEC section 5): keep the top-1 of N per query.

Two scorers:
  clip        cosine similarity of CLIP image / text embeddings (paper; needs user-supplied CLIP
              weights, config.decoding.clip_weights, loaded by magvlt_jax.models.clip).
  likelihood  the model's own log-likelihood of the candidate under the other modality: T2I
              candidates score mean log p(image code | caption, other codes), I2T candidates
              mean log p(caption token | image, other tokens). A pseudo-likelihood: the slots
              are split into `num_passes` interleaved groups (slot i in group i % P); each pass
              masks one group and scores it, so every slot is scored once given the rest.
config.decoding.rerank: auto (clip when weights are given, else likelihood) | clip | likelihood |
none. Scorers run batched inside jit; `best_of` picks the winners.
"""
import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax import sequence

RERANKERS = ("auto", "clip", "likelihood", "none")


def resolve(config) -> str:
  """The scorer config.decoding.rerank asks for: 'clip', 'likelihood' or 'none'."""
  mode = config.decoding.rerank
  if mode not in RERANKERS:
    raise ValueError(f"config.decoding.rerank={mode!r}: expected one of {RERANKERS}")
  has_clip = bool(config.decoding.get("clip_weights", ""))
  if mode == "clip" and not has_clip:
    raise ValueError("config.decoding.rerank='clip' needs config.decoding.clip_weights (a CLIP "
                     "checkpoint); use 'likelihood' or 'auto' without one")
  if mode == "auto":
    return "clip" if has_clip else "likelihood"
  return mode


def _gather_logp(logits, targets):
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, jnp.asarray(targets, jnp.int32)[..., None], axis=-1)[..., 0]


def image_loglik(logits_fn, layout, image_vocab_size, image_codes, text_ids, text_length,
                 num_passes: int = 4):
  """float32 [B]: mean pseudo-log-likelihood of image_codes given the caption (T2I layout)."""
  image_codes = jnp.asarray(image_codes, jnp.int32)
  groups = jnp.arange(layout.n_img) % num_passes
  attn = sequence.attention_mask(layout, text_length)
  total = jnp.zeros(image_codes.shape[:1], jnp.float32)
  for g in range(num_passes):  # static, small
    masked = jnp.broadcast_to(groups == g, image_codes.shape)
    inputs = sequence.build_input(layout, image_codes, text_ids, masked, None,
                                  image_vocab_size=image_vocab_size)
    logits = logits_fn(inputs, attn, layout=layout, outputs=("image",))["image"]
    total += jnp.where(masked, _gather_logp(logits, image_codes), 0.0).sum(axis=-1)
  return total / layout.n_img


def text_loglik(logits_fn, layout, image_vocab_size, image_codes, text_ids, text_length,
                num_passes: int = 4):
  """float32 [B]: mean pseudo-log-likelihood of the caption tokens (incl. EOS) given the image
  (I2T layout), over the first text_length slots."""
  text_ids = jnp.asarray(text_ids, jnp.int32)
  valid = sequence.text_valid(text_length, layout.n_txt)
  groups = jnp.arange(layout.n_txt) % num_passes
  attn = sequence.attention_mask(layout, text_length)
  total = jnp.zeros(text_ids.shape[:1], jnp.float32)
  for g in range(num_passes):
    masked = valid & (groups == g)[None, :]
    inputs = sequence.build_input(layout, image_codes, text_ids, None, masked,
                                  image_vocab_size=image_vocab_size)
    logits = logits_fn(inputs, attn, layout=layout, outputs=("text",))["text"]
    total += jnp.where(masked, _gather_logp(logits, text_ids), 0.0).sum(axis=-1)
  return total / jnp.maximum(valid.sum(axis=-1), 1)


def clip_similarity(image_embeds, text_embeds):
  """float32 [B]: cosine similarity of paired embeddings [B, D]."""
  a = jnp.asarray(image_embeds, jnp.float32)
  b = jnp.asarray(text_embeds, jnp.float32)
  a = a / jnp.maximum(jnp.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
  b = b / jnp.maximum(jnp.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
  return (a * b).sum(axis=-1)


def best_of(scores, num_candidates: int) -> np.ndarray:
  """int [Q]: index (0..n-1) of the best candidate of each query; scores [Q * n] are grouped
  query-major (candidates of query q at q*n .. q*n+n-1). Ties: the first candidate."""
  scores = np.asarray(scores, np.float32)
  if scores.size % num_candidates:
    raise ValueError(f"best_of: {scores.size} scores are not a multiple of {num_candidates} candidates")
  return np.argmax(scores.reshape(-1, num_candidates), axis=-1)


def load_clip_scorer(weights_path: str):
  """(images uint8 [B, H, W, 3], captions list[str]) -> float32 [B] cosine similarities, from the
  user-supplied CLIP checkpoint (OpenAI / open_clip state dict; its BPE file beside it or from
  open_clip), via magvlt_jax.models.clip.CLIPScorer."""
  from magvlt_jax.models import clip  # pylint: disable=import-outside-toplevel
  scorer = clip.CLIPScorer.from_path(weights_path)
  return lambda images, captions: np.asarray(scorer.similarity(images, list(captions)), np.float32)
