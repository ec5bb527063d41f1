"""Masked iterative decoding for every MAGVLT task: ONE `lax.fori_loop` (SPEC section 5).

The loop is parameterised by which image / text slots are generated (regions) and which are
context, so T2I, I2T, image inpainting, text infilling and unconditional image+text generation
are the same code. The model enters only as a closure

    logits_fn(inputs: sequence.ModelInput, attn_mask, *, layout, outputs) -> dict

returning float32 'image' [B, n_img, V_img], 'text' [B, n_txt, V_txt] and 'length' [B, C]
logits (see sampler.model_logits_fn), so this module knows nothing about Flax. The task functions
below are not jitted themselves: call them inside a `jax.jit` whose arguments are the params and
arrays (sampler.Sampler does; params are then traced, not baked into the program). Shapes are
fixed, so one (task, batch, steps) compiles once.

Classifier-free guidance (spec.guidance 'text' for T2I / inpainting, 'image' for I2T / infill):
the unconditional pass replaces every context slot of that modality by its MASK token (same
layout and text length) and runs batched with the conditional pass; the guided logits are
    logits = cond + s * (cond - uncond) = (1 + s) * cond - s * uncond,
so s = 0 is exactly the unguided sampler (Sampler skips the unconditional pass when s == 0).
The length head always reads the conditional pass.

config.decoding.order picks the reveal order of both modalities (decoding_image.py,
decoding_text.py). Choices of ours where the official code is silent or batch-1 only: every
example counts its own schedule (official reads example 0); inpainting/infilling counts are
relative to the region; infilling keeps the given caption length and never samples EOS inside
the span; unconditional generation re-predicts the caption length after every step but the last.
All sampling maths is float32 whatever the model's compute dtype.
"""
import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax import decoding_image, decoding_text, sequence

LENGTH_MODES = ("fixed", "predict", "predict_each_step")
GUIDANCE = ("", "text", "image")


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
  """Static description of one decoding loop (hashable: a jit static argument)."""
  layout: sequence.Layout
  num_steps: int
  image_vocab_size: int
  eos_id: int
  generate_image: bool = False
  generate_text: bool = False
  order: str = "maskgit"
  image_temperature: tuple = (1.4, 0.6)
  gumbel_scale: tuple = (2.0, 0.2)
  text_temperature: float = 0.1
  text_top_k: int = 32
  text_vocab_limit: int = 0  # > 0: never sample text ids >= this (tokenizer vocab)
  ban_eos: bool = False  # infilling keeps the caption length: no EOS inside the span
  length_mode: str = "fixed"  # fixed | predict (BOT head once) | predict_each_step
  # Text slots the length probe pass shows (masked) to the image rows: 0 = all n_txt, as our
  # trainer's length loss; 16 = the official sampler (its dummy txt_mask of 16 ones).
  length_probe_slots: int = 0
  guidance: str = ""  # "" off | "text" null the text context | "image" null the image context
  record_history: bool = False  # keep per-step codes / masks in the output (tests, debugging)

  def __post_init__(self):
    decoding_image.check_order(self.order)
    if self.length_mode not in LENGTH_MODES:
      raise ValueError(f"DecodeSpec.length_mode={self.length_mode!r}: expected one of {LENGTH_MODES}")
    if self.guidance not in GUIDANCE:
      raise ValueError(f"DecodeSpec.guidance={self.guidance!r}: expected one of {GUIDANCE}")
    if self.num_steps < 1:
      raise ValueError(f"DecodeSpec.num_steps must be >= 1, got {self.num_steps}")
    if not 0 <= self.length_probe_slots <= self.layout.n_txt:
      raise ValueError(f"DecodeSpec.length_probe_slots={self.length_probe_slots}: expected 0 "
                       f"(all) to n_txt={self.layout.n_txt}")


@flax.struct.dataclass
class DecodeState:
  image_codes: jnp.ndarray  # int32 [B, n_img]
  image_masked: jnp.ndarray  # bool [B, n_img]
  image_logp: jnp.ndarray  # float32 [B, n_img]: confidence when each token was chosen
  text_ids: jnp.ndarray  # int32 [B, n_txt]
  text_masked: jnp.ndarray  # bool [B, n_txt]: slots masked in the last forward pass
  text_logp: jnp.ndarray  # float32 [B, n_txt]: official logp_prev
  text_length: jnp.ndarray  # int32 [B]
  history: Any = None  # dict of [T, B, ...] arrays when spec.record_history


@flax.struct.dataclass
class DecodeOutput:
  image_codes: jnp.ndarray  # int32 [B, n_img]
  text_ids: jnp.ndarray  # int32 [B, n_txt], EOS from text_length on
  text_length: jnp.ndarray  # int32 [B]
  image_score: jnp.ndarray  # float32 [B]: mean confidence of the generated image slots
  text_score: jnp.ndarray  # float32 [B]: sum of logp_prev over the generated text slots
  history: Any = None


LogitsFn = Callable[..., dict]


def spec_from_config(config, task: str, *, num_steps=None, guidance=False, vocab_limit=0,
                     eos_id=None, record_history=False, text_temperature=None) -> DecodeSpec:
  """DecodeSpec of `task` in {'t2i', 'inpaint', 'i2t', 'infill', 'uncond'} from config.decoding."""
  d = config.decoding
  n_txt, n_img = int(config.sequence.text_length), int(config.sequence.image_tokens)
  if eos_id is None:
    raise ValueError("spec_from_config: eos_id is required (TextTokenizer.eos_id)")
  image_task = task in ("t2i", "inpaint")
  text_task = task in ("i2t", "infill")
  if not (image_task or text_task or task == "uncond"):
    raise ValueError(f"unknown decoding task {task!r}; expected t2i, inpaint, i2t, infill, uncond")
  layout = sequence.make_layout(sequence.Task.T2I if image_task else sequence.Task.I2T, n_txt, n_img)
  if num_steps is None:
    num_steps = {"t2i": d.t2i_steps, "inpaint": d.t2i_steps, "i2t": d.i2t_steps,
                 "infill": d.i2t_steps}.get(task, d.get("uncond_steps", max(d.t2i_steps, d.i2t_steps)))
  if guidance and task == "uncond":
    raise ValueError("classifier-free guidance needs a context: not available for task 'uncond'")
  return DecodeSpec(
      layout=layout, num_steps=int(num_steps), image_vocab_size=int(config.sequence.image_vocab_size),
      eos_id=int(eos_id), generate_image=task in ("t2i", "inpaint", "uncond"),
      generate_text=task in ("i2t", "infill", "uncond"), order=d.order,
      image_temperature=tuple(float(t) for t in d.image_temperature),
      gumbel_scale=tuple(float(g) for g in d.gumbel_scale),
      text_temperature=float(d.text_temperature if text_temperature is None else text_temperature),
      text_top_k=int(d.text_top_k), text_vocab_limit=int(vocab_limit),
      length_mode={"i2t": "predict", "uncond": "predict_each_step"}.get(task, "fixed"),
      ban_eos=task == "infill",
      length_probe_slots=int(d.get("length_probe_text_length", 0)),
      guidance=("text" if image_task else "image") if guidance else "",
      record_history=record_history)


def _forward(spec, logits_fn, state, text_masked, outputs, scale):
  """Model logits for the current state (guided when spec.guidance), float32."""
  layout = spec.layout
  inputs = sequence.build_input(layout, state.image_codes, state.text_ids, state.image_masked,
                                text_masked, image_vocab_size=spec.image_vocab_size)
  attn = sequence.attention_mask(layout, state.text_length)
  if not spec.guidance:
    out = logits_fn(inputs, attn, layout=layout, outputs=outputs)
    return {k: jnp.asarray(v, jnp.float32) for k, v in out.items()}
  null_img = state.image_masked | (spec.guidance == "image")
  null_txt = text_masked | (spec.guidance == "text")
  null = sequence.build_input(layout, state.image_codes, state.text_ids, null_img, null_txt,
                              image_vocab_size=spec.image_vocab_size)
  pair = jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), inputs, null)
  out = logits_fn(pair, jnp.concatenate([attn, attn], axis=0), layout=layout, outputs=outputs)
  batch = state.image_codes.shape[0]
  guided = {}
  for name, value in out.items():
    cond, uncond = jnp.asarray(value[:batch], jnp.float32), jnp.asarray(value[batch:], jnp.float32)
    guided[name] = cond if name == "length" else (1.0 + scale) * cond - scale * uncond
  return guided


def _predict_length(length_logits, n_txt):
  return jnp.clip(jnp.argmax(length_logits, axis=-1) + 1, min=1, max=n_txt).astype(jnp.int32)


def _record(history, step, state):
  if history is None:
    return None
  now = {"image_codes": state.image_codes, "image_masked": state.image_masked,
         "text_ids": state.text_ids, "text_masked": state.text_masked,
         "text_length": state.text_length}
  return {k: history[k].at[step].set(now[k]) for k in history}


def _step(step, state, *, spec, logits_fn, key, image_region, text_region, scale):
  k_img, k_txt, k_mask = jax.random.split(jax.random.fold_in(key, step), 3)
  n_txt = spec.layout.n_txt
  text_masked = state.text_masked
  if spec.generate_text:
    valid = text_region & sequence.text_valid(state.text_length, n_txt)
    text_masked = decoding_text.remask(k_mask, state.text_logp, valid, step, spec.num_steps,
                                       spec.order)
  outputs = (("image",) if spec.generate_image else ()) + (("text",) if spec.generate_text else ())
  if spec.length_mode == "predict_each_step":
    outputs += ("length",)
  logits = _forward(spec, logits_fn, state, text_masked, outputs, scale)
  new = state.replace(text_masked=text_masked)
  if spec.generate_image:
    order = spec.order
    keep = decoding_image.keep_table(spec.num_steps, spec.layout.n_img,
                                     decoding_image.schedule_for_order(order))
    codes, masked, conf = decoding_image.image_step(
        k_img, logits["image"], state.image_codes, state.image_masked, image_region,
        state.image_logp, step, order=order, keep=keep,
        temperatures=decoding_image.linear_schedule(spec.image_temperature, spec.num_steps),
        gumbel_scales=decoding_image.linear_schedule(spec.gumbel_scale, spec.num_steps))
    new = new.replace(image_codes=codes, image_masked=masked, image_logp=conf)
  if spec.generate_text:
    ids, logp = decoding_text.text_step(
        k_txt, logits["text"], state.text_ids, state.text_logp, text_masked,
        temperature=spec.text_temperature, top_k=spec.text_top_k, vocab_limit=spec.text_vocab_limit,
        banned=spec.eos_id if spec.ban_eos else -1)
    length = state.text_length
    if spec.length_mode == "predict_each_step":
      # The new length takes effect next step; the last step keeps it so every slot is sampled.
      length = jnp.where(step < spec.num_steps - 1, _predict_length(logits["length"], n_txt),
                         length)
      ids, logp = decoding_text.apply_length(ids, logp, text_region, state.text_length, length,
                                             spec.eos_id)
    new = new.replace(text_ids=ids, text_logp=logp, text_length=length)
  return new.replace(history=_record(state.history, step, new))


def decode(logits_fn: LogitsFn, spec: DecodeSpec, key, *, image_codes, image_region, text_ids,
           text_region, text_length, guidance_scale=0.0) -> DecodeOutput:
  """Runs spec.num_steps refinement steps; generated slots start masked, context stays fixed.

  image_codes int [B, n_img] / text_ids int [B, n_txt]: initial tokens (context where the region
  is False); image_region / text_region bool: slots to generate; text_length int [B]: caption
  length incl. EOS (ignored and predicted when spec.length_mode == 'predict').
  """
  layout = spec.layout
  image_codes = jnp.asarray(image_codes, jnp.int32)
  text_ids = jnp.asarray(text_ids, jnp.int32)
  image_region = jnp.asarray(image_region, bool) & spec.generate_image
  text_region = jnp.asarray(text_region, bool) & spec.generate_text
  text_length = jnp.asarray(text_length, jnp.int32)
  batch = image_codes.shape[0]
  state = DecodeState(
      image_codes=image_codes, image_masked=image_region,
      image_logp=jnp.zeros(image_codes.shape, jnp.float32), text_ids=text_ids,
      text_masked=jnp.zeros(text_ids.shape, bool),
      text_logp=jnp.where(text_region, decoding_text.UNKNOWN_LOGP, 0.0).astype(jnp.float32),
      text_length=text_length)
  scale = jnp.asarray(guidance_scale, jnp.float32)
  if spec.length_mode == "predict":
    # BOT cannot see the text, so one pass with the text fully masked gives the length. The
    # image rows see the first length_probe_slots masked text slots (all by default).
    shown = spec.length_probe_slots or layout.n_txt
    probe = state.replace(text_length=jnp.full((batch,), shown, jnp.int32))
    out = _forward(spec, logits_fn, probe, jnp.ones(text_ids.shape, bool), ("length",), scale)
    length = _predict_length(out["length"], layout.n_txt)
    state = state.replace(text_length=length,
                          text_ids=jnp.where(sequence.text_valid(length, layout.n_txt), text_ids,
                                             spec.eos_id))
  if spec.record_history:
    t = spec.num_steps
    state = state.replace(history={
        "image_codes": jnp.zeros((t,) + image_codes.shape, jnp.int32),
        "image_masked": jnp.zeros((t,) + image_codes.shape, bool),
        "text_ids": jnp.zeros((t,) + text_ids.shape, jnp.int32),
        "text_masked": jnp.zeros((t,) + text_ids.shape, bool),
        "text_length": jnp.zeros((t, batch), jnp.int32)})
  body = lambda s, st: _step(s, st, spec=spec, logits_fn=logits_fn, key=key,
                             image_region=image_region, text_region=text_region, scale=scale)
  state = jax.lax.fori_loop(0, spec.num_steps, body, state)
  return _finish(spec, state, image_region, text_region)


def _finish(spec, state, image_region, text_region):
  valid = sequence.text_valid(state.text_length, spec.layout.n_txt)
  text_ids = jnp.where(valid, state.text_ids, spec.eos_id)
  n_img = jnp.maximum(image_region.sum(axis=-1), 1)
  image_score = jnp.where(image_region, state.image_logp, 0.0).sum(axis=-1) / n_img
  text_score = jnp.where(text_region & valid, state.text_logp, 0.0).sum(axis=-1)
  return DecodeOutput(image_codes=state.image_codes, text_ids=text_ids,
                      text_length=state.text_length, image_score=image_score,
                      text_score=text_score, history=state.history)


# ----------------------------------------------------------------------------- tasks
def centre_region(n_img: int, size: int = 0) -> np.ndarray:
  """bool [n_img]: the centre size x size square of the code grid; size 0 = half the grid side
  (8x8 of 16x16, the paper's inpainting region; 4x4 of 8x8)."""
  side = int(round(np.sqrt(n_img)))
  if side * side != n_img:
    raise ValueError(f"centre_region: {n_img} image tokens do not form a square grid")
  size = size or max(side // 2, 1)
  if not 1 <= size <= side:
    raise ValueError(f"centre_region: size {size} must be in [1, {side}] for a {side}x{side} grid")
  start = (side - size) // 2
  grid = np.zeros((side, side), bool)
  grid[start:start + size, start:start + size] = True
  return grid.reshape(-1)


def middle_span(text_length, n_txt: int):
  """bool [B, n_txt]: the middle half of each caption's words-before-EOS (official IT2T)."""
  n_words = jnp.maximum(jnp.asarray(text_length, jnp.int32) - 1, 1)
  span_len = jnp.maximum(n_words // 2, 1)
  start = n_words // 2 - span_len // 2
  pos = jnp.arange(n_txt)[None, :]
  return (pos >= start[:, None]) & (pos < (start + span_len)[:, None])


def text_to_image(logits_fn, spec, key, text_ids, text_length, guidance_scale=0.0):
  """T2I: all image slots start masked; the caption is context."""
  text_ids = jnp.asarray(text_ids, jnp.int32)
  batch = text_ids.shape[0]
  n_img = spec.layout.n_img
  return decode(logits_fn, spec, key, image_codes=jnp.zeros((batch, n_img), jnp.int32),
                image_region=jnp.ones((batch, n_img), bool), text_ids=text_ids,
                text_region=jnp.zeros(text_ids.shape, bool), text_length=text_length,
                guidance_scale=guidance_scale)


def inpaint(logits_fn, spec, key, image_codes, region, text_ids, text_length, guidance_scale=0.0):
  """Regenerates image slots where region [B, n_img] is True; the rest keep their codes."""
  text_ids = jnp.asarray(text_ids, jnp.int32)
  region = jnp.broadcast_to(jnp.asarray(region, bool), jnp.shape(image_codes))
  return decode(logits_fn, spec, key, image_codes=image_codes, image_region=region,
                text_ids=text_ids, text_region=jnp.zeros(text_ids.shape, bool),
                text_length=text_length, guidance_scale=guidance_scale)


def image_to_text(logits_fn, spec, key, image_codes, guidance_scale=0.0):
  """I2T: length N from the BOT head, then the first N text slots are refined; rest EOS."""
  image_codes = jnp.asarray(image_codes, jnp.int32)
  shape = (image_codes.shape[0], spec.layout.n_txt)
  return decode(logits_fn, spec, key, image_codes=image_codes,
                image_region=jnp.zeros(image_codes.shape, bool),
                text_ids=jnp.full(shape, spec.eos_id, jnp.int32), text_region=jnp.ones(shape, bool),
                text_length=jnp.full(shape[:1], spec.layout.n_txt, jnp.int32),
                guidance_scale=guidance_scale)


def infill(logits_fn, spec, key, image_codes, text_ids, text_length, span=None, guidance_scale=0.0):
  """Text infilling: regenerates the span [B, n_txt] (default: middle_span) given the image and
  the rest of the caption. The caption length is kept (ours; official re-predicts it from BOT)."""
  text_ids = jnp.asarray(text_ids, jnp.int32)
  if span is None:
    span = middle_span(text_length, spec.layout.n_txt)
  span = jnp.broadcast_to(jnp.asarray(span, bool), text_ids.shape)
  return decode(logits_fn, spec, key, image_codes=image_codes,
                image_region=jnp.zeros(jnp.shape(image_codes), bool), text_ids=text_ids,
                text_region=span, text_length=text_length, guidance_scale=guidance_scale)


def generate(logits_fn, spec, key, batch: int, length_range=(8, 16)):
  """Unconditional image + caption: both start masked; the caption length starts uniform in
  length_range (config.decoding.uncond_text_length) and is re-predicted from BOT every step."""
  layout = spec.layout
  k_len, k_dec = jax.random.split(key)
  lo, hi = (int(v) for v in length_range)
  lo, hi = min(max(lo, 1), layout.n_txt), min(max(hi, 1), layout.n_txt)
  length = jax.random.randint(k_len, (batch,), lo, hi + 1, jnp.int32)
  shape_i, shape_t = (batch, layout.n_img), (batch, layout.n_txt)
  return decode(logits_fn, spec, k_dec, image_codes=jnp.zeros(shape_i, jnp.int32),
                image_region=jnp.ones(shape_i, bool),
                text_ids=jnp.full(shape_t, spec.eos_id, jnp.int32),
                text_region=jnp.ones(shape_t, bool), text_length=length)
