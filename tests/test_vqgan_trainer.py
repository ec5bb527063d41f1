"""Tokenizer trainer: adaptive GAN weight, a short run (GAN on at the end) that beats a blank image,
export + load_params, and resume from the latest checkpoint."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magvlt_jax.configs_util import load_config
from magvlt_jax.models import vqgan
from magvlt_jax.train import metric_writer
from magvlt_jax.train import vqgan_io
from magvlt_jax.train import vqgan_trainer


def small_config(num_steps):
  cfg = load_config("configs/magvlt.py:tiny")
  v = cfg.vqgan
  v.base_channels, v.channel_mult, v.z_channels, v.embed_dim, v.codebook_size = 8, (1, 1, 2, 2), 16, 16, 32
  v.train.batch_size, v.train.num_steps, v.train.log_every = 8, num_steps, 10
  v.train.image_every, v.train.checkpoint_every = 20, 20
  v.loss.disc_start = 30
  v.optimizer.warmup_steps = 5
  v.discriminator.base_channels = 8
  cfg.data.synthetic.num_train, cfg.data.synthetic.num_eval = 64, 16
  return cfg


def test_last_layer_gradient_equals_direct_gradient():
  """The one-vjp GAN step's last-layer gradients must equal d(loss)/d(decoder.conv_out.kernel)."""
  v = small_config(1).vqgan
  params = vqgan.init_params(v, jax.random.PRNGKey(0))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
  nll = lambda r: jnp.mean(jnp.abs(x - r))
  model = vqgan.VQGAN(v)
  direct = jax.jit(jax.grad(lambda p: nll(model.apply({"params": p}, x)["recon"])))(params)
  out = jax.jit(model.apply)({"params": params}, x)
  vjp = vqgan_trainer._last_layer_vjp(params, out["features"], jnp.float32)  # pylint: disable=protected-access
  np.testing.assert_allclose(vjp(jax.grad(nll)(out["recon"])), direct["decoder"]["conv_out"]["kernel"],
                             rtol=1e-4, atol=1e-7)
  w = vqgan_trainer.adaptive_weight(jnp.full((3,), 2.0), jnp.full((3,), 1.0), 0.8, 1e4)
  assert float(w) == pytest.approx(0.8 * 2 * np.sqrt(3) / (np.sqrt(3) + 1e-4))


@pytest.mark.slow  # two train-step compilations + data preparation: ~1 min on 2 cores
def test_train_tokenizer_short_run_beats_blank_and_resumes(tmp_path):
  workdir = str(tmp_path)
  result = vqgan_trainer.train_tokenizer(small_config(40), workdir)
  tok = os.path.join(workdir, "tokenizer")
  assert os.path.exists(os.path.join(tok, vqgan.PARAMS_FILE))
  with open(os.path.join(tok, "eval.json")) as f:
    saved = json.load(f)
  assert saved["train_steps"] == 40 and saved["num_images"] == 16
  assert result["psnr"] > result["psnr_blank_gray"] + 3.0  # reconstructs far better than a flat image
  assert 0 < result["codebook_usage"] <= 1 and result["perplexity"] >= 1
  rows = metric_writer.read_metrics(workdir)
  d_losses = [r["tokenizer/d_loss"] for r in rows if "tokenizer/d_loss" in r]
  assert len(d_losses) == 1 and np.isfinite(d_losses[0])  # GAN ran from step 30 (logged at 40)
  # load_params from the workdir and round trip one eval batch
  cfg = small_config(40)
  params = vqgan.load_params(workdir, cfg.vqgan)
  images = vqgan_io.grid_batch(cfg, workdir, n=4)
  codes, recon = vqgan_io.round_trip(params, images, cfg.vqgan)
  assert codes.shape == (4, 64)
  x = vqgan.to_model_range(images)
  assert float(jnp.mean(vqgan_io.psnr(x, recon))) > float(jnp.mean(vqgan_io.psnr(jnp.zeros_like(x), x)))
  # resume: 5 more steps start from the saved step 40, not from scratch
  again = vqgan_trainer.train_tokenizer(small_config(45), workdir)
  assert again["train_steps"] == 45
  steps = [r["step"] for r in metric_writer.read_metrics(workdir) if "tokenizer/loss" in r]
  assert steps == [10, 20, 30, 40, 45]
  # the orbax checkpoint directory holds the same final params as the exported params.npz
  from_orbax = vqgan.load_params(os.path.join(workdir, "tokenizer", "checkpoints"), cfg.vqgan)
  exported = vqgan.load_params(workdir, cfg.vqgan)
  jax.tree.map(np.testing.assert_array_equal, from_orbax, exported)


def test_psnr_ssim_match_scikit_image():
  metrics = pytest.importorskip("skimage.metrics")
  rng = np.random.default_rng(0)
  a = rng.uniform(0, 1, (2, 32, 32, 3))
  b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
  ours_ssim = vqgan_io.ssim(jnp.asarray(a * 2 - 1), jnp.asarray(b * 2 - 1))
  ours_psnr = vqgan_io.psnr(jnp.asarray(a * 2 - 1), jnp.asarray(b * 2 - 1))
  for i in range(2):
    ref = metrics.structural_similarity(a[i], b[i], gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                        data_range=1.0, channel_axis=-1)
    assert float(ours_ssim[i]) == pytest.approx(ref, abs=1e-5)
    assert float(ours_psnr[i]) == pytest.approx(metrics.peak_signal_noise_ratio(a[i], b[i], data_range=1.0), abs=1e-4)
