"""Prepare-time checks of image-caption records (run by the builders, once per dataset).

Policy (documented in the README):
- at PREPARE time (builders): every image is fully decoded once. Missing, unreadable/corrupt and
  decompression-bomb images (> max_image_pixels) are skipped; non-RGB / non-8-bit / non-JPEG-PNG
  images are converted to RGB and re-encoded; images whose long side exceeds max_image_side are
  downscaled; images with a side < min_image_side are kept (the pipeline upscales them) and counted.
  Empty captions are dropped, an image left without captions is skipped, over-long captions are
  cut at a word boundary. Every case is counted; the counts are logged, returned by `prepare` and
  stored next to the dataset (prepare_stats.json).
- at READ time (pipeline): a record that still fails to decode is counted and replaced by the next
  readable record (deterministically), so batches keep their shape; texts longer than the text
  length are truncated by the tokenizer and counted.
"""
import collections
import dataclasses
import io
import logging
import threading

from magvlt_jax import text as text_lib
from magvlt_jax.data import transforms


@dataclasses.dataclass(frozen=True)
class Limits:
  max_image_pixels: int = transforms.DEFAULT_MAX_PIXELS
  max_image_side: int = 4096
  min_image_side: int = 16
  max_caption_chars: int = 1000


def limits_from_config(config) -> Limits:
  d = config.data
  return Limits(
      max_image_pixels=int(d.get("max_image_pixels", Limits.max_image_pixels)),
      max_image_side=int(d.get("max_image_side", Limits.max_image_side)),
      min_image_side=int(d.get("min_image_side", Limits.min_image_side)),
      max_caption_chars=int(d.get("max_caption_chars", Limits.max_caption_chars)))


class Counter:
  """Thread-safe named counts with a bounded list of examples per reason (for the log)."""

  def __init__(self):
    self._lock = threading.Lock()
    self.counts = collections.Counter()
    self.examples = collections.defaultdict(list)

  def add(self, reason: str, example: str = "", n: int = 1):
    with self._lock:
      self.counts[reason] += n
      if example and len(self.examples[reason]) < 5:
        self.examples[reason].append(example)

  def as_dict(self) -> dict:
    with self._lock:
      return dict(sorted(self.counts.items()))

  def log(self, what: str):
    counts = self.as_dict()
    if not counts:
      return
    logging.warning("%s: %s", what, counts)
    for reason, ex in sorted(self.examples.items()):
      logging.warning("  %s e.g. %s", reason, "; ".join(ex))


def clean_captions(captions, limits: Limits, counter: Counter, where: str) -> list[str]:
  """Drops empty captions and cuts over-long ones (a caption is stored raw otherwise: the
  tokenizer applies clean_caption itself)."""
  out = []
  for c in captions:
    c = c.decode("utf-8", "replace") if isinstance(c, bytes) else ("" if c is None else str(c))
    if not text_lib.clean_caption(c):
      counter.add("empty_caption", where)
      continue
    if len(c) > limits.max_caption_chars:
      c = c[:limits.max_caption_chars].rsplit(" ", 1)[0]
      counter.add("caption_cut", where)
    out.append(c.strip())
  return out


def check_image(data: bytes | None, limits: Limits, counter: Counter, where: str) -> bytes | None:
  """-> bytes to store (original, or converted/downscaled re-encoding), or None to skip."""
  if data is None:
    counter.add("missing_file", where)
    return None
  try:
    img = transforms.open_image(data, limits.max_image_pixels)
    fmt, mode = img.format, img.mode
    img.load()  # full decode: catches truncated files now rather than at training time
  except transforms.BadImageError as e:
    counter.add(e.reason, f"{where} ({e})")
    return None
  except Exception as e:  # truncated payloads raise OSError on load
    counter.add("corrupt", f"{where} ({e})")
    return None
  w, h = img.size
  if min(w, h) < limits.min_image_side:
    counter.add("tiny_upscaled", f"{where} ({w}x{h})")
  changed = False
  if mode != "RGB" or fmt not in ("JPEG", "PNG"):
    counter.add("converted", f"{where} ({fmt} {mode})")
    img, changed = transforms.to_rgb(img), True
  if max(w, h) > limits.max_image_side:
    scale = limits.max_image_side / max(w, h)
    img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), transforms.RESAMPLE)
    counter.add("downscaled", f"{where} ({w}x{h})")
    changed = True
  if not changed:
    return data
  buf = io.BytesIO()
  if fmt == "JPEG":  # keep lossy sources lossy (size), lossless ones lossless
    img.save(buf, format="JPEG", quality=95)
  else:
    img.save(buf, format="PNG", compress_level=3)
  return buf.getvalue()


def read_file(path: str) -> bytes | None:
  try:
    with open(path, "rb") as f:
      return f.read()
  except OSError:
    return None

