"""magvlt_jax entry point.

  python -m magvlt_jax.main --config=configs/magvlt.py:tiny --workdir=/tmp/magvlt [--mode=train]

Modes: train (default: image tokenizer first if needed, then the transformer, then final
samples), train_tokenizer, train_generator (X-LXMERT's k-means vocabulary + SPADE generator,
config.grid_kmeans: k-means resumes or is skipped when done), describe (parameter overview ending in `total params: N`), sample
(magvlt_jax.sample_job), evaluate (magvlt_jax.evaluation.evaluate). Any config value can be
overridden: --config.train.num_steps=100 --config.data.path=DIR ...
"""
import logging as std_logging

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

MODES = ("train", "train_tokenizer", "train_generator", "describe", "sample", "evaluate")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/magvlt.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, samples and logs.")
_MODE = flags.DEFINE_enum("mode", "train", MODES, "What to run.")


def run(config, workdir: str, mode: str):
  """Runs `mode` (importable, e.g. from a notebook). Returns the mode's result."""
  from magvlt_jax import configs_util  # pylint: disable=import-outside-toplevel
  configs_util.validate_config(config)
  if mode == "describe":
    from magvlt_jax.train import describe  # pylint: disable=import-outside-toplevel
    text = describe.describe(config)
    print(text, flush=True)
    return text
  if not workdir:
    raise app.UsageError(f"--workdir is required for --mode={mode}")
  if mode == "train":
    from magvlt_jax.train import trainer  # pylint: disable=import-outside-toplevel
    return trainer.train_and_evaluate(config, workdir)
  if mode == "train_tokenizer":
    from magvlt_jax import checkpoints  # pylint: disable=import-outside-toplevel
    from magvlt_jax import image_tokenizers  # pylint: disable=import-outside-toplevel
    checkpoints.save_config(workdir, config)
    return image_tokenizers.get(config).train(config, workdir)
  if mode == "train_generator":
    from magvlt_jax import checkpoints  # pylint: disable=import-outside-toplevel
    from magvlt_jax import image_tokenizers  # pylint: disable=import-outside-toplevel
    if image_tokenizers.kind_of(config) != "grid_kmeans":
      raise app.UsageError("--mode=train_generator trains X-LXMERT's SPADE generator: set "
                           "config.image_tokenizer=grid_kmeans (settings in config.grid_kmeans)")
    from magvlt_jax.train import generator_trainer  # pylint: disable=import-outside-toplevel
    checkpoints.save_config(workdir, config)
    return generator_trainer.train_tokenizer(config, workdir)
  if mode == "sample":
    from magvlt_jax import sample_job  # pylint: disable=import-outside-toplevel
    return sample_job.run(config, workdir)
  from magvlt_jax.evaluation import evaluate  # pylint: disable=import-outside-toplevel
  return evaluate.run(config, workdir)


class _QuietLibraries(std_logging.Filter):
  """Drops INFO chatter of orbax/tfds/grain (dozens of lines per checkpoint); warnings pass."""
  _NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/")

  def filter(self, record):
    return record.levelno >= std_logging.WARNING or not any(
        p in (record.pathname or "") for p in self._NOISY)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if _CONFIG.value is None:
    raise app.UsageError("--config is required, e.g. --config=configs/magvlt.py:tiny")
  std_logging.getLogger("absl").setLevel(std_logging.INFO)
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from magvlt_jax import parallel  # pylint: disable=import-outside-toplevel
  parallel.initialize_distributed(_CONFIG.value)  # before any other JAX call (multi-host)
  run(_CONFIG.value, _WORKDIR.value, _MODE.value)


if __name__ == "__main__":
  app.run(main)
