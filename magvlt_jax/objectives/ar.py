"""The ARGVLT training loss (MAGVLT paper's autoregressive baseline; SPEC section 6).

One task per batch, drawn with config.train.task_weights (T2I : I2T) from the 'task' key (or, with
config.train.alternate_tasks, T2I on even steps and I2T on odd ones), both
tasks the branches of ONE lax.switch (the step compiles once). Layouts are sequence.py's, with the
causal model read one slot early (`predict_next`: slot i predicts slot i + 1):
  T2I  [BOC, BOT, text(n_txt), BOG, BOI, image(n_img)]: BOT..text[-2] predict the text (the
       condition), BOI..image[-2] predict the image (generated).
  I2T  [BOC, BOI, image(n_img), BOG, BOT, text(n_txt)]: BOI..image[-2] predict the image (the
       condition), BOT..text[-2] predict the text (generated).
Special slots are fixed, never targets. Text padding (slots >= text_length; the length counts the
EOS) is neither scored nor attended to (sequence.attention_mask & the causal mask).
Loss = w_gen * CE(generated) + w_cond * CE(condition), each the mean label-smoothed CE over its
real slots in the batch (train.generated_loss_weight 0.9, train.condition_loss_weight 0.1,
train.label_smoothing 0.1: the paper's appendix).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax import sequence as seq
from magvlt_jax.objectives import common
from magvlt_jax.objectives.common import masked_loss

Task = seq.Task
TASKS = (Task.T2I, Task.I2T)
TASK_NAMES = ("t2i", "i2t")


def draw_task(key, weights) -> jnp.ndarray:
  """int32 scalar index into TASKS (0 T2I, 1 I2T) drawn proportionally to `weights`."""
  return common.draw_task(key, weights, ("T2I", "I2T"))


class ArObjective(common.Objective):
  """Weighted next-token NLL of a causal VLTransformer; batch: image uint8, text, text_length."""
  batch_keys = ("image", "text", "text_length")

  def __init__(self, config, model, encode_fn, eos_id: int, sep_id: int):
    super().__init__(config, model, encode_fn, eos_id, sep_id)
    if not model.causal:
      raise ValueError("the 'ar' objective needs a causal transformer: set config.model.causal=True")
    t = config.train
    self.image_vocab = int(config.sequence.image_vocab_size)
    self.n_txt, self.n_img = int(config.sequence.text_length), int(config.sequence.image_tokens)
    self.task_weights = tuple(float(w) for w in t.task_weights)
    draw_task(jax.random.key(0), self.task_weights)
    # train.alternate_tasks: T2I on even steps, I2T on odd ones (L-Verse's per-iteration
    # alternation) instead of a draw with task_weights; the step comes from the train step.
    self.uses_step = bool(t.get("alternate_tasks", False))
    self.smoothing = float(t.label_smoothing)
    self.w_gen, self.w_cond = float(t.generated_loss_weight), float(t.condition_loss_weight)
    self.layouts = {task: seq.make_layout(task, self.n_txt, self.n_img) for task in TASKS}

  @classmethod
  def validate_config(cls, config):
    t = config.train
    if not config.model.causal:
      raise ValueError("config.model.causal=False: the 'ar' objective needs causal attention; "
                       "set config.model.causal=True (configs/argvlt.py does)")
    weights = tuple(t.task_weights)
    if (len(weights) != 2 or any((not math.isfinite(w)) or w < 0 for w in weights)
        or sum(weights) <= 0):
      raise ValueError(f"config.train.task_weights={weights!r} must be 2 non-negative weights "
                       "(T2I, I2T) with a positive sum; e.g. (1, 1)")
    if not 0.0 <= t.label_smoothing < 1.0:
      raise ValueError(f"config.train.label_smoothing={t.label_smoothing!r} must be in [0, 1); "
                       "use 0.1 or 0.0")
    if t.get("alternate_tasks", False) and min(weights) <= 0:
      raise ValueError(f"config.train.alternate_tasks=True trains both directions, but "
                       f"config.train.task_weights={weights!r} turns one off; set "
                       "alternate_tasks=False to train one direction")
    for key in ("generated_loss_weight", "condition_loss_weight"):
      if key not in t:
        raise ValueError(f"config.train.{key} is missing; add it (configs/argvlt.py: 0.9 / 0.1)")
      if not t[key] >= 0:
        raise ValueError(f"config.train.{key}={t[key]!r} must be non-negative; e.g. 0.9 / 0.1")

  def metric_fields(self):
    avg = common.average
    fields = {
        "generated_loss": avg("generated_loss"),
        "condition_loss": avg("condition_loss"),
        "image_accuracy": avg("image_correct", "image_count"),
        "text_accuracy": avg("text_correct", "text_count"),
    }
    for name in TASK_NAMES:
      fields[f"loss_{name}"] = avg("loss", f"is_{name}")
      fields[f"generated_loss_{name}"] = avg("generated_loss", f"is_{name}")
      fields[f"frac_{name}"] = avg(f"is_{name}")
    return fields

  def metric_inputs(self, aux):
    return dict(aux, **common.selectors(aux["task"], enumerate(TASK_NAMES)))

  def logits(self, params, task, codes, text, text_length, *, deterministic=True, rng=None):
    """(image logits [B, n_img, V_img], text logits [B, n_txt, V_txt]) predicting each slot from
    the slots before it in `task`'s layout."""
    lay = self.layouts[Task(int(task))]
    inputs = seq.build_input(lay, codes, text, image_vocab_size=self.image_vocab)
    attn = seq.attention_mask(lay, text_length)
    rngs = {"dropout": rng} if rng is not None else {}
    segments = seq.segment_ids(lay, codes.shape[0]) if self.model.num_segments else None
    out = self.model.apply({"params": params}, inputs, attn, layout=lay,
                           deterministic=deterministic, outputs=("image", "text"),
                           predict_next=True, rngs=rngs, segment_ids=segments)
    return out["image"], out["text"]

  def task_loss(self, params, task, codes, text, text_length, rng=None, deterministic=False):
    """Metrics dict of one task (Python int index into TASKS) on one batch."""
    img_logits, txt_logits = self.logits(params, TASKS[task], codes, text, text_length,
                                         deterministic=deterministic, rng=rng)
    image = masked_loss(img_logits, codes, jnp.ones(codes.shape, bool), self.smoothing)
    txt = masked_loss(txt_logits, text, seq.text_valid(text_length, self.n_txt), self.smoothing)
    gen, cond = (image, txt) if TASKS[task] == Task.T2I else (txt, image)
    total = self.w_gen * gen["loss"] + self.w_cond * cond["loss"]
    out = {"loss": total, "generated_loss": gen["loss"], "condition_loss": cond["loss"],
           "image_correct": image["correct"], "image_count": image["count"],
           "text_correct": txt["correct"], "text_count": txt["count"]}
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}

  def loss_fn(self, params, tokenizer_params, batch, rng, task=None, step=None):  # pylint: disable=arguments-differ
    """(total loss, metrics incl. 'task'); task None draws it (one lax.switch) or, with
    train.alternate_tasks, takes it from `step` (even T2I, odd I2T); a Python int traces only
    that branch."""
    self.trace_count += 1
    k_task, k_drop = jax.random.split(rng)
    codes = self.image_codes(tokenizer_params, batch)
    text = jnp.asarray(batch["text"], jnp.int32)
    tlen = jnp.asarray(batch["text_length"], jnp.int32)
    if isinstance(task, (int, np.integer)):
      metrics = self.task_loss(params, int(task), codes, text, tlen, k_drop)
    else:
      if task is None and self.uses_step:
        if step is None:
          raise ValueError("train.alternate_tasks=True: loss_fn needs the step (step=state.step)")
        task = jnp.asarray(step, jnp.int32) % len(TASKS)
      elif task is None:
        task = draw_task(k_task, self.task_weights)
      branches = [lambda p, k, i=i: self.task_loss(p, i, codes, text, tlen, k)
                  for i in range(len(TASKS))]
      metrics = jax.lax.switch(jnp.asarray(task, jnp.int32), branches, params, k_drop)
    metrics["task"] = jnp.asarray(task, jnp.float32)
    return metrics["loss"], metrics


class BiartObjective(ArObjective):
  """L-Verse BiART (SPEC section 6): the same two directions and NLL terms, on a model with the
  [REF]/[GEN] segment embedding (sequence.segment_ids) added to every slot, so one causal
  transformer knows which modality it generates. As the paper, text->image and image->text
  alternate per iteration (train.alternate_tasks=True in configs/lverse.py: even steps T2I, odd
  steps I2T); alternate_tasks=False draws each batch's direction with train.task_weights."""

  def __init__(self, config, model, encode_fn, eos_id: int, sep_id: int):
    if model.num_segments != seq.NUM_SEGMENTS:
      raise ValueError("the 'biart' objective needs the [REF]/[GEN] segment embedding: set "
                       f"config.model.num_segments={seq.NUM_SEGMENTS}")
    super().__init__(config, model, encode_fn, eos_id, sep_id)

  @classmethod
  def validate_config(cls, config):
    super().validate_config(config)
    if config.model.get("num_segments", 0) != seq.NUM_SEGMENTS:
      raise ValueError(f"config.model.num_segments={config.model.get('num_segments', 0)!r}: the "
                       f"'biart' objective needs {seq.NUM_SEGMENTS} ([REF], [GEN]); set it to "
                       f"{seq.NUM_SEGMENTS} (configs/lverse.py does)")
