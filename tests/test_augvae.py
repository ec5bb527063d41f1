"""AugVAE (L-Verse): level shapes at 64 and 256 px, one codebook shared by every level (and its
EMA step over all levels' assignments), ML -> SL conversion keeps every shared param."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magvlt_jax.configs_util import load_config
from magvlt_jax.models import augvae
from magvlt_jax.models import vqgan


def _tiny():
  return load_config("configs/augvae.py:tiny")


def _shapes(tree):
  return {"/".join(k): tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(tree).items()}


@pytest.mark.parametrize("variant,size", [("tiny", 64), ("ml", 256)])
def test_level_shapes(variant, size):
  cfg = load_config(f"configs/augvae.py:{variant}")
  c = cfg.latent_channels
  images = jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32)
  for stage, levels in (("ml", (0, 1, 2, 3)), ("sl", (1,))):
    params = augvae.abstract_params(cfg, stage)
    out = jax.eval_shape(lambda p, x, s=stage: augvae.AugVAE(cfg, s).apply({"params": p}, x), params, images)
    sides = [size // 4, size // 8, size // 16, size // 32]
    assert {i: v.shape for i, v in out["z"].items()} == {i: (2, sides[i], sides[i], c) for i in levels}
    assert {i: v.shape for i, v in out["codes"].items()} == {i: (2, sides[i] ** 2) for i in levels}
    assert out["recon"].shape == (2, size, size, 3)
  assert augvae.sl_grid(cfg) == size // 8  # 32x32 = 1024 tokens at 256 px


def test_all_levels_share_one_codebook():
  cfg = _tiny()
  params = augvae.init_params(cfg, jax.random.PRNGKey(0), stage="ml")
  shapes = _shapes(params)
  assert [k for k in shapes if "quantize" in k] == ["quantize/embedding"]
  assert shapes["quantize/embedding"] == (cfg.codebook_size, cfg.latent_channels)
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-1, maxval=1)
  model = augvae.AugVAE(cfg, "ml")
  # A new codebook changes every level's codes to that codebook's nearest entries.
  new_cb = jax.random.normal(jax.random.PRNGKey(2), shapes["quantize/embedding"]) * 0.1
  p2 = dict(params, quantize=dict(embedding=new_cb))
  zs = model.apply({"params": p2}, x, method=augvae.AugVAE.latents)
  codes = model.apply({"params": p2}, x, method=augvae.AugVAE.encode)
  lookup = model.apply({"params": p2}, method=augvae.AugVAE.codebook)  # unit rows under l2_normalize
  assert sorted(codes) == [0, 1, 2, 3]
  for i, z in enumerate(zs):
    want = vqgan.nearest_codes(z.reshape(2, -1, z.shape[-1]), lookup)
    np.testing.assert_array_equal(np.asarray(codes[i]), np.asarray(want))


def test_ema_step_pools_levels():
  """Hand-made batch: level 0 puts (2, 0) and level 3 puts (0, 4) on code 0; code 1 is unused."""
  out = dict(z={0: jnp.array([[[[2.0, 0.0]]]]), 3: jnp.array([[[[0.0, 4.0]]]])},
             codes={0: jnp.array([[0]]), 3: jnp.array([[0]])})
  z, codes = augvae.flat_latents(out)
  np.testing.assert_array_equal(np.asarray(codes), [0, 0])
  stats = vqgan.init_vq_stats(jnp.array([[1.0, 1.0], [5.0, 5.0]]))
  new, cb = vqgan.ema_update(stats, z, codes, decay=0.5, eps=0.0)
  # cluster: 0.5*1 + 0.5*2 = 1.5 and 0.5*1 = 0.5; embed_sum row 0: 0.5*(1,1) + 0.5*(2,4) = (1.5, 2.5).
  np.testing.assert_allclose(np.asarray(new["cluster_size"]), [1.5, 0.5])
  np.testing.assert_allclose(np.asarray(new["embed_sum"]), [[1.5, 2.5], [2.5, 2.5]])
  np.testing.assert_allclose(np.asarray(cb), [[1.0, 5 / 3], [5.0, 5.0]], rtol=1e-6)


def test_ml_to_sl_fills_every_sl_param():
  cfg = _tiny()
  ml = augvae.init_params(cfg, jax.random.PRNGKey(0), stage="ml")
  sl = augvae.ml_to_sl(ml, cfg)
  assert _shapes(sl) == _shapes(augvae.abstract_params(cfg, "sl"))
  flat_ml, flat_sl = flax.traverse_util.flatten_dict(ml), flax.traverse_util.flatten_dict(sl)
  kept = [k for k in flat_sl if k[0] not in ("expand_0", "expand_1")]
  assert len(kept) == sum(k[0] in ("enc_0", "enc_1", "dec_0", "dec_1", "quantize") for k in flat_ml)
  for k in kept:
    np.testing.assert_array_equal(np.asarray(flat_sl[k]), np.asarray(flat_ml[k]))
  # The converted SL model runs and round-trips through the tokenizer API at the 8x8 grid.
  x = jnp.zeros((1, 64, 64, 3))
  codes = augvae.encode_sl(sl, x, cfg)
  assert codes.shape == (1, 64) and codes.dtype == jnp.int32
  assert augvae.decode_sl(sl, codes, cfg).shape == (1, 64, 64, 3)
  with pytest.raises(ValueError, match="AugVAE-ML"):
    augvae.ml_to_sl({"enc_0": {}}, cfg)


def test_l2_normalize_is_a_cosine_lookup():
  """quantizer.l2_normalize (configs/vqgan.py's option): every level's latent is a unit vector and a
  code's length no longer matters, only its direction."""
  cfg = _tiny()
  cfg.quantizer.l2_normalize = True
  params = augvae.init_params(cfg, jax.random.PRNGKey(0), stage="ml")
  x = jax.random.uniform(jax.random.PRNGKey(1), (2, 64, 64, 3), minval=-1, maxval=1)
  model = augvae.AugVAE(cfg, "ml")
  for z in model.apply({"params": params}, x, method=augvae.AugVAE.latents):
    np.testing.assert_allclose(np.linalg.norm(np.asarray(z), axis=-1), 1.0, rtol=1e-5)
  codes = augvae.encode_ml(params, x, cfg)
  assert codes.shape == (2, 16 * 16 + 8 * 8 + 4 * 4 + 2 * 2)
  cb = params["quantize"]["embedding"]
  scale = jnp.linspace(0.2, 5.0, cb.shape[0])[:, None]  # every code a different length
  scaled = augvae.encode_ml(dict(params, quantize=dict(embedding=cb * scale)), x, cfg)
  np.testing.assert_array_equal(np.asarray(scaled), np.asarray(codes))
  assert augvae.decode_ml(params, codes, cfg).shape == (2, 64, 64, 3)
