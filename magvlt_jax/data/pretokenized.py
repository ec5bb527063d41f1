"""Pre-tokenized training data: K augmented crops per record, encoded once with the frozen image
tokenizer (issue 18 item 3; config.train.pretokenized, off by default).

The train step otherwise runs the tokenizer's encoder on every batch, on a crop that changes every
epoch. `tools/prepare_data --tokenize` fixes K crops per training record instead: crop c of record
i is the training augmentation (`transforms.dalle_crop`) drawn with `crop_rng(seed, i, c)` (seed =
config.seed at prepare time, stored in the table), encoded in fixed-size chunks by one jitted
encoder call whose batch is sharded over the mesh's data axes. The trainer then picks
c = rng.integers(K) per example from a child of the example's own (seed, epoch, record) stream, so a
resumed run sees the same crops and the caption / BPE-dropout draws are untouched (on square data,
where the crop is the identity and draws nothing, the batches are exactly data/code_cache.py's),
and the step reads `table[i, c]` instead of running the encoder (`Objective.read_cached_codes`).
The batch's pixels are that same crop c, rebuilt from the same rng, so whatever still looks at
pixels (MixSel's halves, below) sees the image its codes came from.

The price is augmentation: K fixed crops per image instead of a fresh one every epoch. That is why
it is an option, off by default in every variant.

MixSel is not pre-tokenized: the step encodes the pixel-level mixture of two *different* examples'
squeezed halves, and the encoder's receptive field (convolutions, the mid-block attention) crosses
the seam, so the mixture's codes are not the two halves' codes side by side. MixSel's halves
(`image_lr`, `image_tb`) come from crop c and are still encoded in the step.

Files: `<path>.npy` (uint16 where the vocabulary fits, else int32; [records, K, n_img], memory-
mapped when read) and `<path minus .npy>.json` beside it with what the codes depend on: the
tokenizer (kind, image size, grid, vocabulary, sha256 of its params), K, the dataset (name, builder
config, version, split, record count, image size). A table whose metadata differs from the run's is
refused with a ValueError naming the file and each difference. Default place ("auto"):
`<prepared dataset dir>/pretokenized/<split>.npy`, beside the dataset's array_record files (a
rebuilt dataset version has its own folder, so a stale table is never found there).

Written by one process (`prepare_data` does not initialise jax.distributed): on a pod run it on one
host, or any machine, into the shared data_dir; every host then reads the same file.
"""
import hashlib
import json
import logging
import os
import time

import jax
import numpy as np
import tqdm

FORMAT = 1
_CROP_TAG = 0x70726574  # 'pret': crop streams never coincide with the pipeline's (seed, e, i) ones
_FINGERPRINT_KEYS = ("format", "crops", "tokenizer", "dataset")


def setting(config) -> str:
  """config.train.pretokenized: '' (off), 'auto' (the default file) or a path to a .npy table."""
  return str(config.train.get("pretokenized", "") or "")


def crops_of(config) -> int:
  return int(config.train.get("pretokenized_crops", 8))


def default_path(dataset_dir: str, split: str) -> str:
  return os.path.join(dataset_dir, "pretokenized", f"{split}.npy")


def meta_path(path: str) -> str:
  return os.path.splitext(path)[0] + ".json"


def table_path(config, dataset_dir: str) -> str:
  value = setting(config)
  if value in ("", "auto"):
    return default_path(dataset_dir, config.data.train_split)
  return os.path.expanduser(value)  # a .npy path (configs_util checks the suffix)


def crop_rng(seed: int, index: int, crop: int) -> np.random.Generator:
  return np.random.default_rng([int(seed), int(index), int(crop), _CROP_TAG])


def params_sha256(params) -> str:
  """sha256 over every leaf's path, dtype, shape and bytes (the tokenizer's fingerprint)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(params))[0]:
    a = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|".encode())
    h.update(a.tobytes())
  return h.hexdigest()


def expected_meta(config, image_tokenizer, tokenizer_params, builder, records: int, crops: int):
  """What a table for this config, tokenizer, dataset split and K must say about itself."""
  return {
      "format": FORMAT, "crops": int(crops),
      "tokenizer": {"kind": image_tokenizer.kind, "image_size": int(image_tokenizer.image_size),
                    "grid": list(image_tokenizer.grid),
                    "vocab_size": int(image_tokenizer.vocab_size),
                    "params_sha256": params_sha256(tokenizer_params)},
      "dataset": {"name": config.data.name, "builder_config": builder.builder_config.name,
                  "version": str(builder.version), "split": config.data.train_split,
                  "records": int(records), "image_size": int(config.data.image_size)}}


def _differences(want: dict, got: dict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(set(want) | set(got)):
    a, b = want.get(key), got.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _differences(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}: table {b!r}, this run {a!r}")
  return out


class Table:
  """An opened, checked table: codes [records, K, n_img] (memory-mapped), crops K, crop seed."""

  def __init__(self, path: str, codes: np.ndarray, meta: dict):
    self.path, self.codes, self.meta = path, codes, meta
    self.crops, self.seed = int(meta["crops"]), int(meta["crop_seed"])

  def __len__(self) -> int:
    return self.codes.shape[0]

  def row(self, index: int, crop: int) -> np.ndarray:
    return np.asarray(self.codes[index, crop], np.int32)

  @property
  def fingerprint(self) -> dict:
    """Short form for the data iterator's state (a restore with another table is logged)."""
    return {"pretokenized": f"k{self.crops}-{self.meta['tokenizer']['params_sha256'][:12]}"}


def open_table(path: str, want: dict) -> Table:
  """The table at `path` if its metadata matches `want` (expected_meta); else a ValueError naming
  the file and every difference."""
  fix = ("rebuild it with `python -m magvlt_jax.tools.prepare_data --tokenize` and this run's "
         "--config flags, or set config.train.pretokenized='' to encode in the step")
  mpath = meta_path(path)
  if not os.path.exists(path) or not os.path.exists(mpath):
    missing = path if not os.path.exists(path) else mpath
    raise FileNotFoundError(f"config.train.pretokenized: no table at {missing}; {fix}")
  with open(mpath) as f:
    meta = json.load(f)
  diffs = _differences({k: want[k] for k in _FINGERPRINT_KEYS},
                       {k: meta.get(k) for k in _FINGERPRINT_KEYS})
  if diffs:
    raise ValueError(f"config.train.pretokenized: the table {path} was built for another run "
                     f"({'; '.join(diffs)}); {fix}")
  codes = np.load(path, mmap_mode="r")
  n_img = int(np.prod(want["tokenizer"]["grid"]))
  shape = (want["dataset"]["records"], want["crops"], n_img)
  if codes.shape != shape:
    raise ValueError(f"config.train.pretokenized: {path} holds codes of shape {codes.shape}, its "
                     f"metadata {mpath} says {shape} (an interrupted write?); {fix}")
  return Table(path, codes, meta)


def write(path: str, codes_fill, shape, dtype, meta: dict):
  """Writes the .npy (filled by codes_fill(memmap)) then its .json, each through a rename: a
  table with metadata beside it is complete."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  mpath = meta_path(path)
  if os.path.exists(mpath):
    os.remove(mpath)  # never pair old metadata with new codes
  tmp = path + ".tmp.npy"
  out = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=shape)
  codes_fill(out)
  out.flush()
  del out
  os.replace(tmp, path)
  with open(mpath + ".tmp", "w") as f:
    json.dump(meta, f, indent=1)
  os.replace(mpath + ".tmp", mpath)


def for_training(config, image_tokenizer, tokenizer_params, *, workdir=None, data_dir=None):
  """The checked Table the trainer reads, or None where config.train.pretokenized is ''."""
  if not setting(config):
    return None
  from magvlt_jax.data import builders  # pylint: disable=import-outside-toplevel
  from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  data_dir = data_dir or builders.default_data_dir(config, workdir)
  source, _ = pipeline.open_source(config, config.data.train_split, data_dir=data_dir,
                                   all_hosts=True)
  builder = builders.get_builder(config, data_dir)
  path = table_path(config, os.fspath(builder.data_dir))
  t0 = time.time()
  want = expected_meta(config, image_tokenizer, tokenizer_params, builder, len(source),
                       crops_of(config))
  table = open_table(path, want)
  logging.info("image codes: read from the pre-tokenized table %s (%d records x %d crops, "
               "tokenizer hashed and table checked in %.1f s); the train step skips the encoder",
               path, len(table), table.crops, time.time() - t0)
  return table


def build(config, image_tokenizer, tokenizer_params, *, data_dir: str, crops: int,
          chunk: int = 64, show_progress: bool = True) -> tuple[str, dict]:
  """Encodes K crops of every training record; -> (path written, metadata)."""
  from magvlt_jax import parallel  # pylint: disable=import-outside-toplevel
  from magvlt_jax.data import builders  # pylint: disable=import-outside-toplevel
  from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from magvlt_jax.data import transforms  # pylint: disable=import-outside-toplevel
  if crops < 1:
    raise ValueError(f"--crops / config.train.pretokenized_crops={crops} must be positive")
  t0 = time.time()
  source, _ = pipeline.open_source(config, config.data.train_split, data_dir=data_dir)
  builder = builders.get_builder(config, data_dir)
  reader = pipeline.Reader(config, source, None, train=True, seed=0)
  meta = expected_meta(config, image_tokenizer, tokenizer_params, builder, reader.n, crops)
  meta.update(crop_seed=int(config.seed), augmentation="transforms.dalle_crop")
  path = table_path(config, os.fspath(builder.data_dir))
  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.logical_rules(config.mesh.strategy)
  shards = parallel.batch_shards(mesh, rules)
  chunk = -(-max(int(chunk), 1) // shards) * shards  # every shard gets the same rows
  batch = parallel.batch_sharding(mesh, rules)
  encode = parallel.ShardedFunction(image_tokenizer.encode, mesh, rules,
                                    in_shardings=(parallel.replicated(mesh), batch),
                                    out_shardings=batch)
  params = parallel.put_replicated(tokenizer_params, mesh)
  size, n_img = reader.size, image_tokenizer.num_tokens
  dtype = np.uint16 if image_tokenizer.vocab_size <= 2**16 else np.int32
  total = reader.n * crops

  def fill(out):
    flat = out.reshape(total, n_img)  # row i * K + c
    pending = None  # (device codes, first row, rows): fetched after the next chunk is cropped
    bar = tqdm.tqdm(total=reader.n, unit="img", desc=f"tokenize: {crops} crops per image",
                    disable=not show_progress)
    for start in range(0, total, chunk):
      rows = min(chunk, total - start)
      pixels = np.zeros((chunk, size, size, 3), np.uint8)  # fresh: the last call may still read
      for r in range(rows):
        i, c = divmod(start + r, crops)
        if c == 0:
          img = reader.load_image(i)
          bar.update(1)
        pixels[r] = np.asarray(transforms.dalle_crop(img, size, crop_rng(config.seed, i, c)))
      if pending is not None:
        flat[pending[1]:pending[1] + pending[2]] = np.asarray(pending[0])[:pending[2]]
      pending = (encode(params, jax.device_put(pixels, batch)), start, rows)
    if pending is not None:
      flat[pending[1]:pending[1] + pending[2]] = np.asarray(pending[0])[:pending[2]]
    bar.close()

  write(path, fill, (reader.n, crops, n_img), dtype, meta)
  meta["seconds"] = round(time.time() - t0, 1)
  return path, meta
