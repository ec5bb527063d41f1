"""Fits X-LXMERT's visual vocabulary: mini-batch k-means over the grid features of the training set.

  python -m magvlt_jax.tools.fit_kmeans --config=configs/magvlt.py:tiny \
      --config.image_tokenizer=grid_kmeans --workdir=/tmp/xlx

Writes WORKDIR/tokenizer/kmeans.npz (centroids, counts, step; resumed when present: an interrupted
run continues on the batches an uninterrupted one would see). Settings: config.grid_kmeans.kmeans
(batch_size images per step, num_steps, log_every, save_every) and num_clusters. The grid features
come from the pixel pipeline through the frozen backbone (feature_source effnet_lite0), or from the
user's .npz (feature_source npz, shuffled per epoch). With several devices the batch is split over
the mesh's data axes (single process only: the pixel batches are host-local).
"""
import functools
import logging
import math
import os

import jax
import numpy as np
from absl import app
from absl import flags
from ml_collections import config_flags

from magvlt_jax import kmeans
from magvlt_jax.image_tokenizers import tokenizer_dir
from magvlt_jax.models import grid_features


def state_path(workdir: str) -> str:
  return os.path.join(tokenizer_dir(workdir), "kmeans.npz")


def _image_feature_batches(config, workdir, backbone):
  """batches(start): features [B * g * g, D] of the training images from batch `start` on."""
  from magvlt_jax.train import vqgan_io  # pylint: disable=import-outside-toplevel
  gcfg = config.grid_kmeans
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():  # the image iterator reads the tokenizer section's train.batch_size
    cfg.grid_kmeans.train.batch_size = gcfg.kmeans.batch_size
  feats_fn = jax.jit(functools.partial(grid_features.grid_features, cfg=gcfg))

  def batches(start):
    it = vqgan_io.train_images(cfg, workdir, data_state={"next_batch": int(start)})
    for images in it:
      f = np.asarray(feats_fn(backbone, images))
      yield f.reshape(-1, f.shape[-1])
  return batches


def _npz_feature_batches(gcfg):
  source = grid_features.NpzFeatures(gcfg.features_npz, int(gcfg.grid))
  if source.dim != int(gcfg.feature_dim):
    raise ValueError(f"{gcfg.features_npz}: features are {source.dim}-d but config.grid_kmeans.feature_dim="
                     f"{gcfg.feature_dim}; set it to {source.dim}")

  def batches(start):
    for f in source.batches(int(gcfg.kmeans.batch_size), start, seed=int(gcfg.seed)):
      yield f.reshape(-1, f.shape[-1])
  return batches


def fit_vocabulary(config, workdir, backbone=None):
  """Runs / resumes k-means; returns (centroids [K, D] np.float32, history)."""
  gcfg = config.grid_kmeans
  if gcfg.feature_source == "npz":
    batches = _npz_feature_batches(gcfg)
  else:
    if backbone is None:
      backbone = grid_features.load_backbone(gcfg.backbone_weights, (gcfg.feature_layer,))
    batches = _image_feature_batches(config, workdir, backbone)
  cells = int(gcfg.kmeans.batch_size) * int(gcfg.grid) ** 2
  step_fn = kmeans.update
  if jax.device_count() > 1 and jax.process_count() == 1 and cells % jax.device_count() == 0:
    from magvlt_jax import parallel  # pylint: disable=import-outside-toplevel
    step_fn = kmeans.update_fn(parallel.make_mesh(config.mesh), parallel.logical_rules(config.mesh.strategy))
  state, history = kmeans.fit(
      batches, int(gcfg.num_clusters), int(gcfg.kmeans.num_steps), seed=int(gcfg.seed),
      init_batches=math.ceil(int(gcfg.num_clusters) / cells), state_path=state_path(workdir),
      save_every=int(gcfg.kmeans.get("save_every", 0)), log_every=int(gcfg.kmeans.log_every), step_fn=step_fn)
  counts = np.asarray(state["counts"])
  logging.info("kmeans: %d of %d clusters used by the fit (%s)", int((counts > 0).sum()), len(counts),
               state_path(workdir))
  return np.asarray(state["centroids"]), history


def _define_flags():
  """The CLI flags, defined only when run as a script: the trainer imports this module inside
  main.py's process, whose absl flags already include --config and --workdir."""
  return (config_flags.DEFINE_config_file("config", None, "System config (with a grid_kmeans section)."),
          flags.DEFINE_string("workdir", None, "Run directory; writes WORKDIR/tokenizer/kmeans.npz."))


def main(argv):
  del argv
  logging.getLogger().setLevel(logging.INFO)
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError("--config and --workdir are required")
  if "grid_kmeans" not in _CONFIG.value:
    raise app.UsageError("the config has no grid_kmeans section (see configs/grid_kmeans.py)")
  fit_vocabulary(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  _CONFIG, _WORKDIR = _define_flags()
  app.run(main)
