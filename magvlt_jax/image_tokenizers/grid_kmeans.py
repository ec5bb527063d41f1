"""X-LXMERT's image tokenizer: grid features -> nearest k-means centroid ids; ids -> centroids ->
SPADE generator -> pixels. Settings in config.grid_kmeans (configs/grid_kmeans.py).

Params (one tree, saved flat in WORKDIR/tokenizer/params.npz):
  backbone   EfficientNet-Lite0 trunk up to config.grid_kmeans.feature_layer (frozen)
  centroids  float32 [num_clusters, D]: the visual vocabulary (magvlt_jax/kmeans.py)
  generator  {"params", "spectral"}: the SPADE generator (models/spade.py)
Training (`train`, --mode=train_tokenizer or --mode=train_generator): k-means over the training
set's grid features (tools/fit_kmeans.py), then the generator (train/generator_trainer.py).
"""
import os

import jax
import jax.numpy as jnp
from flax import linen as nn

from magvlt_jax import kmeans
from magvlt_jax.image_tokenizers import ImageTokenizer, load_checked_npz, tokenizer_dir
from magvlt_jax.models import grid_features
from magvlt_jax.models import spade
from magvlt_jax.models import vqgan

PARAMS_FILE = vqgan.PARAMS_FILE
KMEANS_FILE = "kmeans.npz"


class GridKMeansTokenizer(ImageTokenizer):
  kind = "grid_kmeans"

  @property
  def grid(self):
    return int(self.cfg.grid), int(self.cfg.grid)

  @property
  def vocab_size(self) -> int:
    return int(self.cfg.num_clusters)

  # ------------------------------------------------------------------ pure functions
  def features(self, params, images_uint8):
    """[B, g, g, D] grid features of uint8 images (feature_source effnet_lite0)."""
    if self.cfg.feature_source == "npz":
      raise ValueError("config.grid_kmeans.feature_source='npz': pixels cannot be encoded (the features "
                       "were precomputed per image id); encode them with encode_features(params, "
                       "NpzFeatures(...).by_id(ids)) or use feature_source='effnet_lite0'")
    return grid_features.grid_features(params["backbone"], images_uint8, self.cfg)

  def encode_features(self, params, feats):
    """[B, g, g, D] (or [B, g*g, D]) features -> int32 [B, g*g] nearest-centroid ids."""
    return kmeans.assign(feats.reshape(feats.shape[0], -1, feats.shape[-1]), params["centroids"])

  def encode(self, params, images_uint8):
    return self.encode_features(params, self.features(params, images_uint8))

  def centroid_grid(self, params, codes):
    g = int(self.cfg.grid)
    return jnp.take(params["centroids"], codes, axis=0).reshape(codes.shape[0], g, g, -1)

  def decode_float(self, params, codes):
    """codes int32 [B, g*g] -> images in [-1, 1] (the generator without noise)."""
    gen = spade.generator_from_config(self.cfg)
    return gen.apply(params["generator"], self.centroid_grid(params, codes), deterministic=True)

  def decode(self, params, codes):
    return vqgan.to_uint8(self.decode_float(params, codes))

  # ------------------------------------------------------------------ params, files, training
  def _example_grid(self):
    g = int(self.cfg.grid)
    return jnp.zeros((1, g, g, grid_features.feature_dim(self.cfg)), jnp.float32)

  def init_generator(self, rng):
    return spade.init(spade.generator_from_config(self.cfg), rng, self._example_grid())

  def init_params(self, rng, boxed: bool = False):
    k_b, k_c, k_g = jax.random.split(rng, 3)
    c = self.cfg
    backbone = {}
    if c.feature_source == "effnet_lite0":
      dummy = jnp.zeros((1, 32, 32, 3), jnp.float32)
      backbone = grid_features.EffNetTrunk((c.feature_layer,)).init(k_b, dummy)["params"]
    centroids = jax.random.normal(k_c, (self.vocab_size, grid_features.feature_dim(c)), jnp.float32)
    params, spectral = self.init_generator(k_g)
    if boxed:
      centroids = nn.LogicallyPartitioned(centroids, ("codebook", "embed"))
    return dict(backbone=backbone, centroids=centroids, generator=dict(params=params, spectral=spectral))

  def load_params(self, path: str):
    abstract = jax.eval_shape(lambda: self.init_params(jax.random.PRNGKey(0)))
    params = load_checked_npz(path, self.kind, abstract, f"variant {self.cfg.variant!r}: {self.vocab_size} "
                              f"clusters, feature_layer {self.cfg.feature_layer!r}")
    params.setdefault("backbone", {})
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)

  def has_params(self, workdir: str) -> bool:
    return os.path.exists(os.path.join(tokenizer_dir(workdir), PARAMS_FILE))

  def train(self, config, workdir: str):
    from magvlt_jax.train import generator_trainer  # pylint: disable=import-outside-toplevel
    return generator_trainer.train_tokenizer(config, workdir)

  def validate(self, config):
    validate(config.grid_kmeans)


def _positive_int(cfg, key):
  value = cfg.get(key)
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f"config.grid_kmeans.{key}={value!r} must be a positive integer")


def validate(cfg):
  """config.grid_kmeans checks; ValueError naming the key."""
  for key in ("image_size", "grid", "num_clusters"):
    _positive_int(cfg, key)
  spade.num_blocks(cfg)
  if cfg.feature_source not in ("effnet_lite0", "npz"):
    raise ValueError(f"config.grid_kmeans.feature_source={cfg.feature_source!r}: use 'effnet_lite0' or 'npz'")
  if cfg.feature_layer not in grid_features.LAYERS:
    raise ValueError(f"config.grid_kmeans.feature_layer={cfg.feature_layer!r}: use one of "
                     f"{sorted(grid_features.LAYERS)}")
  if cfg.feature_source == "npz":
    if not cfg.features_npz:
      raise ValueError("config.grid_kmeans.features_npz is empty but feature_source='npz': give the .npz "
                       "of precomputed grid features (keys features [N, grid, grid, D], optional ids [N])")
    _positive_int(cfg, "feature_dim")
  for section, keys in (("kmeans", ("batch_size", "num_steps", "log_every")),
                        ("train", ("batch_size", "num_steps", "log_every", "image_every")),
                        ("generator", ("channels", "seg_channels", "spade_hidden")),
                        ("discriminator", ("channels",))):
    for key in keys:
      value = cfg[section].get(key)
      if not isinstance(value, int) or value <= 0:
        raise ValueError(f"config.grid_kmeans.{section}.{key}={value!r} must be a positive integer")
  for key in ("adversarial", "acgan", "feature_matching", "perceptual"):
    if cfg.loss[key] < 0:
      raise ValueError(f"config.grid_kmeans.loss.{key}={cfg.loss[key]} must be >= 0")
  for key in ("g_learning_rate", "d_learning_rate"):
    if cfg.optimizer[key] <= 0:
      raise ValueError(f"config.grid_kmeans.optimizer.{key}={cfg.optimizer[key]} must be > 0")
