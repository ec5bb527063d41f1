"""The VQ-GAN (taming f16 layout) as a registered image tokenizer; the model is models/vqgan.py,
its trainer train/vqgan_trainer.py."""
import os

from magvlt_jax.image_tokenizers import ImageTokenizer, tokenizer_dir
from magvlt_jax.models import vqgan


class VQGANTokenizer(ImageTokenizer):
  kind = "vqgan"

  @property
  def grid(self):
    side = vqgan.latent_grid(self.cfg)
    return side, side

  @property
  def vocab_size(self) -> int:
    return int(self.cfg.codebook_size)

  def encode(self, params, images_uint8):
    return vqgan.encode(params, vqgan.to_model_range(images_uint8), self.cfg)

  def decode(self, params, codes):
    return vqgan.to_uint8(vqgan.decode(params, codes, self.cfg))

  def init_params(self, rng, boxed: bool = False):
    return vqgan.init_params(self.cfg, rng, boxed=boxed)

  def load_params(self, path: str):
    return vqgan.load_params(path, self.cfg)

  def has_params(self, workdir: str) -> bool:
    return os.path.exists(os.path.join(tokenizer_dir(workdir), vqgan.PARAMS_FILE))

  def train(self, config, workdir: str):
    from magvlt_jax.train import vqgan_trainer  # pylint: disable=import-outside-toplevel
    return vqgan_trainer.train_tokenizer(config, workdir)

  def validate(self, config):
    from magvlt_jax import configs_util  # pylint: disable=import-outside-toplevel
    configs_util.validate_vqgan(config)
