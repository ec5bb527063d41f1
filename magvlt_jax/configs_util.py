"""Loading configs from `path.py:variant` strings and validating them at start-up.

Every error names the offending key and what to change, e.g.
  ValueError: config.model.embed_dim=130 is not divisible by config.model.num_heads=4; ...
"""
import ast
import difflib
import importlib.util
import os

from magvlt_jax.models.layers import ATTENTION_IMPLS, DTYPE_NAMES as DTYPES

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DECODING_ORDERS = ("maskgit", "mask_predict", "random", "raster")
MESH_STRATEGIES = ("data", "fsdp", "fsdp_tensor")
DATASETS = ("synthetic", "coco_captions_folder", "image_text_list")
RERANKERS = ("auto", "clip", "likelihood", "none")
RECONSTRUCTION_LOSSES = ("l1", "l2")


def apply_override(config, item: str):
  """Applies one `key.path=value` override (value a Python literal, else the raw string), as the
  benchmark scripts take them on their command lines."""
  key, _, raw = item.partition("=")
  if not raw:
    raise SystemExit(f"override {item!r}: expected key=value")
  *path, leaf = key.split(".")
  node = config
  for depth, part in enumerate(path + [leaf]):  # a typo'd key fails naming it (no new key)
    if not hasattr(node, "keys") or part not in node:
      close = difflib.get_close_matches(part, list(node.keys()) if hasattr(node, "keys") else [])
      where = ".".join(["config"] + path[:depth])
      raise SystemExit(f"override {item!r}: {where} has no key {part!r}"
                       + (f"; did you mean {', '.join(close)}?" if close else ""))
    if depth < len(path):
      node = node[part]
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    value = raw
  node[leaf] = value


def load_config(spec: str):
  """Loads `path/to/config.py[:variant]` via importlib and returns get_config(variant).

  Relative paths are tried against the working directory, then the repository root.
  """
  path, _, variant = spec.partition(":")
  candidates = [path, os.path.join(_REPO_ROOT, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise ValueError(f"load_config: config file {path!r} not found (tried {candidates})")
  name = "_magvlt_config_" + os.path.splitext(os.path.basename(found))[0]
  module_spec = importlib.util.spec_from_file_location(name, found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"load_config: {found} defines no get_config()")
  return module.get_config(variant) if variant else module.get_config()


def load_sibling(config_file: str, name: str, variant: str):
  """get_config(variant) of the config file `name` in config_file's folder: how a system config
  builds on another (argvlt.py on magvlt.py) or nests a tokenizer's (magvlt.py nests vqgan.py)."""
  folder = os.path.dirname(os.path.abspath(config_file))
  return load_config(f"{os.path.join(folder, name)}:{variant}")


def _fail(key, value, problem, fix):
  raise ValueError(f"config.{key}={value!r} {problem}; {fix}")


def _one_of(config, key, choices):
  value = _get(config, key)
  if value not in choices:
    _fail(key, value, "is not a known value", f"use one of {list(choices)}")


def _positive(config, key, allow_zero=False):
  value = _get(config, key)
  ok = isinstance(value, (int, float)) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    _fail(key, value, "must be " + ("non-negative" if allow_zero else "positive"),
          "set a number " + (">= 0" if allow_zero else "> 0"))


def _get(config, key):
  node = config
  for part in key.split("."):
    if part not in node:
      raise ValueError(f"config.{key} is missing; add it (see configs/magvlt.py)")
    node = node[part]
  return node


def _validate_model(config):
  m = config.model
  for key in ("num_layers", "embed_dim", "num_heads", "mlp_ratio", "length_classes"):
    _positive(config, f"model.{key}")
  if m.embed_dim % m.num_heads:
    _fail("model.embed_dim", m.embed_dim, f"is not divisible by config.model.num_heads={m.num_heads}",
          "choose embed_dim = num_heads * head_dim")
  for key in ("dropout_rate", "attention_dropout_rate", "embedding_dropout_rate"):
    value = _get(config, f"model.{key}")
    if not 0.0 <= value < 1.0:
      _fail(f"model.{key}", value, "must be in [0, 1)", "use e.g. 0.1 (or 0.0 to disable)")
  _positive(config, "model.layer_norm_eps")
  if "init_std" in m:
    _positive(config, "model.init_std")
  _one_of(config, "model.dtype", DTYPES)
  _one_of(config, "model.param_dtype", DTYPES)
  _one_of(config, "model.attention_impl", ATTENTION_IMPLS)
  _validate_arch(config)


def _validate_arch(config):
  """config.model.arch (transformer.ARCHS) and the two-stream layer counts."""
  from magvlt_jax.models import transformer  # pylint: disable=import-outside-toplevel
  if "arch" in config.model:
    _one_of(config, "model.arch", tuple(transformer.ARCHS))
  if config.model.get("arch", "single_stream") != "two_stream":
    return
  for key in ("language_layers", "relation_layers", "cross_layers"):
    value = _get(config, f"model.two_stream.{key}")
    if not isinstance(value, int) or value < 0:
      _fail(f"model.two_stream.{key}", value, "must be a non-negative int", "e.g. 9 / 5 / 5")
  for key in ("causal", "scan_layers"):
    if config.model.get(key, False):
      _fail(f"model.{key}", True, "is not supported by the two-stream transformer",
            f"set config.model.{key}=False")


def validate_vqgan(config):
  """config.vqgan (called by the vqgan image tokenizer's validate)."""
  v = config.vqgan
  _one_of(config, "vqgan.dtype", DTYPES)
  _one_of(config, "vqgan.param_dtype", DTYPES)
  for key in ("image_size", "base_channels", "codebook_size", "embed_dim", "z_channels"):
    _positive(config, f"vqgan.{key}")
  if len(v.channel_mult) < 1:
    _fail("vqgan.channel_mult", v.channel_mult, "is empty", "give one multiplier per level")
  factor = 2 ** (len(v.channel_mult) - 1)
  if v.image_size % factor:
    _fail("vqgan.image_size", v.image_size,
          f"is not divisible by the downsampling factor 2**(len(vqgan.channel_mult)-1)={factor}",
          f"use a multiple of {factor}")
  if v.base_channels % v.norm_groups or any((v.base_channels * c) % v.norm_groups for c in v.channel_mult):
    _fail("vqgan.norm_groups", v.norm_groups, "does not divide every level's channel count",
          "pick a divisor of vqgan.base_channels * each channel_mult")
  _one_of(config, "vqgan.loss.reconstruction", RECONSTRUCTION_LOSSES)
  if "norm_type" in v:
    _one_of(config, "vqgan.norm_type", ("group", "layer"))


def _validate_image_tokenizer(config):
  """The tokenizer's own section, then the transformer's image side against its grid and codes."""
  from magvlt_jax import image_tokenizers  # pylint: disable=import-outside-toplevel
  tok = image_tokenizers.get(config)
  tok.validate(config)
  s, kind = config.sequence, tok.kind
  rows, cols = tok.grid
  if s.image_tokens != tok.num_tokens:
    _fail("sequence.image_tokens", s.image_tokens,
          f"does not match the {kind} code grid {rows}x{cols} of config.{kind} "
          f"(config.image_tokenizer={kind!r})", f"set it to {tok.num_tokens}")
  if s.image_vocab_size != tok.vocab_size:
    _fail("sequence.image_vocab_size", s.image_vocab_size,
          f"differs from the {kind} vocabulary size {tok.vocab_size} (config.{kind})",
          "set it to the tokenizer's codebook size")
  if config.data.image_size != tok.image_size:
    _fail("data.image_size", config.data.image_size,
          f"differs from config.{kind}.image_size={tok.image_size}", "set both to the same size")


def _validate_sequence(config):
  s, m = config.sequence, config.model
  for key in ("text_length", "image_tokens", "image_vocab_size", "text_vocab_size"):
    _positive(config, f"sequence.{key}")
  if s.text_length != m.length_classes:
    _fail("sequence.text_length", s.text_length,
          f"differs from model.length_classes={m.length_classes} (the length head predicts 1..text_length)",
          "set model.length_classes = sequence.text_length")
  if config.text.vocab_size > s.text_vocab_size:
    _fail("text.vocab_size", config.text.vocab_size,
          f"exceeds sequence.text_vocab_size={s.text_vocab_size} (rows of the token table)",
          "lower text.vocab_size or raise sequence.text_vocab_size")
  if "kind" in config.text:
    _one_of(config, "text.kind", ("sentencepiece", "clip_bpe"))
  if not 0.0 <= config.text.bpe_dropout < 1.0:
    _fail("text.bpe_dropout", config.text.bpe_dropout, "must be in [0, 1)", "use 0.1 or 0.0")


def _validate_train(config):
  """The loop and optimizer; the objective checks its own train.* keys."""
  from magvlt_jax import objectives  # pylint: disable=import-outside-toplevel
  objectives.validate_config(config)
  for key in ("num_steps", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints",
              "max_nonfinite_in_row"):
    _positive(config, f"train.{key}")
  if "cache_image_codes" in config.train:
    from magvlt_jax.data import code_cache  # pylint: disable=import-outside-toplevel
    _one_of(config, "train.cache_image_codes", code_cache.MODES)
  _validate_pretokenized(config)
  o = config.optimizer
  _positive(config, "optimizer.peak_lr")
  _positive(config, "optimizer.warmup_steps", allow_zero=True)
  _positive(config, "optimizer.grad_clip_norm")
  _positive(config, "optimizer.weight_decay", allow_zero=True)
  for key in ("b1", "b2"):
    if not 0.0 <= o[key] < 1.0:
      _fail(f"optimizer.{key}", o[key], "must be in [0, 1)", "use e.g. 0.9 / 0.96")


def _validate_pretokenized(config):
  """train.pretokenized: '' | 'auto' | a .npy path; train.pretokenized_crops: K >= 1. Whether the
  table exists and matches is checked when the trainer opens it (data/pretokenized.py)."""
  value = config.train.get("pretokenized", "")
  if not isinstance(value, str):
    _fail("train.pretokenized", value, "must be a string",
          "use '' (off), 'auto' (the table prepare_data --tokenize writes) or a .npy path")
  if value not in ("", "auto") and not value.endswith(".npy"):
    _fail("train.pretokenized", value, "is neither '', 'auto' nor a .npy path",
          "use '' (off), 'auto' or the .npy file prepare_data --tokenize printed")
  crops = config.train.get("pretokenized_crops", 8)
  if not isinstance(crops, int) or crops < 1:
    _fail("train.pretokenized_crops", crops, "must be a positive int",
          "use the --crops the table was built with (default 8)")


def _validate_data(config):
  d = config.data
  _one_of(config, "data.name", DATASETS)
  if d.name != "synthetic" and not d.path:
    _fail("data.path", d.path, f"is empty but data.name={d.name!r} reads from a source",
          "pass --config.data.path=DIR_OR_FILE (or use data.name=synthetic)")
  for key in ("global_batch_size", "eval_batch_size"):
    _positive(config, f"data.{key}")
  _positive(config, "data.num_workers", allow_zero=True)


def _validate_decoding_and_mesh(config):
  dec = config.decoding
  from magvlt_jax import decoders  # pylint: disable=import-outside-toplevel
  decoders.kind_of(config)
  _one_of(config, "decoding.order", DECODING_ORDERS)
  _one_of(config, "decoding.rerank", RERANKERS)
  for key in ("t2i_steps", "i2t_steps", "text_top_k", "num_image_candidates", "num_text_candidates"):
    _positive(config, f"decoding.{key}")
  for key in ("image_temperature", "gumbel_scale"):
    value = tuple(dec[key])
    if len(value) != 2 or min(value) < 0:
      _fail(f"decoding.{key}", value, "must be a (start, end) pair of non-negative numbers",
            "e.g. (1.4, 0.6)")
  if dec.text_top_k > config.sequence.text_vocab_size:
    _fail("decoding.text_top_k", dec.text_top_k, "exceeds sequence.text_vocab_size",
          "use a smaller top-k (32)")
  lo, hi = tuple(dec.uncond_text_length)
  if not 1 <= lo <= hi <= config.sequence.text_length:
    _fail("decoding.uncond_text_length", (lo, hi), "must satisfy 1 <= lo <= hi <= sequence.text_length",
          f"e.g. (8, {min(16, config.sequence.text_length)})")
  probe = dec.get("length_probe_text_length", 0)
  if not 0 <= probe <= config.sequence.text_length:
    _fail("decoding.length_probe_text_length", probe, "must be in [0, sequence.text_length]",
          "0 (every text slot, ours) or 16 (the official sampler)")
  mesh = config.mesh
  _one_of(config, "mesh.strategy", MESH_STRATEGIES)
  _positive(config, "mesh.num_slices")
  for key in ("data", "fsdp", "tensor"):
    if mesh[key] != -1 and mesh[key] < 1:
      _fail(f"mesh.{key}", mesh[key], "must be -1 (fill with the remaining devices) or positive",
            "use -1 on one axis or a device count")
  if [mesh.data, mesh.fsdp, mesh.tensor].count(-1) > 1:
    _fail("mesh.data", mesh.data, f"and mesh.fsdp={mesh.fsdp}, mesh.tensor={mesh.tensor} use -1 more "
          "than once", "give -1 (fill) to at most one axis")
  if mesh.tensor != 1 and mesh.strategy != "fsdp_tensor":
    # Only fsdp_tensor maps anything onto 'tensor'; elsewhere those devices would repeat work.
    _fail("mesh.tensor", mesh.tensor, f"is unused by mesh.strategy={mesh.strategy!r}",
          "set mesh.strategy=fsdp_tensor or mesh.tensor=1")
  if mesh.tensor > 1 and config.model.num_heads % mesh.tensor:
    _fail("mesh.tensor", mesh.tensor, f"does not divide model.num_heads={config.model.num_heads}",
          "pick a divisor of num_heads")


def validate_config(config):
  """Checks value ranges and cross-key consistency; raises ValueError naming the key and the fix.

  Returns the config unchanged so it can be chained: `config = validate_config(load_config(...))`.
  """
  _validate_model(config)
  _validate_sequence(config)
  _validate_image_tokenizer(config)
  _validate_train(config)
  _validate_data(config)
  _validate_decoding_and_mesh(config)
  return config
