"""The task methods of sampler.Sampler (kept apart to keep files short): each takes user inputs
(prompts, PIL images or uint8 arrays), runs the jitted decoding loop in chunks, reranks the
candidates (config.decoding.rerank) and returns PIL images / strings.

Infilling spans: mark the words to regenerate with square brackets,
    "a red [circle next to] a blue square"
or pass span=(start, end) word indices (end exclusive); without either the middle half of the
caption's tokens is regenerated (official IT2T default).
"""
import warnings

import numpy as np
from PIL import Image

from magvlt_jax import decoding
from magvlt_jax import text as text_lib


def as_list(x):
  if isinstance(x, (str, Image.Image)) or (isinstance(x, np.ndarray) and x.ndim == 3):
    return [x]
  return list(x)


def non_empty(items, what: str) -> list:
  """as_list(items), or a ValueError naming `what` when there is nothing (an empty batch would
  otherwise fail deep inside the compiled decoder)."""
  items = as_list(items)
  if not items:
    raise ValueError(f"no {what} given: pass at least one")
  return items


def _to_pil(pixels):
  return [Image.fromarray(np.asarray(p, np.uint8)) for p in pixels]


def _grouped(items, order, n):
  """[Q * n] -> list of Q lists, each sorted by `order` (best first)."""
  return [[items[q * n + j] for j in order[q]] for q in range(len(order))]


def _rank(self, scores, n):
  """Per query: candidate indices best first (as generated where reranking is off)."""
  scores = np.asarray(scores, np.float32).reshape(-1, n)
  if n == 1 or self.reranker == "none":
    return np.tile(np.arange(n), (scores.shape[0], 1))
  return np.argsort(-scores, axis=-1, kind="stable")


def _image_scores(self, codes, ids, lengths, prompts_rep, n):
  if n == 1 or self.reranker == "none":
    return np.zeros(len(codes), np.float32), None
  if self.reranker == "clip":
    pixels = self.decode_codes(codes)
    return self.clip_scores(pixels, prompts_rep), pixels
  fn = self._fn("image_loglik")
  return self._chunked(lambda c, t, l: fn(self.params, c, t, l), [codes, ids, lengths]), None


def _finish_images(self, codes, ids, lengths, prompts, n, return_all):
  prompts_rep = [p for p in prompts for _ in range(n)]
  scores, pixels = _image_scores(self, codes, ids, lengths, prompts_rep, n)
  order = _rank(self, scores, n)
  if return_all:
    pixels = self.decode_codes(codes) if pixels is None else pixels
    return _grouped(_to_pil(pixels), order, n)
  rows = np.arange(len(order)) * n + order[:, 0]
  pixels = self.decode_codes(codes[rows]) if pixels is None else pixels[rows]
  return _to_pil(pixels)


def text_to_image(self, prompts, n=None, seed=0, *, key=None, guidance_scale=None,
                  return_all=False):
  """Prompts (str or list) -> list of PIL images, the best of n candidates each (n default:
  config.decoding.num_image_candidates; 1 when rerank is 'none'). return_all: per prompt a list
  of all n images, best first."""
  prompts = as_list(prompts)
  n = self._num(n, "num_image_candidates")
  ids, lengths = self.encode_text(prompts)
  ids, lengths = np.repeat(ids, n, axis=0), np.repeat(lengths, n, axis=0)
  guided, scale = self._guidance(guidance_scale)
  dec = self._decoder("t2i", guided)
  out = self._chunked(lambda k, t, l: dec(self.params, k, scale, t, l), [ids, lengths],
                      key=self._key(seed, key))
  return _finish_images(self, out.image_codes, ids, lengths, prompts, n, return_all)


def _region_rows(region, n_img, batch):
  if region is None:
    region = decoding.centre_region(n_img)
  region = np.asarray(region, bool)
  if region.ndim == 2 and region.shape[0] * region.shape[1] == n_img and region.shape[0] != batch:
    region = region.reshape(-1)  # a [h, w] grid
  if region.shape[-1] != n_img:
    raise ValueError(f"inpaint: region must be bool [{n_img}], [h, w] or [B, {n_img}]; got {region.shape}")
  return np.broadcast_to(region, (batch, n_img))


def inpaint(self, images, prompts, region=None, seed=0, *, key=None, n=None, guidance_scale=None,
            return_all=False):
  """Regenerates `region` (bool over the code grid: [n_img], [h, w] or [B, n_img]; default the
  centre half-side square) of each image given its prompt; the other codes are kept.
  Also accepts the (images, region, prompts) argument order."""
  if not isinstance(prompts, str) and np.asarray(prompts).dtype == bool:
    prompts, region = region, prompts
  prompts = as_list(prompts)
  codes = self.encode_images(images)
  if len(prompts) == 1 and len(codes) > 1:
    prompts = prompts * len(codes)
  if len(prompts) != len(codes):
    raise ValueError(f"inpaint: {len(codes)} images but {len(prompts)} prompts")
  n = self._num(n, "num_image_candidates")
  ids, lengths = self.encode_text(prompts)
  region = _region_rows(region, self.n_img, len(codes))
  rep = lambda a: np.repeat(a, n, axis=0)
  ids, lengths, codes, region = rep(ids), rep(lengths), rep(codes), rep(region)
  guided, scale = self._guidance(guidance_scale)
  dec = self._decoder("inpaint", guided)
  out = self._chunked(lambda k, c, r, t, l: dec(self.params, k, scale, c, r, t, l),
                      [codes, region, ids, lengths], key=self._key(seed, key))
  return _finish_images(self, out.image_codes, ids, lengths, prompts, n, return_all)


def _finish_text(self, codes, images, out, n, return_all, image_rows):
  captions = self.tokenizer.decode(out.text_ids)
  scores = np.zeros(len(captions), np.float32)
  if n > 1 and self.reranker == "clip":
    scores = self.clip_scores(np.repeat(images, n, axis=0)[image_rows], captions)
  elif n > 1 and self.reranker == "likelihood":
    fn = self._fn("text_loglik")
    scores = self._chunked(lambda c, t, l: fn(self.params, c, t, l),
                           [codes, out.text_ids, out.text_length])
  order = _rank(self, scores, n)
  if return_all:
    return _grouped(captions, order, n)
  return [captions[q * n + order[q, 0]] for q in range(len(order))]


def image_to_text(self, images, seed=0, *, key=None, n=None, guidance_scale=None,
                  text_temperature=None, return_all=False):
  """Images (PIL / uint8, any size) -> list of captions, the best of n candidates each (n default:
  config.decoding.num_text_candidates; 1 when rerank is 'none')."""
  images = self.prepare_images(images)
  n = self._num(n, "num_text_candidates")
  codes = np.repeat(self.encode_images(images), n, axis=0)
  guided, scale = self._guidance(guidance_scale)
  dec = self._decoder("i2t", guided, text_temperature)
  out = self._chunked(lambda k, c: dec(self.params, k, scale, c), [codes], key=self._key(seed, key))
  return _finish_text(self, codes, images, out, n, return_all, np.arange(len(codes)))


def parse_span(caption: str, span=None):
  """-> (words, (start, end) or None): '[...]' brackets mark the span; else `span` word indices."""
  words = caption.split()
  if "[" in caption and "]" in caption:
    start = next(i for i, w in enumerate(words) if "[" in w)
    end = next(i for i, w in enumerate(words) if "]" in w and i >= start) + 1
    words = [w.replace("[", "").replace("]", "") for w in words]
    keep = [i for i, w in enumerate(words) if w]
    start = sum(1 for i in keep if i < start)
    end = sum(1 for i in keep if i < end)
    return [words[i] for i in keep], (start, end)
  return words, (tuple(int(v) for v in span) if span is not None else None)


def _encode_with_span(self, caption, span):
  words, wspan = parse_span(caption, span)
  ids, mask = [], []
  for i, w in enumerate(words):
    piece = self.tokenizer.encode_ids(w)
    ids += piece
    mask += [wspan is not None and wspan[0] <= i < wspan[1]] * len(piece)
  if len(ids) + 1 > self.n_txt:
    warnings.warn(f"caption {caption[:60]!r} is longer than text_length {self.n_txt}: truncated",
                  stacklevel=3)
  ids, mask = ids[:self.n_txt], mask[:self.n_txt]
  row = np.full((self.n_txt,), self.tokenizer.eos_id, np.int32)
  row[:len(ids)] = ids
  length = min(len(ids) + 1, self.n_txt)
  if wspan is None:
    span_row = np.asarray(decoding.middle_span(np.array([length]), self.n_txt))[0]
  else:
    span_row = np.zeros((self.n_txt,), bool)
    span_row[:len(mask)] = mask
  if not span_row.any():
    raise ValueError(f"infill: the span of {caption!r} is empty (after truncation to "
                     f"{self.n_txt} tokens)")
  return row, length, span_row


def infill(self, images, captions, span=None, seed=0, *, key=None, n=None, guidance_scale=None,
           text_temperature=None, return_all=False):
  """Regenerates a span of each caption given its image and the rest of the caption; see the
  module docstring for the span syntax. Returns the completed captions."""
  images = self.prepare_images(images)
  captions = as_list(captions)
  if len(captions) != len(images):
    raise ValueError(f"infill: {len(images)} images but {len(captions)} captions")
  rows = [_encode_with_span(self, text_lib.clean_caption(c) if "[" not in c else c, span)
          for c in captions]
  ids, lengths, spans = (np.stack([r[i] for r in rows]) for i in range(3))
  n = self._num(n, "num_text_candidates")
  rep = lambda a: np.repeat(a, n, axis=0)
  codes = rep(self.encode_images(images))
  guided, scale = self._guidance(guidance_scale)
  dec = self._decoder("infill", guided, text_temperature)
  out = self._chunked(lambda k, c, t, l, s: dec(self.params, k, scale, c, t, l, s),
                      [codes, rep(ids), rep(lengths), rep(spans)], key=self._key(seed, key))
  return _finish_text(self, codes, images, out, n, return_all, np.arange(len(codes)))


def generate(self, n, seed=0, *, key=None):
  """Unconditional generation: n (PIL image, caption) pairs."""
  fn = self._decoder("uncond")
  out = self._chunked(lambda k, b: fn(self.params, k, np.float32(0.0), b),
                      [np.zeros((int(n), 1), np.int32)],
                      key=self._key(seed, key))
  pixels = self.decode_codes(out.image_codes)
  return list(zip(_to_pil(pixels), self.tokenizer.decode(out.text_ids)))


def clip_scores(self, images, captions) -> np.ndarray:
  """float32 [B]: CLIP cosine similarity of each uint8 image with its caption."""
  from magvlt_jax import rerank  # pylint: disable=import-outside-toplevel
  scorer = getattr(self, "_clip_scorer", None)
  if scorer is None:
    scorer = self._clip_scorer = rerank.load_clip_scorer(self.config.decoding.clip_weights)
  return np.asarray(scorer(np.asarray(images, np.uint8), list(captions)), np.float32)
