"""The built-in synthetic dataset: coloured shapes in named places, with unambiguous captions.

The scene space is deliberately small (6 colours x 4 shapes x 9 places = 216 one-object scenes) so
the tiny config learns text->image and image->text on a CPU in minutes, and a caption names
everything that determines the picture (colour, shape, place) up to a few pixels of jitter.
Everything is a pure function of a seed: `scene(seed_or_rng)`, `render(scene, size)`,
`captions(scene, rng, n)`.
"""
import dataclasses
from typing import Iterator

import numpy as np

COLORS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
# place name -> (row, col) of the 3x3 grid cell
PLACES = {
    "top left": (0, 0), "top middle": (0, 1), "top right": (0, 2),
    "middle left": (1, 0), "center": (1, 1), "middle right": (1, 2),
    "bottom left": (2, 0), "bottom middle": (2, 1), "bottom right": (2, 2),
}
BACKGROUND = (40, 40, 48)
# Object radius as a fraction of a grid cell: large enough that a shape spans ~2.5 codes of an f8
# tokenizer, so the tiny tokenizer keeps shapes, not just coloured blobs, after minutes of training.
OBJECT_RADIUS = 0.44

TEMPLATES = (
    "a {color} {shape} in the {place}",
    "a {color} {shape} at the {place}",
    "there is a {color} {shape} in the {place} of the image",
    "a picture of a {color} {shape} in the {place}",
    "the {place} has a {color} {shape}",
)
TWO_OBJECT_TEMPLATES = (
    "a {color} {shape} in the {place} and a {color2} {shape2} in the {place2}",
    "there is a {color} {shape} in the {place} and a {color2} {shape2} in the {place2}",
)


@dataclasses.dataclass(frozen=True)
class Obj:
  color: str
  shape: str
  place: str


@dataclasses.dataclass(frozen=True)
class Scene:
  objects: tuple[Obj, ...]
  jitter: tuple[tuple[float, float], ...]  # per object, fraction of a cell, in [-0.5, 0.5)


def _rng(seed_or_rng) -> np.random.Generator:
  if isinstance(seed_or_rng, np.random.Generator):
    return seed_or_rng
  return np.random.default_rng(seed_or_rng)


def scene(seed_or_rng, max_objects: int = 1) -> Scene:
  """A random scene with 1..max_objects objects in distinct places and of distinct colours."""
  rng = _rng(seed_or_rng)
  n = int(rng.integers(1, max_objects + 1))
  places = rng.choice(len(PLACES), size=n, replace=False)
  colors, names = list(COLORS), list(PLACES)
  objs = []
  for p in places:
    # Objects of one scene never share a colour, so "which colour is where" is always defined
    # (binding can be scored); the first object's draws are unchanged from one-object scenes.
    free = [c for c in colors if c not in {o.color for o in objs}]
    objs.append(Obj(free[rng.integers(len(free))], SHAPES[rng.integers(len(SHAPES))], names[p]))
  objs = tuple(objs)
  jitter = tuple((float(a), float(b)) for a, b in rng.uniform(-0.5, 0.5, size=(n, 2)))
  return Scene(objs, jitter)


def scene_from_caption_parts(color: str, shape: str, place: str) -> Scene:
  """The canonical (centred, unjittered) scene a prompt describes; for evaluation."""
  if color not in COLORS or shape not in SHAPES or place not in PLACES:
    raise ValueError(f"unknown scene part: {color!r} {shape!r} {place!r}")
  return Scene((Obj(color, shape, place),), ((0.0, 0.0),))


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, r: float) -> np.ndarray:
  """Boolean mask of a shape of radius r centred at 0 on pixel-centre grids yy, xx."""
  if shape == "circle":
    return yy * yy + xx * xx <= r * r
  if shape == "square":
    # 0.9 r: big enough that an f8 tokenizer's rounded corners still read as a square, not a
    # circle (at 0.8 r the tiny tokenizer's squares read back right 18% of the time).
    s = 0.9 * r
    return (np.abs(yy) <= s) & (np.abs(xx) <= s)
  if shape == "triangle":  # apex up, base at +0.7r
    top, bottom = -r, 0.7 * r
    half_width = (yy - top) / (bottom - top) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx) <= half_width)
  if shape == "cross":
    w = 0.3 * r
    return ((np.abs(yy) <= r) & (np.abs(xx) <= w)) | ((np.abs(xx) <= r) & (np.abs(yy) <= w))
  raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(s: Scene, size: int = 64) -> np.ndarray:
  """uint8 [size, size, 3] image of the scene."""
  img = np.empty((size, size, 3), np.uint8)
  img[:] = BACKGROUND
  cell = size / 3.0
  r = OBJECT_RADIUS * cell
  coords = np.arange(size, dtype=np.float32) + 0.5
  for obj, (jy, jx) in zip(s.objects, s.jitter):
    row, col = PLACES[obj.place]
    cy = (row + 0.5 + 0.25 * jy) * cell  # jitter up to an eighth of a cell: place stays exact
    cx = (col + 0.5 + 0.25 * jx) * cell
    mask = _shape_mask(obj.shape, coords[:, None] - cy, coords[None, :] - cx, r)
    img[mask] = COLORS[obj.color]
  return img


def captions(s: Scene, rng, n: int = 3) -> list[str]:
  """n distinct captions (templates drawn without replacement) describing the scene."""
  rng = _rng(rng)
  if len(s.objects) == 1:
    o = s.objects[0]
    templates = TEMPLATES
    fields = dict(color=o.color, shape=o.shape, place=o.place)
  else:
    order = rng.permutation(len(TWO_OBJECT_TEMPLATES))
    out = []
    for i in range(n):
      # Either object first, drawn per caption: the caption's word order carries no binding cue.
      a, b = s.objects[:2] if rng.integers(2) == 0 else s.objects[1::-1]
      out.append(TWO_OBJECT_TEMPLATES[order[i % len(order)]].format(
          color=a.color, shape=a.shape, place=a.place, color2=b.color, shape2=b.shape,
          place2=b.place))
    return out
  order = rng.permutation(len(templates))
  picked = [templates[order[i % len(templates)]] for i in range(n)]
  return [t.format(**fields) for t in picked]


def examples(num: int, seed: int, size: int = 64, captions_per_image: int = 3,
             max_objects: int = 1) -> Iterator[tuple[int, np.ndarray, list[str], Scene]]:
  """(index, image, captions, scene) for index in range(num); example i depends on (seed, i) only."""
  for i in range(num):
    rng = np.random.default_rng([seed, i])
    s = scene(rng, max_objects)
    yield i, render(s, size), captions(s, rng, captions_per_image), s


def all_single_object_prompts() -> list[str]:
  """Every one-object scene as the first template's caption (216 prompts), for evaluation."""
  return [TEMPLATES[0].format(color=c, shape=s, place=p)
          for c in COLORS for s in SHAPES for p in PLACES]


def parse_caption(caption: str) -> list[Obj]:
  """Recovers the objects a caption describes (used to score generated captions on synthetic data)."""
  words = caption.lower()
  found = []
  for sentence_part in words.split(" and "):
    color = next((c for c in COLORS if f" {c} " in f" {sentence_part} "), None)
    shape = next((s for s in SHAPES if f" {s}" in f" {sentence_part}"), None)
    place = next((p for p in sorted(PLACES, key=len, reverse=True) if p in sentence_part), None)
    if color and shape and place:
      found.append(Obj(color, shape, place))
  return found


def read_scene(image: np.ndarray, min_fraction: float = 0.02) -> Obj | None:
  """The single object a (generated) image shows, read back with the renderer's own rules:
  foreground = pixels far from the background colour, colour = nearest palette entry to their
  median, place = grid cell of their centroid, shape = best IoU with each shape rendered at that
  centroid. None when less than `min_fraction` of the image is foreground. Scores T2I samples on
  this dataset (colour/shape/place right or not)."""
  img = np.asarray(image, np.float32)
  size = img.shape[0]
  fg = np.linalg.norm(img - np.asarray(BACKGROUND, np.float32), axis=-1) > 60.0
  if fg.mean() < min_fraction:
    return None
  palette = np.asarray(list(COLORS.values()), np.float32)
  median = np.median(img[fg], axis=0)
  color = list(COLORS)[int(np.argmin(np.linalg.norm(palette - median, axis=-1)))]
  ys, xs = np.nonzero(fg)
  cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
  cell = size / 3.0
  row, col = min(int(cy // cell), 2), min(int(cx // cell), 2)
  place = next(name for name, rc in PLACES.items() if rc == (row, col))
  coords = np.arange(size, dtype=np.float32) + 0.5
  yy, xx = coords[:, None] - cy, coords[None, :] - cx

  def iou(shape):
    # The triangle's centroid sits 2/15 r below its render centre (apex -r, base +0.7r).
    dy = (2.0 / 15.0) * OBJECT_RADIUS * cell if shape == "triangle" else 0.0
    m = _shape_mask(shape, yy + dy, xx, OBJECT_RADIUS * cell)
    return (m & fg).sum() / max((m | fg).sum(), 1)
  shape = max(SHAPES, key=iou)
  return Obj(color, shape, place)


def read_objects(image: np.ndarray, min_cell_fraction: float = 0.1) -> list[Obj]:
  """Every object a (generated) image shows, one per grid cell, in row-major cell order: a cell
  whose pixels are at least `min_cell_fraction` foreground holds an object (a shape drawn in a
  neighbouring cell spills at most ~3% into it), read with read_scene's rules restricted to the
  cell. Scores multi-object samples: which colour and shape sit in which place."""
  img = np.asarray(image, np.float32)
  size = img.shape[0]
  fg = np.linalg.norm(img - np.asarray(BACKGROUND, np.float32), axis=-1) > 60.0
  palette = np.asarray(list(COLORS.values()), np.float32)
  cell = size / 3.0
  coords = np.arange(size, dtype=np.float32) + 0.5
  index = np.minimum((coords // cell).astype(int), 2)  # grid row (or column) of each pixel
  found = []
  for name, (row, col) in sorted(PLACES.items(), key=lambda item: item[1]):
    region = (index[:, None] == row) & (index[None, :] == col)
    obj = fg & region
    if obj.sum() < min_cell_fraction * region.sum():
      continue
    median = np.median(img[obj], axis=0)
    color = list(COLORS)[int(np.argmin(np.linalg.norm(palette - median, axis=-1)))]
    ys, xs = np.nonzero(obj)
    yy, xx = coords[:, None] - (ys.mean() + 0.5), coords[None, :] - (xs.mean() + 0.5)

    def iou(shape, yy=yy, xx=xx, obj=obj, region=region):
      dy = (2.0 / 15.0) * OBJECT_RADIUS * cell if shape == "triangle" else 0.0  # as read_scene
      m = _shape_mask(shape, yy + dy, xx, OBJECT_RADIUS * cell) & region
      return (m & obj).sum() / max((m | obj).sum(), 1)
    found.append(Obj(color, max(SHAPES, key=iou), name))
  return found


def binding_scores(expected: list[list[Obj]], found: list[list[Obj]]) -> dict:
  """Whether attributes sit on the right object, over pairs of (expected objects, found objects):
  `obj_color_place` / `obj_all`: fraction of expected objects with a found object in their place
  of their colour (/ colour and shape), so a scene with the right colours on swapped objects scores
  0; `triple_precision` / `_recall` / `_f1`: micro-averaged over (colour, shape, place) triples.
  `*_2obj` repeat obj_color_place, obj_all and triple_f1 over the multi-object scenes only
  (absent when there are none)."""
  def rates(pairs):
    objs = [(e, {f.place: f for f in fs}.get(e.place)) for es, fs in pairs for e in es]
    hit = sum(len(set(es) & set(fs)) for es, fs in pairs)
    n_found, n_expected = sum(len(set(fs)) for _, fs in pairs), sum(len(set(es)) for es, _ in pairs)
    p, r = hit / max(n_found, 1), hit / max(n_expected, 1)
    return {"obj_color_place": float(np.mean([f is not None and f.color == e.color for e, f in objs])),
            "obj_all": float(np.mean([f == e for e, f in objs])),
            "triple_precision": p, "triple_recall": r,
            "triple_f1": 2 * p * r / (p + r) if p + r else 0.0}
  pairs = [(list(e), list(f)) for e, f in zip(expected, found) if e]
  if not pairs:
    raise ValueError("binding_scores: no expected objects (prompts that name no object?)")
  out = rates(pairs)
  multi = [(e, f) for e, f in pairs if len(e) > 1]
  if multi:
    m = rates(multi)
    out.update({f"{k}_2obj": m[k] for k in ("obj_color_place", "obj_all", "triple_f1")})
  return out


def match_score(expected: list[Obj], found: Obj | None) -> dict:
  """{'color','shape','place','all'} in {0, 1}: does `found` match the first expected object?"""
  if not expected or found is None:
    return {"color": 0, "shape": 0, "place": 0, "all": 0}
  e = expected[0]
  out = {"color": int(e.color == found.color), "shape": int(e.shape == found.shape),
         "place": int(e.place == found.place)}
  out["all"] = int(all(out.values()))
  return out


def match_rates(expected: list[list[Obj]], found: list[Obj | None]) -> dict:
  """Mean of match_score over pairs: {'color','shape','place','all'} as fractions in [0, 1]."""
  rows = [match_score(e, f) for e, f in zip(expected, found)]
  return {k: float(np.mean([r[k] for r in rows])) for k in ("color", "shape", "place", "all")}
