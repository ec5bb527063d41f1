"""Image decoding and augmentation (PIL + numpy, no TensorFlow).

- `decode_image`: encoded bytes -> RGB uint8, whatever the source mode (grayscale, palette, RGBA,
  CMYK, 16-bit, float), with a decompression-bomb limit; raises `BadImageError` with a reason.
- `dalle_crop` (training, SPEC section 4 / official DalleAugmentation + RandomCrop) and
  `center_crop` (eval: resize short side + centre crop), both to S x S.
- `squeeze`: the whole image resized (not cropped) to half width or half height, for MixSel.
"""
import io
import warnings

import numpy as np
from PIL import Image

RESAMPLE = Image.Resampling.BILINEAR  # antialiased, as torchvision Resize in MAGVLT
DEFAULT_MAX_PIXELS = 100_000_000  # beyond this an image is treated as a decompression bomb


class BadImageError(ValueError):
  """An image that cannot be used; `reason` is a short counter name (e.g. 'corrupt')."""

  def __init__(self, reason: str, message: str):
    super().__init__(f"{reason}: {message}")
    self.reason = reason


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
  """Opens (header only) and checks the pixel count before anything is decoded."""
  if not data:
    raise BadImageError("corrupt", "empty image bytes")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our limit is below
      img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise BadImageError("too_large", str(e)) from e
  except Exception as e:  # PIL raises UnidentifiedImageError, OSError, SyntaxError, ...
    raise BadImageError("corrupt", f"cannot identify image ({e})") from e
  w, h = img.size
  if w <= 0 or h <= 0:
    raise BadImageError("corrupt", f"image has size {w}x{h}")
  if w * h > max_pixels:
    raise BadImageError("too_large", f"{w}x{h} = {w * h} pixels > limit {max_pixels}")
  return img


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB. Transparency is composited over white; 16/32-bit and float
  images are rescaled from their own range (PIL's convert would clip them)."""
  mode = img.mode
  if mode == "RGB":
    return img
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    a = np.asarray(img, dtype=np.float64)
    if mode.startswith("I;16"):
      a = a / 257.0
    elif mode == "I":
      lo, hi = 0.0, (65535.0 if a.max() > 255 else 255.0)
      a = (a - lo) / (hi - lo) * 255.0
    else:  # float images: 0..1 or 0..255
      a = a * 255.0 if a.max() <= 1.0 else a
    a = np.clip(np.round(a), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if mode in ("P", "PA") or "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "La", "RGBa"):
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 draft_size: int = 0) -> Image.Image:
  """Encoded bytes -> RGB PIL image (fully loaded). `draft_size` > 0 lets JPEG decode at a reduced
  scale whose sides stay >= draft_size (much faster for large photos)."""
  img = open_image(data, max_pixels)
  try:
    if draft_size and img.format == "JPEG":
      img.draft("RGB", (draft_size, draft_size))
    img.load()
    return to_rgb(img)
  except BadImageError:
    raise
  except Exception as e:  # truncated / corrupt payload
    raise BadImageError("corrupt", f"cannot decode image ({e})") from e


def dalle_crop(img: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
  """Square crop of side min(w, h) offset uniformly in [3/8, 5/8) of the excess, resized to
  t x t with t ~ U{size .. max(min(side, round(9/8 size)), size)}, then a random size x size crop."""
  w, h = img.size
  side = min(w, h)
  if w == h == size:  # t can only be `size`: the crop is the identity
    return img
  x0 = int((w - side) * rng.uniform(3 / 8, 5 / 8))
  y0 = int((h - side) * rng.uniform(3 / 8, 5 / 8))
  t_max = max(min(side, round(9 / 8 * size)), size)
  t = int(rng.integers(size, t_max + 1))
  resized = img.resize((t, t), RESAMPLE, box=(x0, y0, x0 + side, y0 + side))
  ox, oy = (int(v) for v in rng.integers(0, t - size + 1, size=2))
  return resized.crop((ox, oy, ox + size, oy + size))


def center_crop(img: Image.Image, size: int) -> Image.Image:
  """Resize the short side to `size` and take the centre square (one resample)."""
  w, h = img.size
  side = min(w, h)
  if w == h == size:
    return img
  x0, y0 = (w - side) / 2, (h - side) / 2
  return img.resize((size, size), RESAMPLE, box=(x0, y0, x0 + side, y0 + side))


def squeeze(img: Image.Image, axis: str) -> np.ndarray:
  """S x S image -> uint8 [S, S/2, 3] ('lr': half width) or [S/2, S, 3] ('tb': half height):
  the whole image squeezed (each output pixel the rounded mean of a pixel pair), not cropped."""
  if axis not in ("lr", "tb"):
    raise ValueError(f"squeeze axis must be 'lr' or 'tb', got {axis!r}")
  return np.asarray(img.reduce((2, 1) if axis == "lr" else (1, 2)))


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
  return buf.getvalue()
