"""VQGAN model: shapes per config, logical axes, quantizer math (STE, losses, EMA, restart), LPIPS, D."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magvlt_jax.configs_util import load_config
from magvlt_jax.convert import torch_pickle_writer
from magvlt_jax.models import discriminator as disc_lib
from magvlt_jax.models import lpips as lpips_lib
from magvlt_jax.models import vqgan


@pytest.fixture(scope="module")
def tiny():
  return load_config("configs/vqgan.py:tiny")


@pytest.fixture(scope="module")
def tiny_params(tiny):
  return vqgan.init_params(tiny, jax.random.PRNGKey(0))


def test_f16_shapes_via_eval_shape():
  cfg = load_config("configs/vqgan.py:f16_16384")
  params = vqgan.abstract_params(cfg)
  flat = vqgan.flatten_params_shapes(params)
  assert len(flat) == 343
  assert flat["quantize/embedding"].shape == (16384, 256)
  assert flat["encoder/down_0/downsample/conv/kernel"].shape == (3, 3, 128, 128)
  assert flat["decoder/up_4/attn_2/proj_out/kernel"].shape == (1, 1, 512, 512)
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  codes = jax.eval_shape(lambda p, x: vqgan.encode(p, x, cfg), params, images)
  assert codes.shape == (2, 256) and codes.dtype == jnp.int32
  out = jax.eval_shape(lambda p, c: vqgan.decode(p, c, cfg), params, codes)
  assert out.shape == (2, 256, 256, 3) and out.dtype == jnp.float32


def test_tiny_encode_decode_shapes_and_range(tiny, tiny_params):
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)), jnp.float32)
  codes = jax.jit(lambda p, x: vqgan.encode(p, x, tiny))(tiny_params, x)
  assert codes.shape == (2, 64) and codes.dtype == jnp.int32
  assert int(codes.min()) >= 0 and int(codes.max()) < tiny.codebook_size
  out = vqgan.decode(tiny_params, codes, tiny)
  assert out.shape == (2, 64, 64, 3) and float(jnp.abs(out).max()) <= 1.0
  with pytest.raises(ValueError, match="image_size=64"):
    vqgan.encode(tiny_params, jnp.zeros((1, 32, 32, 3)), tiny)
  np.testing.assert_array_equal(vqgan.to_model_range(np.array([0, 255], np.uint8)), [-1.0, 1.0])


def micro():
  """Small enough to run eagerly; still has attention in a level, nin_shortcuts and 2 resolutions."""
  cfg = load_config("configs/vqgan.py:tiny")
  cfg.update(dict(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                  z_channels=8, embed_dim=8, codebook_size=16, norm_groups=4,
                  norm_type="group", mid_attention=True))
  return cfg


@pytest.mark.parametrize("norm_type,mid_attention,local", [("group", True, False), ("group", False, False),
                                                          ("layer", True, False), ("layer", False, True)])
def test_codes_are_local_only_without_groupnorm_and_mid_attention(norm_type, mid_attention, local):
  # A change in one corner must not reach a latent whose receptive field ends before it: true for
  # per-position LayerNorm without the mid attention (the tiny default), false for taming's
  # GroupNorm (image-wide statistics) or its mid attention (every latent attends to all).
  cfg = load_config("configs/vqgan.py:tiny")
  cfg.update(dict(image_size=64, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attn_resolutions=(), z_channels=8, embed_dim=8, codebook_size=16, norm_groups=4,
                  norm_type=norm_type, mid_attention=mid_attention))
  params = vqgan.init_params(cfg, jax.random.PRNGKey(1))
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 64, 64, 3)), jnp.float32)
  changed = x.at[:, :4, :4, :].set(1.0)
  encode = jax.jit(lambda p, x: vqgan.VQGAN(cfg).apply({"params": p}, x, method=vqgan.VQGAN.encode_latent))
  z, z2 = encode(params, x), encode(params, changed)
  assert z.shape == (1, 32, 32, 8)
  near = float(jnp.abs(z[:, :2, :2] - z2[:, :2, :2]).max())
  far = float(jnp.abs(z[:, -8:, -8:] - z2[:, -8:, -8:]).max())
  assert near > 1e-3
  assert (far == 0.0) == local, far


def test_every_param_has_logical_axes(tiny):
  boxed = vqgan.init_params(tiny, jax.random.PRNGKey(0), boxed=True)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(l, nn.LogicallyPartitioned) and len(l.names) == l.value.ndim for l in leaves)
  assert boxed["quantize"]["embedding"].names == ("codebook", "embed")
  assert boxed["encoder"]["conv_in"]["kernel"].names == ("conv_height", "conv_width", "conv_in", "conv_out")


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  cfg = micro()
  params = vqgan.init_params(cfg, jax.random.PRNGKey(0))
  cfg.dtype = "bfloat16"
  # dtype propagation only (bf16 convolutions are slow to compile and run on CPU)
  out = jax.eval_shape(vqgan.VQGAN(cfg).apply, {"params": params}, jnp.zeros((1, 16, 16, 3)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  assert out["recon"].dtype == jnp.float32 and out["z"].dtype == jnp.float32
  assert out["features"].dtype == jnp.bfloat16


def test_nearest_codes_matches_bruteforce():
  rng = np.random.default_rng(1)
  z, e = rng.standard_normal((50, 4)).astype(np.float32), rng.standard_normal((16, 4)).astype(np.float32)
  want = np.argmin(((z[:, None] - e[None]) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(vqgan.nearest_codes(jnp.asarray(z), jnp.asarray(e)), want)


def test_straight_through_gradient():
  rng = np.random.default_rng(2)
  z = jnp.asarray(rng.standard_normal((3, 5, 4)), jnp.float32)
  cb = jnp.asarray(rng.standard_normal((8, 4)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 5, 4)), jnp.float32)
  downstream = lambda q: jnp.sum(jnp.sin(q) * w)  # any decoder-side loss
  zq_value = vqgan.quantize(z, cb)[0]
  np.testing.assert_allclose(zq_value, cb[vqgan.nearest_codes(z, cb)], atol=1e-6)
  grad_z = jax.grad(lambda z: downstream(vqgan.quantize(z, cb)[0]))(z)
  grad_zq = jax.grad(downstream)(zq_value)
  np.testing.assert_allclose(grad_z, grad_zq, rtol=1e-6)
  # codebook loss moves only the codebook, commitment only the encoder output
  g_cb = jax.grad(lambda z, c: vqgan.quantize(z, c)[2], argnums=(0, 1))(z, cb)
  g_commit = jax.grad(lambda z, c: vqgan.quantize(z, c)[3], argnums=(0, 1))(z, cb)
  assert float(jnp.abs(g_cb[0]).max()) == 0.0 and float(jnp.abs(g_cb[1]).max()) > 0
  assert float(jnp.abs(g_commit[1]).max()) == 0.0 and float(jnp.abs(g_commit[0]).max()) > 0


def test_codebook_usage_and_perplexity():
  codes = jnp.array([[0, 1, 2, 3], [0, 1, 2, 3]])
  m = vqgan.codebook_metrics(codes, 8)
  assert float(m["usage"]) == 0.5
  np.testing.assert_allclose(float(m["perplexity"]), 4.0, rtol=1e-6)
  m = vqgan.codebook_metrics(jnp.zeros((10,), jnp.int32), 8)
  assert float(m["usage"]) == 1 / 8 and float(m["perplexity"]) == pytest.approx(1.0)


def test_ema_update_matches_hand_computation():
  cb = np.array([[0.0, 0.0], [1.0, 1.0], [5.0, 5.0]], np.float32)
  stats = vqgan.init_vq_stats(cb)  # cluster_size 1, embed_sum = codebook
  z = np.array([[0.2, 0.0], [0.0, 0.4], [1.0, 2.0]], np.float32)
  codes = np.array([0, 0, 1])
  d, eps = 0.9, 1e-5
  new_stats, new_cb = vqgan.ema_update(stats, jnp.asarray(z), jnp.asarray(codes), d, eps)
  cluster = np.array([0.9 + 0.1 * 2, 0.9 + 0.1 * 1, 0.9])
  embed_sum = np.array([[0.9 * 0 + 0.1 * 0.2, 0.1 * 0.4], [0.9 + 0.1 * 1.0, 0.9 + 0.1 * 2.0], [4.5, 4.5]])
  n = cluster.sum()
  smoothed = (cluster + eps) / (n + 3 * eps) * n
  np.testing.assert_allclose(new_stats["cluster_size"], cluster, rtol=1e-6)
  np.testing.assert_allclose(new_stats["embed_sum"], embed_sum, rtol=1e-6)
  np.testing.assert_allclose(new_cb, embed_sum / smoothed[:, None], rtol=1e-5)


def test_dead_code_restart_replaces_only_dead_codes():
  rng = np.random.default_rng(3)
  cb = jnp.asarray(rng.standard_normal((4, 2)), jnp.float32)
  stats = dict(usage=jnp.array([5.0, 0.1, 3.0, 0.5]), cluster_size=jnp.ones(4), embed_sum=cb * 1.0)
  z = jnp.asarray(rng.standard_normal((32, 2)) + 10.0, jnp.float32)
  codes = vqgan.nearest_codes(z, cb)
  new_stats, new_cb, n = vqgan.restart_dead_codes(jax.random.PRNGKey(0), stats, cb, z, codes, threshold=1.0)
  assert int(n) == 2
  np.testing.assert_array_equal(new_cb[0], cb[0])
  np.testing.assert_array_equal(new_cb[2], cb[2])
  zs = {tuple(v) for v in np.asarray(z)}
  assert tuple(np.asarray(new_cb[1])) in zs and tuple(np.asarray(new_cb[3])) in zs
  assert not np.array_equal(new_cb[1], new_cb[3])  # drawn without replacement
  np.testing.assert_allclose(new_stats["usage"], [5.0, 8.0, 3.0, 8.0])  # max(32/4, 2*1)
  np.testing.assert_allclose(new_stats["cluster_size"], [1.0, 8.0, 1.0, 8.0])


def test_discriminator_shapes_and_hinge_losses(tiny):
  d = disc_lib.from_config(tiny).clone(base_channels=8)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 64, 3)), jnp.float32)
  params = jax.jit(d.init)(jax.random.PRNGKey(0), x)["params"]
  logits = jax.jit(d.apply)({"params": params}, x)
  # 2 layers: 4x4 convs, stride 2, 2, 1, 1, padding 1: 64 -> 32 -> 16 -> 15 -> 14 patches
  assert logits.shape == (2, 14, 14, 1) and logits.dtype == jnp.float32
  assert sorted(params) == ["conv_0", "conv_1", "conv_2", "conv_3", "norm_1", "norm_2"]
  real, fake = jnp.array([2.0, 0.0]), jnp.array([-2.0, 0.5])
  assert float(disc_lib.hinge_d_loss(real, fake)) == pytest.approx(0.5 * (0.5 + 0.75))
  assert float(disc_lib.generator_loss(fake)) == pytest.approx(0.75)


def _random_vgg_lpips_state_dicts(rng):
  vgg, heads = {}, {}
  cin = 3
  for layer in lpips_lib._VGG16:  # pylint: disable=protected-access
    if layer == "M":
      continue
    idx, ch = layer
    vgg[f"features.{idx}.weight"] = (rng.standard_normal((ch, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32)
    vgg[f"features.{idx}.bias"] = np.zeros((ch,), np.float32)
    cin = ch
  vgg["classifier.0.weight"] = np.zeros((4, 4), np.float32)  # ignored
  for k, ch in enumerate(lpips_lib.TAP_CHANNELS):
    heads[f"lin{k}.model.1.weight"] = np.abs(rng.standard_normal((1, ch, 1, 1))).astype(np.float32)
  return vgg, heads


def test_lpips_loads_user_weights_without_torch(tmp_path):
  vgg, heads = _random_vgg_lpips_state_dicts(np.random.default_rng(4))
  torch_pickle_writer.save_state_dict_zip(str(tmp_path / "vgg16.pth"), vgg)
  np.savez(str(tmp_path / "heads.npz"), **heads)
  params = lpips_lib.load_params(f"{tmp_path / 'vgg16.pth'}, {tmp_path / 'heads.npz'}")
  np.testing.assert_array_equal(params["conv_28"]["kernel"], vgg["features.28.weight"].transpose(2, 3, 1, 0))
  x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  apply = jax.jit(lpips_lib.LPIPS().apply)
  dist, same = apply({"params": params}, x, x[::-1]), apply({"params": params}, x, x)
  assert dist.shape == (2,) and float(dist.min()) > 0 and float(jnp.abs(same).max()) < 1e-6
  with pytest.raises(ValueError, match="lin_0"):
    lpips_lib.load_params(str(tmp_path / "vgg16.pth"))
