"""The MAGVLT multitask training loss for one batch (SPEC section 4).

One task per batch, drawn with config.train.task_weights (T2I:I2T:IT2IT = 8:1:1) from the 'task'
key; the three tasks are the branches of ONE `lax.switch`, so the train step compiles once.

Per task (r = mask ratio, u ~ U(0,1) per example; padding is never masked or scored):
  T2I    [BOC,BOT,text,BOG,BOI,image]: image masked with r = cos(pi/2 u) (ceil); loss on them.
  I2T    [BOC,BOI,image,BOG,BOT,text]: text masked with r = u over the real slots (ceil); loss on
         them; length loss at BOT.
  IT2IT  same layout, both masked from the same u; loss = CE_image + CE_text; length loss at BOT.
Loss: cross-entropy with label smoothing (config.train.label_smoothing) on masked slots only,
float32, mean over the masked slots of the batch.
Length loss (ours): CE(length_logits, length - 1), added on I2T and IT2IT batches only (the
layouts where BOT is read), weight 0.01, on a separate "probe" pass with the text fully masked and
every text column visible: exactly the pass decoding predicts the length from. (On the task pass
the length would leak to BOT through image rows that attend to the partly visible text.)
UnrollMask (T2I, I2T; ours where the paper is silent): the first pass IS the task pass (its logits
under stop_gradient, saving a forward); masked slots are filled with codes/tokens sampled from it,
then a subset of the previously masked slots of size clamp(floor(r' * m), 1, m) is re-masked,
with r' the schedule's ratio at a later decoding step: image u' = u + (1 - u) v, r' = cos(pi/2 u');
text r' = r (1 - v), v ~ U(0,1). Loss on the re-masked slots against the true targets (weight 1).
MixSel (weight config.train.mixsel_weight = 0.5): example b is paired with partner b+1 (mod B);
"first" = b, "second" = the partner, and the selector picks one of them per example.
  T2I    context: captions joined "first (no EOS) SEP second EOS" (truncated to n_txt);
         selector LEFT/RIGHT; target: the selected example's image codes (fully re-masked).
  I2T    context: the pixel-level mix first|second (left|right from `image_lr`, or top/bottom from
         `image_tb`, chosen per example) VQ-encoded in the step; selector LEFT/RIGHT/TOP/BOTTOM;
         target: the selected example's caption (masked as in I2T).
  IT2IT  mixed image + joined captions; masks are drawn only inside the selected half of the
         code grid (floor rounding, official) and the selected caption's span (ceil); the targets
         are the mixed sequence's own codes/tokens there (official `hnh_loc_img`/`hnh_loc_txt`).
The MixSel pass shares the task pass's forward (concatenated along the batch). Both auxiliary
passes use every config.train.aux_batch_stride-th example (1 = the whole batch; CPU-sized runs
use 2 to trade auxiliary signal for steps).
Total = L_task + L_unroll + 0.5 L_mixsel + 0.01 L_len.
"""
import math
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax import categorical, masking
from magvlt_jax import sequence as seq
from magvlt_jax.objectives import common
from magvlt_jax.objectives.common import masked_loss, smoothed_ce

Task = seq.Task
TASK_NAMES = {Task.T2I: "t2i", Task.I2T: "i2t", Task.IT2IT: "it2it"}
METRIC_KEYS = ("loss", "task_loss", "unroll_loss", "mixsel_loss", "length_loss", "image_correct",
               "image_count", "text_correct", "text_count", "length_correct", "length_count")


def draw_task(key, weights) -> jnp.ndarray:
  """int32 scalar MAGVLT task (T2I, I2T, IT2IT) drawn proportionally to `weights`."""
  return common.draw_task(key, weights, ("T2I", "I2T", "IT2IT"))


def later_ratio(key, u, schedule: str):
  """UnrollMask r': the `schedule` ratio at a later decoding step than the one of u."""
  v = jax.random.uniform(key, u.shape, jnp.float32)
  if schedule == "cosine":
    return masking.mask_ratio(u + (1.0 - u) * v, "cosine")
  return masking.mask_ratio(u, schedule) * (1.0 - v)  # linear/uniform: r = u, decoding 1 - r


def partner_index(batch: int) -> jnp.ndarray:
  """MixSel pairing: example b with b+1 (mod B); every example is a 'second' exactly once."""
  return jnp.roll(jnp.arange(batch, dtype=jnp.int32), -1)


def join_captions(text, length, partner, sep_id: int, eos_id: int):
  """MixSel text: first caption without its EOS + SEP + partner's caption with EOS, cut to n_txt.

  Returns (ids [B, n], length [B], first_span [B, n], second_span [B, n]) where the spans are the
  slots holding each caption's tokens (the separator belongs to neither; the EOS to the second).
  """
  n = text.shape[1]
  l1 = length[:, None]
  l2 = length[partner][:, None]
  j = jnp.arange(n, dtype=jnp.int32)[None, :]
  first = j < l1 - 1
  second = (j >= l1) & (j < l1 + l2)
  from_second = jnp.take_along_axis(text[partner], jnp.clip(j - l1, min=0, max=n - 1), axis=1)
  ids = jnp.where(first, text, jnp.where(j == l1 - 1, sep_id, jnp.where(second, from_second, eos_id)))
  return ids.astype(jnp.int32), jnp.minimum(l1 + l2, n)[:, 0].astype(jnp.int32), first, second


def mix_images(image_lr, image_tb, partner, vertical):
  """Pixel-level MixSel image: first|second side by side (squeezed halves), or stacked where
  `vertical`. uint8 [B, S, S, 3]."""
  lr = jnp.concatenate([image_lr, image_lr[partner]], axis=2)
  tb = jnp.concatenate([image_tb, image_tb[partner]], axis=1)
  return jnp.where(vertical[:, None, None, None], tb, lr)


def half_region(n_img: int, vertical, pick_first):
  """bool [B, n_img]: raster code slots of the selected half (left/right or top/bottom)."""
  g = int(round(n_img ** 0.5))
  if g * g != n_img or g % 2:
    raise ValueError(f"MixSel needs a square code grid with an even side, got {n_img} image tokens")
  idx = jnp.arange(n_img)
  left, top = (idx % g) < g // 2, (idx // g) < g // 2
  in_first = jnp.where(vertical[:, None], top[None], left[None])
  return jnp.where(pick_first[:, None], in_first, ~in_first)


def _concat(*trees):
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)


class MagvltObjective(common.Objective):
  """The multitask loss. `model`: a VLTransformer; `encode_fn(tok_params, images_uint8) -> codes`.

  `loss_fn(params, tok_params, batch, rng, task=None) -> (loss, metrics)`; `batch` holds image,
  image_lr, image_tb (uint8), text, text_length (int32). `task=None` draws it from rng.
  """
  batch_keys = ("image", "image_lr", "image_tb", "text", "text_length")

  def __init__(self, config, model, encode_fn: Callable, eos_id: int, sep_id: int):
    super().__init__(config, model, encode_fn, eos_id, sep_id)
    t = config.train
    self.image_vocab = int(config.sequence.image_vocab_size)
    self.n_txt, self.n_img = int(config.sequence.text_length), int(config.sequence.image_tokens)
    self.task_weights = tuple(float(w) for w in t.task_weights)
    draw_task(jax.random.key(0), self.task_weights)  # validates the weights early
    self.smoothing = float(t.label_smoothing)
    self.length_weight = float(t.length_loss_weight)
    self.use_unroll, self.use_mixsel = bool(t.use_unroll), bool(t.use_mixsel)
    self.mixsel_weight = float(t.mixsel_weight)
    self.aux_stride = int(t.get("aux_batch_stride", 1))
    if self.aux_stride < 1:
      raise ValueError(f"config.train.aux_batch_stride must be >= 1, got {self.aux_stride}")
    self.image_schedule, self.text_schedule = str(t.image_mask_schedule), str(t.text_mask_schedule)
    for name, s in (("image_mask_schedule", self.image_schedule), ("text_mask_schedule", self.text_schedule)):
      if s not in masking.SCHEDULES:
        raise ValueError(f"config.train.{name}={s!r}: expected one of {masking.SCHEDULES}")
    self.layouts = {task: seq.make_layout(task, self.n_txt, self.n_img) for task in Task}

  @classmethod
  def validate_config(cls, config):
    """train.* keys of the MAGVLT objective (task mix, schedules, loss weights)."""
    t = config.train
    weights = tuple(t.task_weights)
    if len(weights) != 3:
      raise ValueError(f"config.train.task_weights={weights!r} must have 3 entries (T2I, I2T, "
                       "IT2IT); e.g. (8, 1, 1)")
    if any((not math.isfinite(w)) or w < 0 for w in weights) or sum(weights) <= 0:
      raise ValueError(f"config.train.task_weights={weights!r} must be non-negative with a "
                       "positive sum; e.g. (8, 1, 1)")
    for key in ("image_mask_schedule", "text_mask_schedule"):
      if t[key] not in masking.SCHEDULES:
        raise ValueError(f"config.train.{key}={t[key]!r} is not a known value; use one of "
                         f"{list(masking.SCHEDULES)}")
    if not 0.0 <= t.label_smoothing < 1.0:
      raise ValueError(f"config.train.label_smoothing={t.label_smoothing!r} must be in [0, 1); "
                       "use 0.1 or 0.0")
    for key in ("length_loss_weight", "mixsel_weight"):
      if not t[key] >= 0:
        raise ValueError(f"config.train.{key}={t[key]!r} must be non-negative; set a number >= 0")

  # ---------------------------------------------------------------- metrics
  def metric_fields(self):
    avg = common.average
    fields = {
        "unroll_loss": avg("unroll_loss", "has_unroll"),
        "mixsel_loss": avg("mixsel_loss", "has_mixsel"),
        "length_loss": avg("length_loss", "has_length"),
        "image_accuracy": avg("image_correct", "image_count"),
        "text_accuracy": avg("text_correct", "text_count"),
        "length_accuracy": avg("length_correct", "length_count"),
    }
    for name in TASK_NAMES.values():
      fields[f"loss_{name}"] = avg("loss", f"is_{name}")
      fields[f"task_loss_{name}"] = avg("task_loss", f"is_{name}")
      fields[f"frac_{name}"] = avg(f"is_{name}")
    return fields

  def metric_inputs(self, aux):
    task = aux["task"]
    out = dict(aux, **common.selectors(task, TASK_NAMES.items()))
    unroll_tasks = (task == int(Task.T2I)) | (task == int(Task.I2T))
    out["has_unroll"] = (unroll_tasks & self.use_unroll).astype(jnp.float32)
    out["has_mixsel"] = jnp.float32(self.use_mixsel)
    out["has_length"] = (task != int(Task.T2I)).astype(jnp.float32)
    return out

  # ---------------------------------------------------------------- helpers
  def _forward(self, params, inputs, attn, layout, outputs, key):
    return self.model.apply({"params": params}, inputs, attn, layout=layout, deterministic=False,
                            outputs=outputs, rngs={"dropout": key})

  def _input(self, layout, codes, text, img_mask=None, txt_mask=None, bog=None):
    return seq.build_input(layout, codes, text, image_masked=img_mask, text_masked=txt_mask,
                           bog_token=bog, image_vocab_size=self.image_vocab)

  def _aux(self, tree):
    """The examples the UnrollMask, MixSel and length-probe passes use: every aux_batch_stride-th
    (a stride, not a prefix, so a batch sharded over devices stays balanced)."""
    if self.aux_stride == 1:
      return tree
    return jax.tree.map(lambda x: x[::self.aux_stride], tree)

  def _fresh_mask(self, key, schedule, valid):
    """(u [B], mask [B, N]): u ~ U(0,1) per example, ceil(ratio * n_valid) valid slots masked."""
    k_u, k_m = jax.random.split(key)
    u = jax.random.uniform(k_u, valid.shape[:1], jnp.float32)
    return u, masking.sample_mask(k_m, masking.mask_ratio(u, schedule), valid)

  def _unroll(self, key, logits, targets, prev_mask, u, schedule):
    """Fill prev_mask slots with samples from the (stop-gradient) first pass; re-mask a subset."""
    k_fill, k_ratio, k_mask = jax.random.split(key, 3)
    sampled, _ = categorical.sample(k_fill, jax.lax.stop_gradient(logits))
    filled = jnp.where(prev_mask, sampled.astype(jnp.int32), targets)
    new_mask = masking.remask_subset(k_mask, prev_mask, later_ratio(k_ratio, u, schedule))
    return filled, new_mask

  def _length_loss(self, length_logits, text_length):
    target = jnp.clip(text_length - 1, min=0, max=length_logits.shape[-1] - 1)
    ce = smoothed_ce(length_logits, target, 0.0).mean()
    correct = (jnp.argmax(length_logits, axis=-1) == target).sum().astype(jnp.float32)
    return ce, correct, jnp.float32(target.shape[0])

  def _length_probe(self, params, codes, text, tlen, key):
    """Length loss on the pass decoding predicts the length from: text fully masked, every text
    column visible. Reading BOT on the task pass would leak the answer: BOT cannot see the text,
    but from the second block on it sees image rows that attended to the partly unmasked,
    length-masked text."""
    lay = self.layouts[Task.I2T]
    full = jnp.full(tlen.shape, self.n_txt, jnp.int32)
    inputs = self._input(lay, codes, text, txt_mask=jnp.ones(text.shape, bool))
    out = self._forward(params, inputs, seq.attention_mask(lay, full), lay, ("length",), key)
    return self._length_loss(out["length"], tlen)

  def _result(self, task_loss, unroll=0.0, mixsel=0.0, length=None, image=None, text=None):
    zero = jnp.float32(0.0)
    length = length or (zero, zero, zero)
    image = image or {"correct": zero, "count": zero}
    text = text or {"correct": zero, "count": zero}
    total = task_loss + unroll + self.mixsel_weight * mixsel + self.length_weight * length[0]
    out = {"loss": total, "task_loss": task_loss, "unroll_loss": unroll, "mixsel_loss": mixsel,
           "length_loss": length[0], "image_correct": image["correct"], "image_count": image["count"],
           "text_correct": text["correct"], "text_count": text["count"],
           "length_correct": length[1], "length_count": length[2]}
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}

  # ---------------------------------------------------------------- tasks
  def t2i_mixsel(self, codes, text, tlen, key):
    """T2I MixSel: (inputs, attn, target codes, image mask); the target is the selected caption's
    image, the context both captions joined by SEP, the selector LEFT (first) / RIGHT (second)."""
    lay = self.layouts[Task.T2I]
    b = codes.shape[0]
    k_pick, k_m = jax.random.split(key)
    partner = partner_index(b)
    pick_first = jax.random.bernoulli(k_pick, 0.5, (b,))
    mtext, mlen, _, _ = join_captions(text, tlen, partner, self.sep_id, self.eos_id)
    target = jnp.where(pick_first[:, None], codes, codes[partner])
    _, mask = self._fresh_mask(k_m, self.image_schedule, jnp.ones(codes.shape, bool))
    inputs = self._input(lay, target, mtext, img_mask=mask, bog=seq.selector_token(pick_first))
    return inputs, seq.attention_mask(lay, mlen), target, mask

  def _t2i(self, params, tok_params, batch, codes, key):
    lay = self.layouts[Task.T2I]
    text, tlen = batch["text"], batch["text_length"]
    b = codes.shape[0]
    k_m, k_mix, k_unroll, k_d1, k_d2 = jax.random.split(key, 5)
    u, mask = self._fresh_mask(k_m, self.image_schedule, jnp.ones(codes.shape, bool))
    inputs, attn = self._input(lay, codes, text, img_mask=mask), seq.attention_mask(lay, tlen)
    if self.use_mixsel:
      mix_in, mix_attn, mtarget, mmask = self.t2i_mixsel(*self._aux((codes, text, tlen)), k_mix)
      inputs, attn = _concat(inputs, mix_in), _concat(attn, mix_attn)
    logits = self._forward(params, inputs, attn, lay, ("image",), k_d1)["image"]
    main = masked_loss(logits[:b], codes, mask, self.smoothing)
    mixsel = masked_loss(logits[b:], mtarget, mmask, self.smoothing)["loss"] if self.use_mixsel else 0.0
    unroll = 0.0
    if self.use_unroll:
      logits, codes, mask, u, text, tlen = self._aux((logits[:b], codes, mask, u, text, tlen))
      filled, mask2 = self._unroll(k_unroll, logits, codes, mask, u, self.image_schedule)
      inputs2 = self._input(lay, filled, text, img_mask=mask2)
      logits2 = self._forward(params, inputs2, seq.attention_mask(lay, tlen), lay, ("image",), k_d2)
      unroll = masked_loss(logits2["image"], codes, mask2, self.smoothing)["loss"]
    return self._result(main["loss"], unroll, mixsel, image=main)

  def _mixed_codes(self, tok_params, batch, key):
    """(codes of the pixel-mixed images, partner, vertical, pick_first) for I2T/IT2IT MixSel."""
    k_v, k_pick = jax.random.split(key)
    b = batch["text"].shape[0]
    partner = partner_index(b)
    vertical = jax.random.bernoulli(k_v, 0.5, (b,))
    pick_first = jax.random.bernoulli(k_pick, 0.5, (b,))
    images = mix_images(batch["image_lr"], batch["image_tb"], partner, vertical)
    codes = jax.lax.stop_gradient(self.encode_fn(tok_params, images)).astype(jnp.int32)
    return codes, partner, vertical, pick_first

  def i2t_mixsel(self, tok_params, batch, key):
    """I2T MixSel: (inputs, attn, target text, text mask); context the pixel-mixed image, target
    the selected half's caption, selector LEFT/RIGHT/TOP/BOTTOM."""
    lay = self.layouts[Task.I2T]
    text, tlen = batch["text"], batch["text_length"]
    k_codes, k_m = jax.random.split(key)
    mcodes, partner, vertical, pick_first = self._mixed_codes(tok_params, batch, k_codes)
    target = jnp.where(pick_first[:, None], text, text[partner])
    length = jnp.where(pick_first, tlen, tlen[partner])
    _, mask = self._fresh_mask(k_m, self.text_schedule, seq.text_valid(length, self.n_txt))
    inputs = self._input(lay, mcodes, target, txt_mask=mask, bog=seq.selector_token(pick_first, vertical))
    return inputs, seq.attention_mask(lay, length), target, mask

  def _i2t(self, params, tok_params, batch, codes, key):
    lay = self.layouts[Task.I2T]
    text, tlen = batch["text"], batch["text_length"]
    b = codes.shape[0]
    k_m, k_mix, k_unroll, k_d1, k_d2, k_len = jax.random.split(key, 6)
    u, mask = self._fresh_mask(k_m, self.text_schedule, seq.text_valid(tlen, self.n_txt))
    inputs, attn = self._input(lay, codes, text, txt_mask=mask), seq.attention_mask(lay, tlen)
    if self.use_mixsel:
      mix_in, mix_attn, mtext, mmask = self.i2t_mixsel(tok_params, self._aux(batch), k_mix)
      inputs, attn = _concat(inputs, mix_in), _concat(attn, mix_attn)
    out = self._forward(params, inputs, attn, lay, ("text",), k_d1)
    main = masked_loss(out["text"][:b], text, mask, self.smoothing)
    mixsel = masked_loss(out["text"][b:], mtext, mmask, self.smoothing)["loss"] if self.use_mixsel else 0.0
    length = self._length_probe(params, *self._aux((codes, text, tlen)), k_len)
    unroll = 0.0
    if self.use_unroll:
      logits, codes, mask, u, text, tlen = self._aux((out["text"][:b], codes, mask, u, text, tlen))
      filled, mask2 = self._unroll(k_unroll, logits, text, mask, u, self.text_schedule)
      inputs2 = self._input(lay, codes, filled, txt_mask=mask2)
      out2 = self._forward(params, inputs2, seq.attention_mask(lay, tlen), lay, ("text",), k_d2)
      unroll = masked_loss(out2["text"], text, mask2, self.smoothing)["loss"]
    return self._result(main["loss"], unroll, mixsel, length=length, text=main)

  def _it2it_masks(self, key, image_valid, text_valid, image_rounding="ceil"):
    k_u, k_i, k_t = jax.random.split(key, 3)
    u = jax.random.uniform(k_u, image_valid.shape[:1], jnp.float32)
    img = masking.sample_mask(k_i, masking.mask_ratio(u, self.image_schedule), image_valid, image_rounding)
    txt = masking.sample_mask(k_t, masking.mask_ratio(u, self.text_schedule), text_valid)
    return img, txt

  def it2it_mixsel(self, tok_params, batch, key):
    """IT2IT MixSel: (inputs, attn, (codes, text) targets, (image, text) masks); masks only inside
    the selected half of the code grid and the selected caption's span."""
    lay = self.layouts[Task.IT2IT]
    text, tlen = batch["text"], batch["text_length"]
    k_codes, k_m = jax.random.split(key)
    mcodes, partner, vertical, pick_first = self._mixed_codes(tok_params, batch, k_codes)
    mtext, mlen, span1, span2 = join_captions(text, tlen, partner, self.sep_id, self.eos_id)
    region = half_region(self.n_img, vertical, pick_first)
    span = jnp.where(pick_first[:, None], span1, span2)
    mimg, mtxt = self._it2it_masks(k_m, region, span, image_rounding="floor")
    inputs = self._input(lay, mcodes, mtext, img_mask=mimg, txt_mask=mtxt,
                         bog=seq.selector_token(pick_first, vertical))
    return inputs, seq.attention_mask(lay, mlen), (mcodes, mtext), (mimg, mtxt)

  def _it2it(self, params, tok_params, batch, codes, key):
    lay = self.layouts[Task.IT2IT]
    text, tlen = batch["text"], batch["text_length"]
    b = codes.shape[0]
    k_m, k_mix, k_d, k_len = jax.random.split(key, 4)
    img_mask, txt_mask = self._it2it_masks(k_m, jnp.ones(codes.shape, bool),
                                           seq.text_valid(tlen, self.n_txt))
    inputs = self._input(lay, codes, text, img_mask=img_mask, txt_mask=txt_mask)
    attn = seq.attention_mask(lay, tlen)
    if self.use_mixsel:
      mix_in, mix_attn, (mcodes, mtext), (mimg, mtxt) = self.it2it_mixsel(tok_params, self._aux(batch), k_mix)
      inputs, attn = _concat(inputs, mix_in), _concat(attn, mix_attn)
    out = self._forward(params, inputs, attn, lay, ("image", "text"), k_d)
    image = masked_loss(out["image"][:b], codes, img_mask, self.smoothing)
    txt = masked_loss(out["text"][:b], text, txt_mask, self.smoothing)
    mixsel = 0.0
    if self.use_mixsel:
      mixsel = (masked_loss(out["image"][b:], mcodes, mimg, self.smoothing)["loss"]
                + masked_loss(out["text"][b:], mtext, mtxt, self.smoothing)["loss"])
    length = self._length_probe(params, *self._aux((codes, text, tlen)), k_len)
    return self._result(image["loss"] + txt["loss"], 0.0, mixsel, length=length, image=image, text=txt)

  # ---------------------------------------------------------------- entry point
  def loss_fn(self, params, tok_params, batch: Dict[str, Any], rng, task: Optional[Any] = None):  # pylint: disable=arguments-differ
    """(total loss, metrics dict of float32 scalars incl. 'task') for one batch.

    task: None (drawn from rng; all tasks in ONE lax.switch), a traced int (same switch), or a
    Python int / Task (only that branch is traced: one program per task).
    """
    self.trace_count += 1
    k_task, k_rest = jax.random.split(rng)
    static = isinstance(task, (int, np.integer))
    if task is None:
      task = draw_task(k_task, self.task_weights)
    codes = self.image_codes(tok_params, batch)
    batch = dict(batch, text=jnp.asarray(batch["text"], jnp.int32),
                 text_length=jnp.asarray(batch["text_length"], jnp.int32))
    branches = [lambda p, k, f=f: f(p, tok_params, batch, codes, k)
                for f in (self._t2i, self._i2t, self._it2it)]
    if static:
      metrics = branches[int(task)](params, k_rest)
    else:
      metrics = jax.lax.switch(jnp.asarray(task, jnp.int32), branches, params, k_rest)
    metrics["task"] = jnp.asarray(task, jnp.float32)
    return metrics["loss"], metrics
