"""Input pipeline: prepared TFDS dataset (array_record) -> tfds data source -> grain -> host-local
numpy batches. No TensorFlow.

Determinism and resumption: global batch k is a pure function of (dataset, seed, k) and does not
depend on the number of hosts. Its rows are the global stream positions G = k*B .. k*B + B - 1,
position G being record perm_e[G % n] of epoch e = G // n (perm_e a permutation seeded by
(seed, e), shared by all hosts); host h reads the contiguous block of b = B / hosts rows starting
at k*B + h*b, which is where jax.make_array_from_process_local_data puts its rows on a mesh whose
devices are ordered by process. So in every epoch each host reads a disjoint share of the records,
and a run resumed with another number of processes sees exactly the global batches of a
single-process run. Crop, caption choice and BPE-dropout use an RNG seeded by (seed, e, record).
The iterator state is {"next_batch": k, ...}: JSON-able, the same on every host, and a restored
iterator yields exactly the batches an uninterrupted one would.

Batch (numpy, host-local): image uint8 [B,S,S,3]; image_lr uint8 [B,S,S/2,3]; image_tb uint8
[B,S/2,S,3]; text int32 [B,n_txt] (EOS padded); text_length int32 [B] (counts the EOS); eval
batches add captions (list of lists of str), image_id int64 [B] and valid bool [B] (padding rows
of the last batch are False); training batches built with image_codes (data/code_cache.py) or a
pre-tokenized table (data/pretokenized.py: crop c of K drawn per example, pixels rebuilt from the
same crop) add image_codes int32 [B,n_img]. Global arrays: parallel.global_batch(batch, mesh).
"""
import functools
import logging
import os
from typing import Iterator

import grain
import jax
import numpy as np

from magvlt_jax.data import builders
from magvlt_jax.data import pretokenized
from magvlt_jax.data import synthetic as synthetic_lib
from magvlt_jax.data import transforms
from magvlt_jax.data import validate

_STREAM_LENGTH = 2**60  # "infinite" training stream of host-local positions
_MAX_FALLBACKS = 16
_LOG_EVERY = 500  # batches between logs of changed read-time counts (bad records, truncations)


def _hosts(process_index, process_count):
  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f"process_index={pi} must be in [0, process_count={pc})")
  return pi, pc


def _local_batch(global_batch: int, pc: int, key: str) -> int:
  if global_batch % pc:
    raise ValueError(f"{key}={global_batch} is not divisible by the {pc} processes")
  return global_batch // pc


def open_source(config, split: str, *, workdir=None, data_dir=None, all_hosts=False):
  """Prepares the dataset if needed; -> (tfds data source, prepare counts).

  all_hosts: every process calls this now; then, if the dataset still has to be built on a
  multi-host run, host 0 builds it first and the others wait (no race on a shared data_dir)."""
  data_dir = data_dir or builders.default_data_dir(config, workdir)
  if all_hosts and jax.process_count() > 1:
    # Every host takes the barrier, built or not: a host that looked after host 0 had finished
    # building would otherwise skip it while host 0 waits in it (a collective mismatch).
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    if jax.process_index() == 0 and not builders.get_builder(config, data_dir).is_prepared():
      builders.prepare(config, data_dir)
    multihost_utils.sync_global_devices("magvlt_jax.data.prepare")
  builder = builders.get_builder(config, data_dir)
  info = builders.prepare(config, data_dir, builder)  # no-op when built (else: host-local dir)
  if split not in info["splits"]:
    raise ValueError(f"split {split!r} not in dataset {config.data.name} at {info['path']}; "
                     f"available: {sorted(info['splits'])} (config.data.train_split/eval_split)")
  if info["splits"][split] == 0:
    raise ValueError(f"split {split!r} of {info['path']} is empty (all records skipped? "
                     f"counts: {info['counts']})")
  return builder.as_data_source(split), info["counts"]


class Reader:
  """Turns record indices into examples; shared by the train and eval datasets."""

  def __init__(self, config, source, tokenizer, *, train: bool, seed: int, image_codes=None,
               crop_table=None):
    self.source, self.tokenizer, self.train, self.seed = source, tokenizer, train, seed
    self.image_codes = image_codes  # data/code_cache.py: row i = the codes of example i's image
    self.crop_table = crop_table  # data/pretokenized.Table: the codes of K crops per record
    self.size = int(config.data.image_size)
    self.text_length = int(config.sequence.text_length)
    self.dropout = float(config.text.bpe_dropout) if train else 0.0
    self.max_pixels = validate.limits_from_config(config).max_image_pixels
    self.counter = validate.Counter()
    self.n = len(source)

  @functools.lru_cache(maxsize=4)
  def permutation(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(self.n)

  def _decode(self, record, index: int):
    draft = round(9 / 8 * self.size) if self.train else self.size
    try:
      return transforms.decode_image(record["image"], max_pixels=self.max_pixels,
                                     draft_size=draft)
    except transforms.BadImageError as e:
      self.counter.add(f"read_{e.reason}", f"record {index} ({e})")
      logging.warning("data: skipping unreadable record %d (%s)", index, e)
      return None

  def _load(self, index: int, record):
    """-> (record, decoded PIL image, index used); falls forward over unreadable records."""
    for k in range(_MAX_FALLBACKS):
      i = (index + k) % self.n
      record = record if k == 0 else self.source[i]
      img = self._decode(record, i)
      if img is not None:
        return record, img, i
    raise RuntimeError(f"data: {_MAX_FALLBACKS} consecutive unreadable records from {index}; "
                       "re-run tools/prepare_data on the source")

  def load_image(self, index: int):
    """The decoded image example `index` starts from (unreadable records fall forward)."""
    return self._load(index, self.source[index])[1]

  def batch(self, indices, rngs, valid=None) -> dict:
    """Reads the records and stacks their examples."""
    records = [self.source[int(i)] for i in indices]  # __getitems__ starts threads: slower
    examples = [self.example(int(i), r, rng) for i, r, rng in zip(indices, records, rngs)]
    batch = {}
    for key in examples[0]:
      values = [e[key] for e in examples]
      batch[key] = values if key == "captions" else np.stack(values)
    if valid is not None:
      batch["valid"] = np.asarray(valid, bool)
    return batch

  def example(self, index: int, record, rng: np.random.Generator | None) -> dict:
    record, img, used = self._load(index, record)
    captions = [c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)
                for c in record["captions"]]
    codes = None
    if self.train and self.crop_table is not None:
      # A child stream: the caption and BPE-dropout draws below are untouched by the choice.
      crop = int(rng.spawn(1)[0].integers(self.crop_table.crops))
      codes = self.crop_table.row(index, crop)
      img = transforms.dalle_crop(img, self.size,
                                  pretokenized.crop_rng(self.crop_table.seed, index, crop))
    elif self.train:
      img = transforms.dalle_crop(img, self.size, rng)
    else:
      img = transforms.center_crop(img, self.size)
    out = {"image": np.asarray(img), "image_lr": transforms.squeeze(img, "lr"),
           "image_tb": transforms.squeeze(img, "tb")}
    if self.image_codes is not None:
      codes = self.image_codes[index]
    if codes is not None:
      out["image_codes"] = codes
    if self.tokenizer is not None:
      if not captions:
        self.counter.add("read_empty_caption", f"record {used}")
        captions = [""]
      caption = captions[int(rng.integers(len(captions)))] if self.train else captions[0]
      ids, length = self.tokenizer.encode_one(caption, self.text_length, dropout=self.dropout,
                                              rng=rng)
      if length == self.text_length and ids[-1] != self.tokenizer.eos_id:
        self.counter.add("text_truncated")
      out["text"], out["text_length"] = ids, np.int32(length)
    if not self.train:
      out["captions"], out["image_id"] = captions, np.int64(record["image_id"])
    return out


class DataIterator:
  """Host-local batch iterator with JSON-able get_state()/set_state() and bad-data stats."""

  def __init__(self, dataset: grain.MapDataset, reader: Reader, *, threads: int,
               fingerprint: dict, prepare_counts: dict):
    self._dataset, self._reader, self._threads = dataset, reader, threads
    self._fingerprint, self._prepare_counts = fingerprint, prepare_counts
    self._next, self._it, self._logged = 0, None, {}

  def __iter__(self) -> Iterator[dict]:
    return self

  def __next__(self) -> dict:
    if self._it is None:  # started lazily: a set_state right after creation wastes no reads
      opts = grain.ReadOptions(num_threads=self._threads, prefetch_buffer_size=2 * self._threads)
      self._it = iter(self._dataset[self._next:].to_iter_dataset(opts))
    batch = next(self._it)
    self._next += 1
    if self._next % _LOG_EVERY == 0:
      self._log_read_counts()
    return batch

  def _log_read_counts(self):
    counts = self._reader.counter.as_dict()
    if counts != self._logged:
      logging.warning("data: read-time counts after %d batches: %s", self._next, counts)
      self._logged = counts

  def __len__(self) -> int:
    return len(self._dataset)

  def get_state(self) -> dict:
    return {"next_batch": int(self._next), **self._fingerprint}

  def set_state(self, state: dict):
    for key, value in self._fingerprint.items():
      if key in state and state[key] != value:
        logging.warning("data: restoring iterator state saved with %s=%r, now %r: batches after "
                        "the restore differ from the interrupted run", key, state[key], value)
    self._next, self._it = int(state["next_batch"]), None

  @property
  def stats(self) -> dict:
    """{'prepare': counts from building the dataset, 'read': counts while reading}."""
    return {"prepare": dict(self._prepare_counts), "read": self._reader.counter.as_dict()}


def _threads(config) -> int:
  """config.data.num_workers reader threads; 0: half the cores, at most 8 (the rest of a small
  machine is the train step's; PIL decodes and resizes without the GIL)."""
  n = int(config.data.get("num_workers", 0))
  return n if n > 0 else max(1, min(8, (os.cpu_count() or 2) // 2))


def train_records(k: int, global_batch: int, process_index: int, process_count: int, n: int,
                  permutation) -> tuple[list[int], list[int]]:
  """(epochs, record indices) of host `process_index`'s rows of global training batch k (its
  contiguous block of global_batch / process_count rows); permutation(epoch) -> perm of n."""
  local = global_batch // process_count
  epochs, indices = [], []
  start = k * global_batch + process_index * local
  for position in range(start, start + local):
    epoch, j = divmod(position, n)
    epochs.append(epoch)
    indices.append(int(permutation(epoch)[j]))
  return epochs, indices


def create_train_iterator(config, tokenizer=None, *, workdir=None, data_dir=None,
                          process_index=None, process_count=None, seed=None,
                          image_codes=None, pretokenized_table=None) -> DataIterator:
  """Infinite shuffled, augmented training batches of this host (see the module docstring).
  tokenizer=None: images only (the VQGAN trainer). image_codes: int32 [records, n_img] from
  data/code_cache.py, or pretokenized_table: a data/pretokenized.Table; the batches then carry
  `image_codes` (at most one of the two)."""
  pi, pc = _hosts(process_index, process_count)
  global_batch = int(config.data.global_batch_size)
  batch = _local_batch(global_batch, pc, "config.data.global_batch_size")
  source, counts = open_source(config, config.data.train_split, workdir=workdir,
                               data_dir=data_dir,
                               all_hosts=process_index is None and process_count is None)
  seed = int(config.data.shuffle_seed if seed is None else seed)
  if image_codes is not None and pretokenized_table is not None:
    raise ValueError("create_train_iterator: pass image_codes or pretokenized_table, not both")
  for name, codes in (("image_codes", image_codes), ("pretokenized_table", pretokenized_table)):
    if codes is not None and len(codes) != len(source):
      raise ValueError(f"{name} has {len(codes)} rows for {len(source)} training records")
  reader = Reader(config, source, tokenizer, train=True, seed=seed, image_codes=image_codes,
                  crop_table=pretokenized_table)

  def load(k: int) -> dict:
    epochs, indices = train_records(k, global_batch, pi, pc, reader.n, reader.permutation)
    rngs = [np.random.default_rng([seed, e, i]) for e, i in zip(epochs, indices)]
    return reader.batch(indices, rngs)

  ds = grain.MapDataset.range(_STREAM_LENGTH // batch).map(load)
  # No host in the state: it is the same on every host and valid for any number of them.
  fp = {"records": reader.n, "seed": seed, "global_batch": global_batch,
        "split": config.data.train_split,
        **(pretokenized_table.fingerprint if pretokenized_table is not None else {})}
  logging.info("data: %s/%s %d records, global batch %d, local batch %d (host %d of %d)",
               config.data.name, config.data.train_split, reader.n, global_batch, batch, pi, pc)
  return DataIterator(ds, reader, threads=_threads(config), fingerprint=fp,
                      prepare_counts=counts)


def create_eval_iterator(config, tokenizer=None, *, split=None, workdir=None, data_dir=None,
                         process_index=None, process_count=None, batch_size=None) -> DataIterator:
  """One ordered pass over the eval split (resize + centre crop, no dropout). Every host yields
  the same number of batches; rows past the host's share have valid=False."""
  pi, pc = _hosts(process_index, process_count)
  batch = int(batch_size or config.data.eval_batch_size)
  split = split or config.data.eval_split
  source, counts = open_source(config, split, workdir=workdir, data_dir=data_dir)
  reader = Reader(config, source, tokenizer, train=False, seed=0)
  mine = np.arange(pi, reader.n, pc)
  if len(mine) == 0:
    raise ValueError(f"{reader.n} eval records cannot be split over {pc} processes")
  per_host = -(-reader.n // pc)
  num_batches = -(-per_host // batch)

  def load(k: int) -> dict:
    positions = np.arange(k * batch, (k + 1) * batch)
    valid = positions < len(mine)
    indices = mine[np.minimum(positions, len(mine) - 1)]  # padding rows repeat a real record
    return reader.batch(indices, [None] * batch, valid)

  ds = grain.MapDataset.range(num_batches).map(load)
  fp = {"records": reader.n, "batch": batch, "process_index": pi, "process_count": pc,
        "split": split}
  return DataIterator(ds, reader, threads=_threads(config), fingerprint=fp,
                      prepare_counts=counts)


def caption_iterator(config, split=None, *, workdir=None, data_dir=None) -> Iterator[str]:
  """Every caption of a split (raw), e.g. to train the sentencepiece model."""
  split = split or config.data.train_split
  if config.data.name == "synthetic":
    yield from synthetic_captions(config, split)
    return
  source, _ = open_source(config, split, workdir=workdir, data_dir=data_dir)
  for i in range(len(source)):
    for c in source[i]["captions"]:
      yield c.decode("utf-8", "replace") if isinstance(c, bytes) else str(c)


def synthetic_captions(config, split="train") -> Iterator[str]:
  """The synthetic split's captions without rendering to disk (same records as the builder)."""
  c = builders.synthetic_config(config)
  num = c.num_train if split == "train" else c.num_eval
  seed = builders.split_seed(c, split)
  for i in range(num):
    rng = np.random.default_rng([seed, i])
    yield from synthetic_lib.captions(synthetic_lib.scene(rng, c.max_objects), rng,
                                      c.captions_per_image)
