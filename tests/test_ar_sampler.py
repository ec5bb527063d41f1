"""ARGVLT and BiART workdirs through the shared Sampler (from_checkpoint, t2i, inpaint, i2t with
likelihood reranking): the same API as MAGVLT, the config's "ar" decoder underneath."""
import os

import jax.numpy as jnp
import numpy as np
import pytest

from magvlt_jax import checkpoints, configs_util, sampler as sampler_lib
from magvlt_jax import text as text_lib
from magvlt_jax.models import transformer, vqgan
from test_sampler import CAPTIONS, random_params


def ar_workdir(workdir, system):
  config = configs_util.load_config(f"configs/{system}.py:tiny")
  v = config.vqgan  # test_sampler's smaller tokenizer: 32x32 -> 8x8 codes
  v.image_size, v.channel_mult, v.base_channels, v.norm_groups = 32, (1, 1, 1), 8, 4
  v.z_channels = v.embed_dim = 8
  config.sequence.image_tokens = 64
  config.model.num_layers, config.model.embed_dim, config.model.num_heads = 1, 32, 2
  config.decoding.num_image_candidates = config.decoding.num_text_candidates = 2
  config.decoding.rerank = "likelihood"
  configs_util.validate_config(config)
  checkpoints.save_config(workdir, config)
  params = random_params(transformer.param_shapes(config), 0)
  params = dict(params, token_embed=params["token_embed"] * 20)  # peaked, non-constant samples
  store = checkpoints.CheckpointStore(os.path.join(workdir, "checkpoints"), async_save=False)
  store.save(1, {"params": params, "step": jnp.asarray(1)})
  store.close()
  vqgan.save_params_npz(os.path.join(workdir, "tokenizer", vqgan.PARAMS_FILE),
                        random_params(vqgan.abstract_params(config.vqgan), 1))
  text_lib.TextTokenizer.train(CAPTIONS * 10, 60, os.path.join(workdir, "text", "spm.model"))
  return config


@pytest.mark.slow
@pytest.mark.parametrize("system", ["argvlt", "lverse"])
def test_sampler_from_ar_checkpoint(tmp_path, system):
  ar_workdir(str(tmp_path), system)
  s = sampler_lib.Sampler.from_checkpoint(str(tmp_path))
  assert s.decoder.kind == "ar"
  images = s.text_to_image(["a red circle in the center"], seed=0)
  assert len(images) == 1 and images[0].size == (s.image_size, s.image_size)
  again = s.text_to_image(["a red circle in the center"], seed=0)
  np.testing.assert_array_equal(np.asarray(images[0]), np.asarray(again[0]))  # same seed
  pixels = np.asarray(images[0])
  region = np.zeros((8, 8), bool)
  region[2:6, 2:6] = True
  inpainted = s.inpaint([pixels], ["a blue square"], region=region, seed=1)
  assert np.asarray(inpainted[0]).shape == pixels.shape
  captions = s.image_to_text([pixels], seed=0)
  assert len(captions) == 1 and isinstance(captions[0], str)
