"""Builds a dataset ahead of training and prints what was converted or skipped.

  python -m magvlt_jax.tools.prepare_data --config=configs/magvlt.py:tiny \
      --config.data.name=coco_captions_folder --config.data.path=/data/coco --data_dir=/data/tfds

Then train with the same --config.data.* flags and --config.data.data_dir=/data/tfds (or pass
--workdir=WORKDIR here and the dataset goes to WORKDIR/data, where training looks by default).
--text_tokenizer also trains the sentencepiece model into WORKDIR/text/spm.model.
"""
import logging as std_logging

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
  return config_flags.DEFINE_config_file("config", None, "e.g. configs/magvlt.py:tiny",
                                         lock_config=True)


def prepare(config, data_dir=None, workdir=None, text_tokenizer=False) -> dict:
  """Importable version of the command; returns builders.prepare's summary."""
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
  prepare(config, flags.FLAGS.data_dir, flags.FLAGS.workdir, flags.FLAGS.text_tokenizer)


if __name__ == "__main__":
  define_flags()
  app.run(main)
