"""L-Verse's AugVAE-SL as a registered image tokenizer; the model is models/augvae.py, its trainer
train/augvae_trainer.py (AugVAE-ML, then SL fine-tuned from it). Tokens come from the SL grid
(image_size / 8 per side: 32x32 = 1024 at 256 px); the ML model is a training stage only."""
import os

import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax.image_tokenizers import ImageTokenizer, tokenizer_dir
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

  def _params_file(self, path):
    for f in (path, os.path.join(path, vqgan.PARAMS_FILE), os.path.join(tokenizer_dir(path), vqgan.PARAMS_FILE)):
      if os.path.isfile(f) and f.endswith(".npz"):
        return f
    raise FileNotFoundError(f"augvae.load_params: no AugVAE-SL params at {path} (looked for an .npz, "
                            f"{vqgan.PARAMS_FILE} and tokenizer/{vqgan.PARAMS_FILE})")

  def load_params(self, path: str):
    where = self._params_file(path)
    with np.load(where) as f:
      params = vqgan.unflatten_params({k: f[k] for k in f.files})
    want = vqgan.flatten_params_shapes(augvae.abstract_params(self.cfg, "sl"))
    got = vqgan.flatten_params_shapes(params)
    bad = sorted(k for k in set(want) | set(got)
                 if k not in want or k not in got or tuple(want[k].shape) != tuple(np.shape(got[k])))
    if bad:
      raise ValueError(f"{where} does not match config.augvae (variant {self.cfg.variant!r}, AugVAE-SL): "
                       f"missing, extra or mis-shaped: {bad[:20]}")
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
