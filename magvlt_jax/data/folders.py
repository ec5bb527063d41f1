"""Builders for user data: a COCO-captions folder and a JSONL/CSV image-caption list.

coco_captions_folder (config.data.path = DIR), real COCO 2014/2017 as downloaded:
  DIR/annotations/captions_train2014.json  + DIR/train2014/*.jpg   -> split "train"
  DIR/annotations/captions_val2014.json    + DIR/val2014/*.jpg     -> split "validation"
  (also captions_<anything>.json with DIR/<anything>/ or DIR/images/<anything>/; "test*" -> "test")
  JSON: {"images": [{"id", "file_name", ...}], "annotations": [{"image_id", "caption"}, ...]};
  all captions of an image go into one record.

image_text_list (config.data.path = FILE.jsonl | FILE.csv, or "train=A.jsonl,validation=B.csv"):
  one row per (image, caption) with an image path column (image | image_path | path | file_name |
  filepath | file) and a caption column (caption | text | captions [list]); paths are relative to the
  list file. Rows sharing an image are merged. With a single file, every 100th image is held out as
  the "validation" split.
"""
import concurrent.futures
import csv
import dataclasses
import hashlib
import json
import logging
import os
import re

import tensorflow_datasets as tfds

from magvlt_jax.data import builders
from magvlt_jax.data import validate

_IMAGE_KEYS = ("image", "image_path", "path", "file_name", "filepath", "file")
_CAPTION_KEYS = ("caption", "text", "captions")
_HOLDOUT_EVERY = 100
_CHUNK = 256  # images checked concurrently


def read_coco_captions(path, counter):
  """({image id: file name}, {image id: [captions]}) of a COCO captions JSON. A file that is not
  JSON or lacks the "images"/"annotations" lists is an error naming the file and the key; an entry
  without its id/file_name (or image_id) is skipped and counted as `bad_entry`."""
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not a COCO captions JSON ({e})") from e
  for key in ("images", "annotations"):
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
      raise ValueError(f"{path}: no {key!r} list (a COCO captions JSON has \"images\": "
                       f"[{{\"id\", \"file_name\"}}] and \"annotations\": "
                       f"[{{\"image_id\", \"caption\"}}])")
  files, captions = {}, {}
  for im in data["images"]:
    try:
      files[int(im["id"])] = str(im["file_name"])
    except (KeyError, TypeError, ValueError):
      counter.add("bad_entry", f"{path}: image entry {str(im)[:100]} (needs id, file_name)")
  for ann in data["annotations"]:
    try:
      captions.setdefault(int(ann["image_id"]), []).append(ann.get("caption", ""))
    except (KeyError, TypeError, ValueError, AttributeError):
      counter.add("bad_entry", f"{path}: annotation {str(ann)[:100]} (needs image_id, caption)")
  return files, captions


@dataclasses.dataclass(eq=False)
class SourceConfig(tfds.core.BuilderConfig):
  path: str = ""


def _source_config(path: str) -> SourceConfig:
  if not path:
    raise ValueError("config.data.path is empty: set it to the source folder or list file")
  path = os.path.abspath(os.path.expanduser(path))
  stem = re.sub(r"[^a-zA-Z0-9_]+", "_", os.path.basename(path.rstrip("/")).split(".")[0])[:40]
  digest = hashlib.sha1(path.encode()).hexdigest()[:8]  # same folder name, other place: new dataset
  return SourceConfig(name=f"{stem or 'data'}_{digest}", path=path)


def _split_name(suffix: str) -> str:
  s = suffix.lower()
  if s.startswith("train"):
    return "train"
  if s.startswith("val"):
    return "validation"
  if s.startswith("test"):
    return "test"
  return re.sub(r"[^a-z0-9_]+", "_", s)


class _FolderBuilder(builders.ImageCaptionBuilder, skip_registration=True):
  BUILDER_CONFIGS = [SourceConfig(name="default")]

  @classmethod
  def config_for(cls, path: str) -> SourceConfig:
    return _source_config(path)

  def _generate_from(self, items):
    """items: (image_id, image path, captions); reads and checks images in threads."""
    def load(item):
      image_id, path, caps = item
      return self._record(image_id, validate.read_file(path), caps, image_id, path)

    def chunks():  # bounded in-flight work: never the whole dataset's bytes in memory
      with concurrent.futures.ThreadPoolExecutor(workers) as pool:  # PIL decodes without the GIL
        for start in range(0, len(items), _CHUNK):
          yield from pool.map(load, items[start:start + _CHUNK])

    workers = max(1, min(8, os.cpu_count() or 1))
    for out in builders.progress_bar(chunks(), len(items), f"{self.name}: checking images"):
      if out is not None:
        yield out


class CocoCaptionsFolder(_FolderBuilder, skip_registration=True):
  """A folder in the COCO captions layout (annotations/captions_<split>.json + image folders)."""
  name = "coco_captions_folder"

  def _annotation_files(self) -> dict[str, tuple[str, str]]:
    root = self.builder_config.path
    ann_dir = os.path.join(root, "annotations")
    if not os.path.isdir(ann_dir):
      raise FileNotFoundError(f"config.data.path={root!r}: no annotations/ folder (expected "
                              "annotations/captions_<split>.json, the COCO layout)")
    found = {}
    for fname in sorted(os.listdir(ann_dir)):
      m = re.fullmatch(r"captions_(.+)\.json", fname)
      if not m:
        continue
      suffix = m.group(1)
      image_dir = next((d for d in (os.path.join(root, suffix), os.path.join(root, "images", suffix),
                                    os.path.join(root, "images"), root)
                        if os.path.isdir(d)), root)
      found[_split_name(suffix)] = (os.path.join(ann_dir, fname), image_dir)
    if not found:
      raise FileNotFoundError(f"no annotations/captions_*.json under {root!r}")
    return found

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(ann, image_dir)
            for split, (ann, image_dir) in self._annotation_files().items()}

  def _generate_examples(self, annotation_file, image_dir):
    files, captions = read_coco_captions(annotation_file, self.counter)
    for image_id in files:
      if image_id not in captions:
        self.counter.add("no_caption", f"image id {image_id}")
    for image_id in captions:
      if image_id not in files:
        self.counter.add("unknown_image_id", f"annotation image_id {image_id}")
    items = [(i, os.path.join(image_dir, files[i]), captions[i]) for i in files if i in captions]
    logging.info("%s: %d images with captions", annotation_file, len(items))
    yield from self._generate_from(items)


def _read_rows(path: str) -> list[dict]:
  if path.lower().endswith((".jsonl", ".json")):
    rows = []
    with open(path, encoding="utf-8") as f:
      for line_no, line in enumerate(f, 1):
        if line.strip():
          try:
            rows.append(json.loads(line))
          except json.JSONDecodeError as e:
            rows.append({"__bad__": f"{path}:{line_no}: {e}"})
    return rows
  if path.lower().endswith((".csv", ".tsv")):
    with open(path, encoding="utf-8", newline="") as f:
      return list(csv.DictReader(f, delimiter="\t" if path.lower().endswith(".tsv") else ","))
  raise ValueError(f"config.data.path={path!r}: expected a .jsonl or .csv (.tsv) list file")


class ImageTextList(_FolderBuilder, skip_registration=True):
  """Rows of {image path, caption} in a JSONL or CSV file (img2dataset-like)."""
  name = "image_text_list"

  @classmethod
  def config_for(cls, path: str) -> SourceConfig:
    """path: FILE or "split=FILE,split=FILE"; files made absolute so the config name is stable."""
    if "=" not in path:
      return _source_config(path)
    parts = []
    for part in path.split(","):
      split, sep, file = part.partition("=")
      if not sep or not file.strip():
        raise ValueError(f"config.data.path={path!r}: expected FILE or 'train=FILE,validation=FILE'")
      parts.append(f"{_split_name(split.strip())}={os.path.abspath(os.path.expanduser(file.strip()))}")
    spec = ",".join(parts)
    digest = hashlib.sha1(spec.encode()).hexdigest()[:8]
    return SourceConfig(name=f"list_{digest}", path=spec)

  def _files(self) -> dict[str, str]:
    spec = self.builder_config.path
    if "=" not in spec:
      return {"": spec}
    return dict(part.split("=", 1) for part in spec.split(","))

  def _split_generators(self, dl_manager):
    del dl_manager
    files = self._files()
    if "" not in files:
      return {split: self._generate_examples(self._items(f)) for split, f in files.items()}
    # one file: hold out every 100th image (at least one) whose file exists, as validation
    items = self._items(files[""])
    held = {i for i, path, _ in items
            if i % _HOLDOUT_EVERY == _HOLDOUT_EVERY - 1 and os.path.exists(path)}
    if not held:
      held = {next((i for i, path, _ in reversed(items) if os.path.exists(path)), -1)}
    return {"train": self._generate_examples([it for it in items if it[0] not in held]),
            "validation": self._generate_examples([it for it in items if it[0] in held])}

  def _generate_examples(self, items):
    yield from self._generate_from(items)

  def _items(self, list_file) -> list[tuple[int, str, list]]:
    """(index, absolute image path, captions) per distinct image of a list file."""
    if not os.path.exists(list_file):
      raise FileNotFoundError(f"config.data.path: list file {list_file!r} does not exist")
    base = os.path.dirname(os.path.abspath(list_file))
    grouped = {}
    for row_no, row in enumerate(_read_rows(list_file)):
      image_key = next((k for k in _IMAGE_KEYS if row.get(k)), None)
      caption_key = next((k for k in _CAPTION_KEYS if k in row), None)
      if "__bad__" in row or image_key is None or caption_key is None:
        self.counter.add("bad_row", row.get("__bad__", f"{list_file} row {row_no}: {row}"))
        continue
      caps = row[caption_key]
      caps = caps if isinstance(caps, list) else [caps]
      path = os.path.normpath(os.path.join(base, str(row[image_key])))
      grouped.setdefault(path, []).extend(caps)
    return [(i, path, caps) for i, (path, caps) in enumerate(grouped.items())]
