"""Image tokenizers behind one interface, chosen by `config.image_tokenizer` (default "vqgan").

A tokenizer turns uint8 pixels into a grid of discrete codes and back. Every system (MAGVLT, the
AR baselines, X-LXMERT) takes its image tokens only through this interface, so the trainer,
sampler and evaluation never know which tokenizer they run:

    tok = image_tokenizers.get(config)
    tok.image_size, tok.grid (rows, cols), tok.num_tokens, tok.vocab_size
    codes = tok.encode(params, images_uint8)   # int32 [B, rows * cols], raster order (jittable)
    pixels = tok.decode(params, codes)         # uint8 [B, S, S, 3] (jittable)
    params = tok.load_params(path)             # a params file, a tokenizer dir or a workdir
    params = tok.init_params(rng)              # random params (tests, AOT)
    tok.train(config, workdir)                 # --mode=train_tokenizer: writes WORKDIR/tokenizer

Each kind keeps its own settings in the config section of its name (`config.vqgan`, ...), with
`checkpoint` (user-supplied params; empty: train one into WORKDIR/tokenizer). A new kind is a
module here with an `ImageTokenizer` subclass and a line in `_KINDS`.
"""
import importlib
import logging
import os
from typing import Tuple

# kind -> "module:class"; modules are imported only when their kind is used.
_KINDS = {
    "vqgan": "magvlt_jax.image_tokenizers.vqgan:VQGANTokenizer",
    "augvae": "magvlt_jax.image_tokenizers.augvae:AugVAETokenizer",
    "grid_kmeans": "magvlt_jax.image_tokenizers.grid_kmeans:GridKMeansTokenizer",
}
DEFAULT_KIND = "vqgan"


class ImageTokenizer:
  """Base class; see the module docstring. `cfg` is the tokenizer's own config section."""
  kind = ""

  def __init__(self, cfg):
    self.cfg = cfg

  # ------------------------------------------------------------------ geometry
  @property
  def image_size(self) -> int:
    return int(self.cfg.image_size)

  @property
  def grid(self) -> Tuple[int, int]:
    raise NotImplementedError

  @property
  def num_tokens(self) -> int:
    rows, cols = self.grid
    return rows * cols

  @property
  def vocab_size(self) -> int:
    raise NotImplementedError

  # ------------------------------------------------------------------ pure functions
  def encode(self, params, images_uint8):
    raise NotImplementedError

  def decode(self, params, codes):
    raise NotImplementedError

  # ------------------------------------------------------------------ params, files, training
  def init_params(self, rng, boxed: bool = False):
    """Random params of the configured shapes (tests, AOT compiles); `boxed` keeps the logical
    axis metadata (nn.LogicallyPartitioned leaves)."""
    raise NotImplementedError

  def load_params(self, path: str):
    raise NotImplementedError

  def has_params(self, workdir: str) -> bool:
    raise NotImplementedError

  def train(self, config, workdir: str):
    raise NotImplementedError

  def validate(self, config):
    """Checks the tokenizer's config section (ValueError naming the key); extra checks go in
    subclasses."""


def kind_of(config) -> str:
  kind = config.get("image_tokenizer", DEFAULT_KIND)
  if kind not in _KINDS:
    raise ValueError(f"config.image_tokenizer={kind!r} is not a known image tokenizer; use one of "
                     f"{sorted(_KINDS)}")
  return kind


def section_of(config):
  """The tokenizer's own config section (config.<kind>)."""
  kind = kind_of(config)
  if kind not in config:
    raise ValueError(f"config.image_tokenizer={kind!r} but the config has no `{kind}` section; "
                     f"add config.{kind} (see configs/{kind}.py)")
  return config[kind]


def get(config) -> ImageTokenizer:
  """The image tokenizer a full system config selects."""
  module, _, cls = _KINDS[kind_of(config)].partition(":")
  return getattr(importlib.import_module(module), cls)(section_of(config))


def tokenizer_dir(workdir: str) -> str:
  return os.path.join(workdir, "tokenizer")


def find_params_file(path: str, kind: str, filename: str = "params.npz") -> str:
  """The .npz at `path`, PATH/params.npz or PATH/tokenizer/params.npz (a tokenizer dir or a workdir)."""
  for f in (path, os.path.join(path, filename), os.path.join(tokenizer_dir(path), filename)):
    if os.path.isfile(f) and f.endswith(".npz"):
      return f
  raise FileNotFoundError(f"{kind}.load_params: no tokenizer params at {path} (looked for an .npz, "
                          f"{filename} and tokenizer/{filename})")


def load_checked_npz(path: str, kind: str, abstract, what: str):
  """Params ('a/b/c' -> array npz) from find_params_file(path), every key and shape checked against
  the `abstract` tree; ValueError names config.<kind> (`what`: variant and sizes) and the bad keys."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  from magvlt_jax.models import vqgan  # pylint: disable=import-outside-toplevel
  where = find_params_file(path, kind)
  with np.load(where) as f:
    params = vqgan.unflatten_params({k: f[k] for k in f.files})
  want, got = vqgan.flatten_params_shapes(abstract), vqgan.flatten_params_shapes(params)
  bad = sorted(k for k in set(want) | set(got)
               if k not in want or k not in got or tuple(want[k].shape) != tuple(np.shape(got[k])))
  if bad:
    raise ValueError(f"{where} does not match config.{kind} ({what}): missing, extra or mis-shaped: {bad[:20]}")
  return params


def params_for_run(config, workdir: str):
  """Tokenizer params for a run: config.<kind>.checkpoint, else WORKDIR/tokenizer, trained there
  first when absent."""
  tok = get(config)
  if tok.cfg.get("checkpoint", ""):
    return tok.load_params(tok.cfg.checkpoint)
  if not tok.has_params(workdir):
    logging.info("no %s image tokenizer in %s and config.%s.checkpoint is empty: training one",
                 tok.kind, tokenizer_dir(workdir), tok.kind)
    tok.train(config, workdir)
  return tok.load_params(workdir)
