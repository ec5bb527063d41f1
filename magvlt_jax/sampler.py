"""The Colab-facing sampling API (SPEC section 5): text -> image, image -> text, inpainting,
infilling and unconditional generation from a trained checkpoint, with reranking.

    sampler = Sampler.from_checkpoint("/tmp/magvlt_tiny")       # or Sampler(config, params, ...)
    images = sampler.text_to_image(["a red circle on a blue square"], n=4)   # list of PIL
    captions = sampler.image_to_text(images)                    # list of str

Every decoding loop is one jitted function per (task, guidance, order, ...) spec; jax caches the
compiled program per batch shape, and rows are processed in power-of-two chunks up to max_batch,
so repeated calls never retrace (`trace_counts` counts traces). No TensorFlow on this path.
"""
import collections
import json
import os
import warnings

import jax
import numpy as np
from PIL import Image

from magvlt_jax import decoders, image_tokenizers, rerank, sampler_tasks
from magvlt_jax import text as text_lib
from magvlt_jax.models import transformer


# Module-wide cache of jitted functions and how often each kind was traced (compiled).
_JITTED = {}
TRACE_COUNTS = collections.Counter()


model_logits_fn = decoders.model_logits_fn


def prepare_image(image, size: int) -> np.ndarray:
  """PIL image or uint8/float array [H, W, C] -> uint8 [size, size, 3] RGB: resize the short side
  to `size` (bicubic), then centre-crop (official Resize + CenterCrop)."""
  if not isinstance(image, Image.Image):
    arr = np.asarray(image)
    if arr.ndim == 2:
      arr = np.stack([arr] * 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
      raise ValueError(f"image: expected [H, W, 3] (or PIL), got array of shape {arr.shape}")
    if arr.dtype != np.uint8:
      if np.issubdtype(arr.dtype, np.floating) and arr.max() <= 1.0:
        arr = arr * 255.0
      arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.shape == (size, size, 3):
      return arr
    image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
  image = image.convert("RGB")
  w, h = image.size
  scale = size / min(w, h)
  nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
  if (nw, nh) != (w, h):
    image = image.resize((nw, nh), Image.BICUBIC)
  left, top = (nw - size) // 2, (nh - size) // 2
  return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


_TORCH_SUFFIXES = (".ckpt", ".pth", ".pt")


def _converted_workdir(ckpt_path: str, config) -> str:
  """CKPT.magvlt_jax/ next to an official MAGVLT .ckpt: converted on first use, reused after."""
  out = ckpt_path + ".magvlt_jax"
  if not os.path.exists(os.path.join(out, "config.json")):
    from magvlt_jax.convert import magvlt_official  # pylint: disable=import-outside-toplevel
    magvlt_official.convert_file(ckpt_path, out, config)
  return out


def _chunk_size(n: int, max_batch: int) -> int:
  return min(max_batch, 1 << max(n - 1, 0).bit_length())


class Sampler:
  """Sampling from MAGVLT params; see the module docstring."""

  def __init__(self, config, params, tokenizer_params, text_tokenizer, *, max_batch=None):
    self.config = config
    self.params = params
    self.tokenizer_params = tokenizer_params
    self.tokenizer = text_tokenizer
    self.image_tokenizer = image_tokenizers.get(config)
    self.model = transformer.from_config(config)
    self.decoder = decoders.create(config, self.model, eos_id=text_tokenizer.eos_id,
                                   vocab_limit=text_tokenizer.vocab_size)
    self.n_txt = int(config.sequence.text_length)
    self.n_img = int(config.sequence.image_tokens)
    self.image_size = self.image_tokenizer.image_size
    if self.image_tokenizer.num_tokens != self.n_img:
      raise ValueError(f"config.sequence.image_tokens={self.n_img} does not match the "
                       f"{self.image_tokenizer.kind} grid {self.image_tokenizer.grid} of "
                       f"config.{self.image_tokenizer.kind}")
    d = config.decoding
    self.max_batch = int(max_batch or max(config.sample.batch_size, d.num_image_candidates,
                                          d.num_text_candidates))
    self.reranker = rerank.resolve(config)
    self.trace_counts = TRACE_COUNTS
    # Everything the compiled programs depend on besides their static specs.
    sections = ("model", "sequence", self.image_tokenizer.kind)
    self._config_key = json.dumps({k: config[k].to_dict() for k in sections},
                                  sort_keys=True, default=str)

  # ------------------------------------------------------------------ construction
  @classmethod
  def from_checkpoint(cls, workdir_or_path: str, config=None, step=None, **kwargs) -> "Sampler":
    """Loads WORKDIR/config.json (unless `config`), the transformer params (latest step, or
    `step` / config.sample.checkpoint_step; a released official MAGVLT .ckpt is converted into
    CKPT.magvlt_jax/ first, see convert/magvlt_official.py),
    the image tokenizer (config.<kind>.checkpoint or
    WORKDIR/tokenizer) and the text tokenizer of config.text.kind (text.load_tokenizer)."""
    from magvlt_jax import checkpoints  # orbax only when loading
    path = os.path.abspath(workdir_or_path)
    if os.path.isfile(path) and path.endswith(_TORCH_SUFFIXES):
      path = _converted_workdir(path, config)  # a released official MAGVLT checkpoint
    workdir = path
    if not os.path.exists(os.path.join(path, "config.json")) and os.path.exists(
        os.path.join(os.path.dirname(path), "config.json")):
      workdir = os.path.dirname(path)  # given WORKDIR/checkpoints
    if config is None:
      config = checkpoints.load_config(workdir)
    if step is None:
      step = int(config.sample.get("checkpoint_step", -1))
    params = checkpoints.load_params(path, step=step, abstract=transformer.param_shapes(config))
    image_tok = image_tokenizers.get(config)
    tok_params = image_tok.load_params(image_tok.cfg.get("checkpoint", "") or workdir)
    tok = text_lib.load_tokenizer(config, workdir)
    return cls(config, params, tok_params, tok, **kwargs)

  # ------------------------------------------------------------------ jitted pieces
  def _jit(self, key, fn):
    """jax.jit(fn) cached under `key` (module-wide: a new Sampler of the same config reuses
    compiled programs); traced on first call per shape."""
    name = key[1]  # keys are (kind, name, ...)
    key = (key, self._config_key)
    if key not in _JITTED:

      def counted(*args):
        TRACE_COUNTS[name] += 1  # runs only while tracing
        return fn(*args)
      _JITTED[key] = jax.jit(counted)
    return _JITTED[key]

  def _decoder(self, task, guidance: bool = False, text_temperature=None):
    """Jitted fn(params, rng, scale, *arrays) -> DecodeOutput of the config's decoder."""
    return self._jit(*self.decoder.task_fn(task, guidance=guidance,
                                           text_temperature=text_temperature))

  def _fn(self, name):
    """Jitted image-tokenizer and likelihood-reranking helpers."""
    tok = self.image_tokenizer
    if name == "encode":
      return self._jit(("tokenizer", "encode"), tok.encode)
    if name == "decode_pixels":
      return self._jit(("tokenizer", "decode"), tok.decode)
    if name in ("image_loglik", "text_loglik"):
      return self._jit(*self.decoder.loglik_fn(name.split("_")[0]))
    raise KeyError(name)

  def _chunked(self, fn, arrays, key=None):
    """Runs fn(*chunk) (fn(key_i, *chunk) with a key) over row chunks of power-of-two size,
    padding the last chunk by repeating its last row; returns numpy outputs of all rows.
    Every chunk is dispatched before any result is read (one host sync per call, not per chunk)."""
    n = len(arrays[0])
    size = _chunk_size(n, self.max_batch)
    outs = []
    for i, start in enumerate(range(0, n, size)):
      part = [np.asarray(a[start:start + size]) for a in arrays]
      m = len(part[0])
      part = [np.concatenate([p, np.repeat(p[-1:], size - m, axis=0)]) if m < size else p
              for p in part]
      out = fn(jax.random.fold_in(key, i), *part) if key is not None else fn(*part)
      outs.append((m, out))
    outs = [jax.tree.map(lambda x, m=m: np.asarray(x)[:m], out) for m, out in jax.device_get(outs)]
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outs)

  # ------------------------------------------------------------------ conversions
  def encode_text(self, prompts):
    """-> (ids int32 [B, n_txt], lengths int32 [B]); over-long prompts are truncated (warning)."""
    prompts = sampler_tasks.non_empty(prompts, "prompts")
    for p in prompts:
      n = len(self.tokenizer.encode_ids(p)) + 1
      if n > self.n_txt:
        warnings.warn(f"prompt {p[:60]!r} has {n} tokens with EOS > text_length {self.n_txt}: "
                      "truncated", stacklevel=3)
    return self.tokenizer.encode(prompts, self.n_txt)

  def prepare_images(self, images) -> np.ndarray:
    """PIL images / uint8 arrays of any size -> uint8 [B, S, S, 3] (short side + centre crop)."""
    if isinstance(images, np.ndarray) and images.ndim == 4 and images.shape[1:] == (
        self.image_size, self.image_size, 3) and images.dtype == np.uint8:
      return images
    return np.stack([prepare_image(im, self.image_size)
                     for im in sampler_tasks.non_empty(images, "images")])

  def encode_images(self, images) -> np.ndarray:
    """-> int32 image tokenizer codes [B, n_img]."""
    enc = self._fn("encode")
    return self._chunked(lambda x: enc(self.tokenizer_params, x), [self.prepare_images(images)])

  def decode_codes(self, codes) -> np.ndarray:
    """int codes [B, n_img] -> uint8 images [B, S, S, 3]."""
    dec = self._fn("decode_pixels")
    return self._chunked(lambda c: dec(self.tokenizer_params, c), [np.asarray(codes, np.int32)])

  def reconstruct(self, images) -> np.ndarray:
    """Image tokenizer round trip (uint8 in, uint8 out)."""
    return self.decode_codes(self.encode_images(images))

  def _key(self, seed, key):
    return jax.random.PRNGKey(seed) if key is None else key

  def _guidance(self, scale):
    scale = float(self.config.decoding.guidance_scale if scale is None else scale)
    return scale != 0.0, np.float32(scale)

  def _num(self, n, which):
    if n is not None:
      return max(int(n), 1)
    return 1 if self.reranker == "none" else int(self.config.decoding[which])

  text_to_image = sampler_tasks.text_to_image
  inpaint = sampler_tasks.inpaint
  image_to_text = sampler_tasks.image_to_text
  infill = sampler_tasks.infill
  generate = sampler_tasks.generate
  clip_scores = sampler_tasks.clip_scores
