"""Builds a dataset ahead of training and prints what was converted or skipped.

  python -m magvlt_jax.tools.prepare_data --config=configs/magvlt.py:tiny \
      --config.data.name=coco_captions_folder --config.data.path=/data/coco --data_dir=/data/tfds

Then train with the same --config.data.* flags and --config.data.data_dir=/data/tfds (or pass
--workdir=WORKDIR here and the dataset goes to WORKDIR/data, where training looks by default).
--text_tokenizer also trains the sentencepiece model into WORKDIR/text/spm.model.

--tokenize [--crops=K] also encodes K augmented crops of every training image with the frozen image
tokenizer (config.<kind>.checkpoint, else WORKDIR/tokenizer; it is never trained here) into a table
beside the dataset (data/pretokenized.py; config.train.pretokenized names another .npy path); train
with --config.train.pretokenized=auto (or that path) and --config.train.pretokenized_crops=K. One
process writes it; the encoder's batch is sharded over this machine's devices (config.mesh).
"""
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

def define_flags():
  """Defined only when run as a program, so importing this module (tests, notebooks) does not
  clash with other modules' absl flags such as main.py's --config."""
  flags.DEFINE_string("data_dir", None, "Where to write the dataset (default: "
                      "config.data.data_dir, else WORKDIR/data, else ~/tensorflow_datasets).")
  flags.DEFINE_string("workdir", None, "Training workdir (dataset in WORKDIR/data).")
  flags.DEFINE_bool("text_tokenizer", False, "Also train WORKDIR/text/spm.model.")
  flags.DEFINE_bool("tokenize", False, "Also encode K augmented crops per training image with "
                    "the frozen image tokenizer (for config.train.pretokenized).")
  flags.DEFINE_integer("crops", None, "K for --tokenize (default config.train.pretokenized_crops).")
  flags.DEFINE_integer("tokenize_batch", 64, "Images per encoder call for --tokenize (rounded up "
                       "to a multiple of the data shards).")
  return config_flags.DEFINE_config_file("config", None, "e.g. configs/magvlt.py:tiny",
                                         lock_config=True)


def frozen_tokenizer_params(config, workdir):
  """The image tokenizer's params as training would load them, without ever training one."""
  from magvlt_jax import image_tokenizers  # pylint: disable=import-outside-toplevel
  tok = image_tokenizers.get(config)
  if tok.cfg.get("checkpoint", ""):
    return tok, tok.load_params(tok.cfg.checkpoint)
  if workdir and tok.has_params(workdir):
    return tok, tok.load_params(workdir)
  where = (f"{image_tokenizers.tokenizer_dir(workdir)} has none" if workdir
           else "no --workdir was given")
  raise app.UsageError(
      f"--tokenize needs the frozen {tok.kind} image tokenizer: config.{tok.kind}.checkpoint is "
      f"empty and {where}; pass --config.{tok.kind}.checkpoint=PATH or train one first "
      f"(python -m magvlt_jax.main --mode=train_tokenizer --workdir=WORKDIR)")


def tokenize(config, data_dir, workdir=None, crops=None, chunk=64) -> list[str]:
  """--tokenize: writes the pre-tokenized table; -> summary lines."""
  from magvlt_jax.data import pretokenized  # pylint: disable=import-outside-toplevel
  tok, params = frozen_tokenizer_params(config, workdir)
  crops = int(crops or pretokenized.crops_of(config))
  path, meta = pretokenized.build(config, tok, params, data_dir=data_dir, crops=crops, chunk=chunk)
  d, t = meta["dataset"], meta["tokenizer"]
  lines = [f"  pre-tokenized: {path} ({d['records']} records x {crops} crops x "
           f"{t['grid'][0] * t['grid'][1]} codes, {os.path.getsize(path) / 2**20:.1f} MiB, "
           f"{meta['seconds']} s; {t['kind']} params sha256 {t['params_sha256'][:12]}, crop seed "
           f"{meta['crop_seed']}); metadata {pretokenized.meta_path(path)}"]
  flag = ("auto" if pretokenized.setting(config) in ("", "auto") else pretokenized.setting(config))
  lines.append(f"  train with: --config.train.pretokenized={flag} "
               f"--config.train.pretokenized_crops={crops}")
  return lines


def prepare(config, data_dir=None, workdir=None, text_tokenizer=False, tokenize_crops=0,
            tokenize_batch=64) -> dict:
  """Importable version of the command; returns builders.prepare's summary. tokenize_crops > 0:
  also --tokenize with that K."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  from magvlt_jax.data import builders  # pylint: disable=import-outside-toplevel
  tfds.disable_progress_bar()  # ours (tqdm over source images) is the one to watch
  builders.SHOW_PROGRESS = True
  data_dir = data_dir or builders.default_data_dir(config, workdir)
  info = builders.prepare(config, data_dir)
  lines = [f"dataset {config.data.name} -> {info['path']}"]
  lines += [f"  split {k}: {v} records" for k, v in sorted(info["splits"].items())]
  counts = dict(info["counts"])
  kept = counts.pop("kept", 0)
  lines.append(f"  kept {kept} images; converted/skipped: " + (
      ", ".join(f"{k}={v}" for k, v in sorted(counts.items())) if counts else "none"))
  for reason, examples in sorted(info["examples"].items()):
    if reason != "kept":
      lines += [f"    {reason}: {e}" for e in examples[:3]]
  if text_tokenizer:
    if not workdir:
      raise app.UsageError("--text_tokenizer needs --workdir (the model goes to WORKDIR/text/)")
    from magvlt_jax import text  # pylint: disable=import-outside-toplevel
    from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    tok = text.get_or_train_tokenizer(
        config, workdir, lambda: pipeline.caption_iterator(config, data_dir=data_dir))
    lines.append(f"  text tokenizer: {text.spm_model_path(config, workdir)} ({tok.vocab_size} ids)")
  if tokenize_crops:
    lines += tokenize(config, data_dir, workdir, tokenize_crops, tokenize_batch)
  if not workdir and not config.data.data_dir:
    lines.append(f"  train with: --config.data.data_dir={data_dir}")
  print("\n".join(lines), flush=True)
  return info


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = flags.FLAGS.config
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/magvlt.py:tiny")
  std_logging.getLogger("absl").setLevel(std_logging.INFO)
  logging.set_verbosity(logging.INFO)
  f = flags.FLAGS
  crops = 0
  if f.tokenize:
    from magvlt_jax.data import pretokenized  # pylint: disable=import-outside-toplevel
    crops = f.crops if f.crops is not None else pretokenized.crops_of(config)
    if crops < 1:
      raise app.UsageError(f"--crops={crops} must be positive")
  elif f.crops is not None:
    raise app.UsageError("--crops is the K of --tokenize; pass --tokenize too")
  prepare(config, f.data_dir, f.workdir, f.text_tokenizer, crops, f.tokenize_batch)


if __name__ == "__main__":
  define_flags()
  app.run(main)
