"""KV-cache autoregressive decoding for the causal baselines (ARGVLT, L-Verse BiART).

One jitted loop per task over fixed-shape caches: the prefix (every slot before the generated
modality in sequence.py's layout) runs once (prefill), then one slot per `lax.fori_loop` step
against the cache (`VLTransformer(decode=True)`, the 'cache' collection). The attention mask of
step i is row `start + i` of the training mask (sequence.attention_mask & causal), so cached
decoding computes what a full causal pass would (`decode_uncached`, the reference, recomputes
the whole sequence every step; a test checks they give the same tokens for the same key).
  T2I      prefix [BOC, BOT, text, BOG, BOI]; n_img steps, raster order.
  inpaint  as T2I; slots outside `region` keep the given codes (context at its true positions,
           fed to the cache as they come, as the official AR sampler does).
  I2T      prefix [BOC, BOI, image, BOG, BOT]; n_txt steps; after EOS every slot is EOS.
Sampling: temperature <= 0 is greedy; else softmax(logits / T) over the exact top_k ids (0: all).
The last step also feeds its token (one extra slot pass of n) so every step has the same shape.
"""
import dataclasses

import jax
import jax.numpy as jnp

from magvlt_jax import sequence as seq
from magvlt_jax.decoding import DecodeOutput
from magvlt_jax.decoding_text import sample_top_k


@dataclasses.dataclass(frozen=True)
class ArSpec:
  """Static (hashable) description of one AR decoding call."""
  layout: seq.Layout
  generate: str  # "image" | "text"
  image_vocab_size: int
  eos_id: int
  temperature: float
  top_k: int = 0
  vocab_limit: int = 0  # text: ids >= vocab_limit (when > 0) are never drawn

  @property
  def start(self) -> int:
    return self.layout.image_start if self.generate == "image" else self.layout.text_start

  @property
  def length(self) -> int:
    return self.layout.n_img if self.generate == "image" else self.layout.n_txt


def make_spec(task: str, n_txt: int, n_img: int, image_vocab_size: int, eos_id: int,
              temperature: float, top_k: int = 0, vocab_limit: int = 0) -> ArSpec:
  if task not in ("t2i", "inpaint", "i2t"):
    raise ValueError(f"AR decoding task must be t2i, inpaint or i2t, got {task!r}")
  image = task != "i2t"
  layout = seq.make_layout(seq.Task.T2I if image else seq.Task.I2T, n_txt, n_img)
  return ArSpec(layout, "image" if image else "text", int(image_vocab_size), int(eos_id),
                float(temperature), int(top_k), 0 if image else int(vocab_limit))


def sample_next(key, logits, spec: ArSpec):
  """(token int32 [B], logp float32 [B]) from next-token logits [B, V]."""
  logits = jnp.asarray(logits, jnp.float32)
  if spec.temperature <= 0.0:
    if 0 < spec.vocab_limit < logits.shape[-1]:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < spec.vocab_limit, logits, -jnp.inf)
    tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tok[:, None], axis=-1)[:, 0]
    return tok, logp
  return sample_top_k(key, logits, spec.temperature, spec.top_k, spec.vocab_limit)


def _segments(model, spec, batch):
  """BiART [REF]/[GEN] ids [B, L] when the model has segment embeddings, else None."""
  return seq.segment_ids(spec.layout, batch) if model.num_segments else None


def _full_mask(spec: ArSpec, text_length):
  return seq.attention_mask(spec.layout, text_length) & seq.causal_mask(spec.layout.length)


def _slot_input(spec: ArSpec, tok, i):
  """ModelInput of one generated slot (modality-local index i) holding token `tok` [B]."""
  b = tok.shape[0]
  image = spec.generate == "image"
  ids = tok if image else tok + spec.image_vocab_size
  modality = seq.MODALITY_IMAGE if image else seq.MODALITY_TEXT
  return seq.ModelInput(ids=ids[:, None].astype(jnp.int32), is_special=jnp.zeros((b, 1), bool),
                        modality=jnp.full((b, 1), modality, jnp.int32),
                        local_pos=jnp.full((b, 1), i, jnp.int32))


def _inputs(spec, image_codes, text_ids, tokens):
  """Full-sequence ModelInput with `tokens` in the generated modality's slots."""
  if spec.generate == "image":
    image_codes = tokens
  else:
    text_ids = tokens
  return seq.build_input(spec.layout, image_codes, text_ids, image_vocab_size=spec.image_vocab_size)


def _choose(spec, key, logits, i, given, keep):
  """Sample slot i, or keep the given token where keep[:, i] (inpainting context)."""
  tok, logp = sample_next(key, logits, spec)
  if keep is not None:
    tok = jnp.where(keep[:, i], given[:, i], tok)
    logp = jnp.where(keep[:, i], 0.0, logp)
  return tok, logp


def _loop(spec, key, batch, step_fn, logits0, given=None, keep=None):
  """Shared fori_loop: sample slot i from the carried logits, then step_fn(i, tokens, tok)."""
  n = spec.length

  def body(i, carry):
    state, logits, tokens, logps, done, key = carry
    key, sub = jax.random.split(key)
    tok, logp = _choose(spec, sub, logits, i, given, keep)
    if spec.generate == "text":  # after EOS only EOS, scored 0
      tok = jnp.where(done, spec.eos_id, tok)
      logp = jnp.where(done, 0.0, logp)
      done = done | (tok == spec.eos_id)
    tokens = tokens.at[:, i].set(tok)
    logps = logps.at[:, i].set(logp)
    state, logits = step_fn(i, state, tokens, tok)
    return state, logits, tokens, logps, done, key

  tokens = jnp.zeros((batch, n), jnp.int32)
  init = (None, logits0, tokens, jnp.zeros((batch, n), jnp.float32), jnp.zeros((batch,), bool), key)
  return init, body


def _finish(spec, codes, text, tlen, tokens, logps):
  """DecodeOutput: the generated modality from `tokens`, the other the given context."""
  b = tokens.shape[0]
  if spec.generate == "image":
    return DecodeOutput(image_codes=tokens, text_ids=text, text_length=tlen.astype(jnp.int32),
                        image_score=jnp.exp(logps).mean(axis=-1), text_score=jnp.zeros((b,)))
  is_eos = tokens == spec.eos_id
  length = jnp.where(is_eos.any(-1), jnp.argmax(is_eos, axis=-1) + 1, spec.layout.n_txt)
  return DecodeOutput(image_codes=codes, text_ids=tokens, text_length=length.astype(jnp.int32),
                      image_score=jnp.zeros((b,)), text_score=logps.sum(axis=-1))


def _context(spec, image_codes, text_ids, text_length):
  b = (image_codes if image_codes is not None else text_ids).shape[0]
  lay = spec.layout
  if image_codes is None:
    image_codes = jnp.zeros((b, lay.n_img), jnp.int32)
  if text_ids is None:
    text_ids = jnp.full((b, lay.n_txt), spec.eos_id, jnp.int32)
  if text_length is None:  # I2T: every text column visible (the causal mask hides the future)
    text_length = jnp.full((b,), lay.n_txt, jnp.int32)
  return (b, jnp.asarray(image_codes, jnp.int32), jnp.asarray(text_ids, jnp.int32),
          jnp.asarray(text_length, jnp.int32))


def decode(model, params, spec: ArSpec, key, image_codes=None, text_ids=None, text_length=None,
           region=None) -> DecodeOutput:
  """KV-cache decoding of spec.generate given the other modality (region: inpaint, True =
  generate). `model` is the causal VLTransformer (training form); params its params."""
  b, codes, text, tlen = _context(spec, image_codes, text_ids, text_length)
  mask = _full_mask(spec, tlen)
  dec = model.clone(decode=True)
  out_name = (spec.generate,)
  start = spec.start
  prefix = jax.tree.map(lambda a: a[:, :start], _inputs(spec, codes, text, jnp.zeros((b, spec.length), jnp.int32)))
  segments = _segments(model, spec, b)
  seg_prefix = None if segments is None else segments[:, :start]
  seg_step = None if segments is None else segments[:, start:start + 1]  # GEN
  out, variables = dec.apply({"params": params}, prefix, mask[:, :, :start], layout=spec.layout,
                             outputs=out_name, mutable=["cache"], segment_ids=seg_prefix)

  def step_fn(i, cache, tokens, tok):
    del tokens
    row = jax.lax.dynamic_slice_in_dim(mask, start + i, 1, axis=2)
    o, v = dec.apply({"params": params, "cache": cache}, _slot_input(spec, tok, i), row,
                     layout=spec.layout, outputs=out_name, mutable=["cache"],
                     segment_ids=seg_step)
    return v["cache"], o[spec.generate][:, 0]

  keep = None if region is None else ~jnp.asarray(region, bool)
  init, body = _loop(spec, key, b, step_fn, out[spec.generate][:, 0], codes, keep)
  init = (variables["cache"],) + init[1:]
  _, _, tokens, logps, _, _ = jax.lax.fori_loop(0, spec.length, body, init)
  return _finish(spec, codes, text, tlen, tokens, logps)


def decode_uncached(model, params, spec: ArSpec, key, image_codes=None, text_ids=None,
                    text_length=None, region=None) -> DecodeOutput:
  """Reference for `decode`: the same loop, recomputing the full causal pass every step."""
  b, codes, text, tlen = _context(spec, image_codes, text_ids, text_length)
  attn = seq.attention_mask(spec.layout, tlen)
  segments = _segments(model, spec, b)

  def next_logits(tokens, i):
    out = model.apply({"params": params}, _inputs(spec, codes, text, tokens), attn,
                      layout=spec.layout, outputs=(spec.generate,), predict_next=True,
                      segment_ids=segments)
    return jax.lax.dynamic_index_in_dim(out[spec.generate], i, axis=1, keepdims=False)

  def step_fn(i, state, tokens, tok):
    del tok
    return state, next_logits(tokens, jnp.minimum(i + 1, spec.length - 1))

  keep = None if region is None else ~jnp.asarray(region, bool)
  logits0 = next_logits(jnp.zeros((b, spec.length), jnp.int32), 0)
  init, body = _loop(spec, key, b, step_fn, logits0, codes, keep)
  init = (jnp.zeros(()),) + init[1:]
  _, _, tokens, logps, _, _ = jax.lax.fori_loop(0, spec.length, body, init)
  return _finish(spec, codes, text, tlen, tokens, logps)


def loglik(model, params, spec: ArSpec, image_codes, text_ids, text_length):
  """float32 [B]: exact mean next-token log-likelihood of the generated modality given the
  other (image: all n_img codes; text: the first text_length tokens incl. EOS)."""
  codes, text = jnp.asarray(image_codes, jnp.int32), jnp.asarray(text_ids, jnp.int32)
  attn = seq.attention_mask(spec.layout, text_length)
  inputs = seq.build_input(spec.layout, codes, text, image_vocab_size=spec.image_vocab_size)
  logits = model.apply({"params": params}, inputs, attn, layout=spec.layout,
                       outputs=(spec.generate,), predict_next=True,
                       segment_ids=_segments(model, spec, codes.shape[0]))[spec.generate]
  target = codes if spec.generate == "image" else text
  logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32), -1),
                             target[..., None], axis=-1)[..., 0]
  valid = (jnp.ones(target.shape, bool) if spec.generate == "image"
           else seq.text_valid(text_length, spec.layout.n_txt))
  return jnp.where(valid, logp, 0.0).sum(-1) / jnp.maximum(valid.sum(-1), 1)
