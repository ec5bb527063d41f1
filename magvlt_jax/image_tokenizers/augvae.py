"""L-Verse's AugVAE-SL as a registered image tokenizer; the model is models/augvae.py, its trainer
train/augvae_trainer.py (AugVAE-ML, then SL fine-tuned from it). Tokens come from the SL grid
(image_size / 8 per side: 32x32 = 1024 at 256 px); the ML model is a training stage only."""
import os

import jax
import jax.numpy as jnp

from magvlt_jax.image_tokenizers import ImageTokenizer, load_checked_npz, tokenizer_dir
from magvlt_jax.models import augvae
from magvlt_jax.models import vqgan


class AugVAETokenizer(ImageTokenizer):
  kind = "augvae"

  @property
  def grid(self):
    g = augvae.sl_grid(self.cfg)
    return g, g

  @property
  def vocab_size(self) -> int:
    return int(self.cfg.codebook_size)

  def encode(self, params, images_uint8):
    return augvae.encode_sl(params, vqgan.to_model_range(images_uint8), self.cfg)

  def decode(self, params, codes):
    return vqgan.to_uint8(augvae.decode_sl(params, codes, self.cfg))

  def init_params(self, rng, boxed: bool = False):
    return augvae.init_params(self.cfg, rng, stage="sl", boxed=boxed)

  def load_params(self, path: str):
    params = load_checked_npz(path, self.kind, augvae.abstract_params(self.cfg, "sl"),
                              f"variant {self.cfg.variant!r}, AugVAE-SL")
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.dtype(self.cfg.param_dtype)), params)

  def has_params(self, workdir: str) -> bool:
    return os.path.exists(os.path.join(tokenizer_dir(workdir), vqgan.PARAMS_FILE))

  def train(self, config, workdir: str):
    from magvlt_jax.train import augvae_trainer  # pylint: disable=import-outside-toplevel
    return augvae_trainer.train_tokenizer(config, workdir)

  def validate(self, config):
    cfg = config.augvae
    if cfg.get("stage") != "sl":
      raise ValueError(f"config.augvae.stage={cfg.get('stage')!r}: the image tokenizer encodes with "
                       "AugVAE-SL; set it to 'sl' (ML is trained first by train/augvae_trainer.py)")
    for key in ("image_size", "latent_channels", "hidden_channels", "codebook_size", "norm_groups"):
      if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
        raise ValueError(f"config.augvae.{key}={cfg.get(key)!r} must be a positive integer")
    if cfg.loss.reconstruction not in ("l1", "l2"):
      raise ValueError(f"config.augvae.loss.reconstruction={cfg.loss.reconstruction!r}: use 'l1' or 'l2'")
    augvae.validate(cfg)
