"""Decoders behind one interface, chosen by `config.decoding.kind` (default "masked"): the
Sampler, the trainer's periodic samples and evaluation generate through this and never branch on
the system.

    dec = decoders.create(config, model, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
    key, fn = dec.task_fn("t2i", guidance=False)   # fn(params, rng, scale, *arrays) -> DecodeOutput
    key, fn = dec.loglik_fn("image")               # fn(params, codes, text, length) -> float32 [B]

`fn` is a pure function to be jitted by the caller (params are traced, not baked in); `key` is a
hashable description of everything it depends on besides the params and arrays, for caching the
compiled program. The arrays per task (all batch-major) are:
    t2i      text_ids [B, n_txt], text_length [B]
    inpaint  image_codes [B, n_img], region bool [B, n_img], text_ids, text_length
    i2t      image_codes [B, n_img]
    infill   image_codes, text_ids, text_length, span bool [B, n_txt]
    uncond   a [B, 1] placeholder whose batch size is the number of samples
A new decoder is a class here (or in its own module) with the same two methods and a line in
`_KINDS`; `TASKS` lists what it supports (others raise a clear error).
"""
import importlib

from magvlt_jax import decoding, decoding_ar, rerank, sequence

DEFAULT = "masked"
_KINDS = {
    "masked": "magvlt_jax.decoders:MaskedDecoder",
    "ar": "magvlt_jax.decoders:ArDecoder",
}


def model_logits_fn(model, params):
  """decoding's logits_fn for a VLTransformer and its params (deterministic: no dropout)."""
  def logits_fn(inputs, attn_mask, *, layout, outputs):
    return model.apply({"params": params}, inputs, attn_mask, layout=layout, deterministic=True,
                       outputs=tuple(outputs))
  return logits_fn


class MaskedDecoder:
  """Masked iterative decoding (decoding.py): one jitted lax.fori_loop for every task."""
  kind = "masked"
  TASKS = ("t2i", "inpaint", "i2t", "infill", "uncond")
  _TASK_FNS = {"t2i": decoding.text_to_image, "inpaint": decoding.inpaint,
               "i2t": decoding.image_to_text, "infill": decoding.infill}

  def __init__(self, config, model, *, eos_id: int, vocab_limit: int = 0):
    self.config, self.model = config, model
    self.eos_id, self.vocab_limit = int(eos_id), int(vocab_limit)

  def _logits_fn(self, params):
    return model_logits_fn(self.model, params)

  def task_fn(self, task: str, *, guidance: bool = False, text_temperature=None):
    check_task(self, task)
    spec = decoding.spec_from_config(self.config, task, guidance=guidance, eos_id=self.eos_id,
                                     vocab_limit=self.vocab_limit,
                                     text_temperature=text_temperature)
    if task == "uncond":
      length_range = tuple(int(v) for v in self.config.decoding.uncond_text_length)

      def run_uncond(params, key, scale, placeholder):
        del scale
        out = decoding.generate(self._logits_fn(params), spec, key, placeholder.shape[0],
                                length_range)
        return out.replace(history=None)
      return (self.kind, task, spec, length_range), run_uncond
    task_fn = self._TASK_FNS[task]

    def run(params, key, scale, *arrays):
      out = task_fn(self._logits_fn(params), spec, key, *arrays, guidance_scale=scale)
      return out.replace(history=None)
    return (self.kind, task, spec), run

  def loglik_fn(self, modality: str):
    """Pseudo-log-likelihood of an image (given its caption) or a caption (given its image)."""
    if modality not in ("image", "text"):
      raise ValueError(f"loglik_fn: modality must be 'image' or 'text', got {modality!r}")
    cfg = self.config
    task = sequence.Task.T2I if modality == "image" else sequence.Task.I2T
    layout = sequence.layout_from_config(cfg, task)
    img_vocab = int(cfg.sequence.image_vocab_size)
    passes = int(cfg.decoding.get("rerank_passes", 4))
    score = rerank.image_loglik if modality == "image" else rerank.text_loglik

    def run(params, codes, text_ids, text_length):
      return score(self._logits_fn(params), layout, img_vocab, codes, text_ids, text_length,
                   num_passes=passes)
    return (self.kind, "loglik", modality, passes), run


class ArDecoder:
  """KV-cache autoregressive decoding (decoding_ar.py) for causal models (ARGVLT, BiART);
  settings in config.decoding.ar (image/text temperature and top_k; temperature 0 is greedy)."""
  kind = "ar"
  TASKS = ("t2i", "inpaint", "i2t")

  def __init__(self, config, model, *, eos_id: int, vocab_limit: int = 0):
    if not model.causal:
      raise ValueError("config.decoding.kind='ar' needs a causal model: set config.model.causal=True")
    self.config, self.model = config, model
    self.eos_id, self.vocab_limit = int(eos_id), int(vocab_limit)

  def spec(self, task: str, text_temperature=None):
    check_task(self, task)
    s, ar = self.config.sequence, self.config.decoding.ar
    image = task != "i2t"
    temperature = ar.image_temperature if image else (
        ar.text_temperature if text_temperature is None else text_temperature)
    return decoding_ar.make_spec(task, int(s.text_length), int(s.image_tokens),
                                 int(s.image_vocab_size), self.eos_id, float(temperature),
                                 int(ar.image_top_k if image else ar.text_top_k), self.vocab_limit)

  def task_fn(self, task: str, *, guidance: bool = False, text_temperature=None):
    if guidance:
      raise ValueError("the 'ar' decoder has no classifier-free guidance; set "
                       "config.decoding.guidance_scale=0")
    spec = self.spec(task, text_temperature)
    model = self.model

    def run(params, key, scale, *arrays):
      del scale
      if task == "t2i":
        text_ids, text_length = arrays
        return decoding_ar.decode(model, params, spec, key, text_ids=text_ids, text_length=text_length)
      if task == "inpaint":
        codes, region, text_ids, text_length = arrays
        return decoding_ar.decode(model, params, spec, key, codes, text_ids, text_length, region)
      (codes,) = arrays
      return decoding_ar.decode(model, params, spec, key, image_codes=codes)
    return (self.kind, task, spec), run

  def loglik_fn(self, modality: str):
    """Exact AR log-likelihood (mean per token) of an image given its caption, or the reverse."""
    if modality not in ("image", "text"):
      raise ValueError(f"loglik_fn: modality must be 'image' or 'text', got {modality!r}")
    spec = self.spec("t2i" if modality == "image" else "i2t")
    model = self.model

    def run(params, codes, text_ids, text_length):
      return decoding_ar.loglik(model, params, spec, codes, text_ids, text_length)
    return (self.kind, "loglik", modality), run


def check_task(decoder, task: str):
  if task not in decoder.TASKS:
    raise ValueError(f"the {decoder.kind!r} decoder (config.decoding.kind) does not support "
                     f"task {task!r}; it supports {list(decoder.TASKS)}")


def kind_of(config) -> str:
  kind = config.decoding.get("kind", DEFAULT)
  if kind not in _KINDS:
    raise ValueError(f"config.decoding.kind={kind!r} is not a known decoder; use one of "
                     f"{sorted(_KINDS)}")
  return kind


def create(config, model, *, eos_id: int, vocab_limit: int = 0):
  module, _, cls = _KINDS[kind_of(config)].partition(":")
  return getattr(importlib.import_module(module), cls)(config, model, eos_id=eos_id,
                                                       vocab_limit=vocab_limit)
