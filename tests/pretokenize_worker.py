"""Runs in a subprocess with 8 fake CPU devices for tests/test_pretokenized.py: builds the
pre-tokenized table of CONFIG_DIR/config.json (its train.pretokenized path) with the encoder's batch
sharded over the 8 devices, and prints one JSON line.

  python tests/pretokenize_worker.py CONFIG_DIR WORKDIR
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # pylint: disable=wrong-import-position

from magvlt_jax import checkpoints  # pylint: disable=wrong-import-position
from magvlt_jax import parallel  # pylint: disable=wrong-import-position
from magvlt_jax.data import pretokenized  # pylint: disable=wrong-import-position
from magvlt_jax.tools import prepare_data  # pylint: disable=wrong-import-position


def main(config_dir, workdir):
  config = checkpoints.load_config(config_dir)
  tok, params = prepare_data.frozen_tokenizer_params(config, workdir)
  mesh = parallel.make_mesh(config.mesh)
  shards = parallel.batch_shards(mesh, parallel.logical_rules(config.mesh.strategy))
  # chunk 8 over 8 shards: one row per device, and a padded last chunk (36 rows = 4 x 8 + 4)
  path, meta = pretokenized.build(config, tok, params, data_dir=config.data.data_dir,
                                  crops=pretokenized.crops_of(config), chunk=8,
                                  show_progress=False)
  print(json.dumps({"devices": jax.device_count(), "shards": shards, "path": path,
                    "records": meta["dataset"]["records"]}))


if __name__ == "__main__":
  main(*sys.argv[1:])
