"""Pieces every objective shares: label-smoothed cross-entropy, masked losses, task draws and the
clu metric type the train step merges under jit."""
from typing import Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics


def draw_task(key, weights, names: Sequence[str] = ("T2I", "I2T", "IT2IT")) -> jnp.ndarray:
  """int32 scalar task index drawn with probabilities proportional to `weights` (one per name)."""
  w = np.asarray(weights, np.float32)
  if w.shape != (len(names),) or (w < 0).any() or w.sum() <= 0:
    raise ValueError(f"config.train.task_weights must be {len(names)} non-negative weights "
                     f"({', '.join(names)}) with a positive sum, got {weights}")
  logits = jnp.where(w > 0, jnp.log(jnp.maximum(w, 1e-30)), -jnp.inf)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def smoothed_ce(logits, targets, smoothing: float):
  """Per-slot CE against (1 - s) one_hot + s / V, float32, without materialising one-hots."""
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
  return lse - (1.0 - smoothing) * target_logit - smoothing * logits.mean(axis=-1)


def masked_loss(logits, targets, mask, smoothing: float):
  """Mean smoothed CE over the masked slots, plus argmax-correct and masked counts."""
  mask = mask.astype(jnp.float32)
  ce = smoothed_ce(logits, targets, smoothing)
  count = mask.sum()
  correct = ((jnp.argmax(logits, axis=-1) == targets) * mask).sum()
  return {"loss": (ce * mask).sum() / jnp.maximum(count, 1.0), "correct": correct, "count": count}


def selectors(ids, names):
  """{'is_<name>': float32 0/1 where ids == index} for (index, name) pairs: the per-example task or
  modality selectors that metric fields average over."""
  return {f"is_{name}": (ids == int(i)).astype(jnp.float32) for i, name in names}


def average(value: str, weight: str = None):
  """A clu Average of inputs[value] weighted by inputs[weight] (a 0/1 selector or a count).

  With a count weight (a name ending in `_count`) the value is a sum (e.g. correct predictions),
  so the Average is a ratio. An Average that saw weight 0 in a window is left out of the log.
  """
  @flax.struct.dataclass
  class _Metric(clu_metrics.Average):

    @classmethod
    def from_model_output(cls, **inputs):
      w = jnp.asarray(inputs[weight] if weight else 1.0, jnp.float32)
      v = jnp.asarray(inputs[value], jnp.float32)
      total = v if weight and weight.endswith("_count") else v * w
      return cls(total=total.astype(jnp.float32), count=jnp.round(w).astype(jnp.int32))
  return _Metric


class Objective:
  """Interface of a training objective (a registry entry in objectives/__init__.py).

  Built as `cls(config, model, encode_fn, eos_id, sep_id)` with `encode_fn(tokenizer_params,
  images_uint8) -> codes` from the image tokenizer. Provides
    batch_keys                 the batch fields loss_fn reads (the trainer ships only these);
    loss_fn(params, tokenizer_params, batch, rng) -> (loss, aux: dict of float32 scalars);
    metric_fields() -> {name: clu Average class}  over the dict metric_inputs returns;
    metric_inputs(aux) -> dict                     aux plus the selectors its metrics weight by;
    validate_config(config)  (classmethod)         ValueError naming the key for bad settings.
    uses_step                                      True: the train step calls
                                                   loss_fn(..., step=state.step) (an int32
                                                   scalar) instead; default False.
  `trace_count` counts traces of loss_fn (tests check the train step compiles once).
  """
  batch_keys = ()
  uses_step = False

  def __init__(self, config, model, encode_fn, eos_id: int, sep_id: int):
    self.config, self.model, self.encode_fn = config, model, encode_fn
    self.eos_id, self.sep_id = int(eos_id), int(sep_id)
    self.trace_count = 0

  def read_cached_codes(self):
    """The batches carry `image_codes` (data/code_cache.py) in place of `image`: loss_fn reads
    them instead of running the encoder. Returns self."""
    self.batch_keys = tuple("image_codes" if k == "image" else k for k in type(self).batch_keys)
    return self

  def image_codes(self, tokenizer_params, batch):
    """int32 [B, n_img]: the batch's cached codes, else the frozen encoder's codes of `image`."""
    if "image_codes" in batch:
      return jnp.asarray(batch["image_codes"], jnp.int32)
    return jax.lax.stop_gradient(self.encode_fn(tokenizer_params, batch["image"])).astype(jnp.int32)

  @classmethod
  def validate_config(cls, config):
    del config

  def loss_fn(self, params, tokenizer_params, batch, rng):
    raise NotImplementedError

  def metric_fields(self):
    return {}

  def metric_inputs(self, aux):
    return dict(aux)
