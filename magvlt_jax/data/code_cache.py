"""Image codes of the training set, encoded once with the frozen tokenizer (config.train.cache_image_codes).

The train step otherwise runs the tokenizer's encoder on every batch: on the tiny config that is
about an eighth of the step's FLOPs (benchmarks/bench_encoder_flops.py), spent again every epoch on
the same images. The cache is exact only where the training crop is the identity, i.e. every
training image is already image_size x image_size (the built-in synthetic data): then the codes the
step would compute are a function of the record alone. Larger images get a random crop per epoch,
so their codes change with it and stay encoded in the step.

  "auto"  cache when every training image is image_size square, else encode in the step (logged);
  "on"    cache, and a ValueError naming the first record that is not image_size square;
  "off"   always encode in the step.

Every host encodes the whole training set (each reads other records in every epoch). Rebuilt at
every start (a pure function of the tokenizer params and the records, so a resumed run reads the
same codes). MixSel's half-image contexts are still encoded in the step.
"""
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

MODES = ("auto", "on", "off")
_BATCH = 128  # images per encoder call (one compiled shape; the last chunk is padded)


def mode_of(config) -> str:
  mode = str(config.train.get("cache_image_codes", "off"))
  if mode not in MODES:
    raise ValueError(f"config.train.cache_image_codes={mode!r}; expected one of {MODES}")
  return mode


def build(config, encode_fn, tokenizer_params, *, workdir=None, data_dir=None) -> np.ndarray | None:
  """int32 [records, n_img]: the codes of every training record (row i: what the training
  pipeline's example i shows the encoder), or None where the cache is off or not exact."""
  mode = mode_of(config)
  if mode == "off":
    return None
  from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  t0 = time.time()
  # Called by every process at the same point of the trainer: host 0 prepares the dataset once.
  source, _ = pipeline.open_source(config, config.data.train_split, workdir=workdir,
                                   data_dir=data_dir, all_hosts=True)
  reader = pipeline.Reader(config, source, None, train=True, seed=0)
  size = reader.size
  encode = jax.jit(encode_fn)
  chunk = np.zeros((_BATCH, size, size, 3), np.uint8)
  chunks = []
  for i in range(reader.n):
    img = reader.load_image(i)
    if img.size != (size, size):
      where = (f"training record {i} is {img.size[0]}x{img.size[1]}, not config.data.image_size "
               f"{size} square, so its random training crop changes its codes every epoch")
      if mode == "on":
        raise ValueError(f"config.train.cache_image_codes='on': {where}; use 'auto' or 'off'")
      logging.info("image codes: encoded in the train step (%s)", where)
      return None
    chunk[i % _BATCH] = np.asarray(img)
    if i % _BATCH == _BATCH - 1 or i == reader.n - 1:
      # The last chunk keeps stale rows past its end (one compiled shape); they are dropped.
      codes = np.asarray(encode(tokenizer_params, jnp.asarray(chunk)), np.int32)
      chunks.append(codes[:i % _BATCH + 1])
  table = np.concatenate(chunks)
  logging.info("image codes: %d training images encoded once in %.1f s (%d codes each); the train "
               "step reads them instead of running the encoder", reader.n, time.time() - t0,
               table.shape[1])
  return table
