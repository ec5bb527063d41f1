"""Taming VQGAN conversion: key layout, completeness, errors, and outputs equal to a numpy reference."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magvlt_jax.configs_util import load_config
from magvlt_jax.convert import taming_vqgan as tv
from magvlt_jax.convert import torch_pickle_writer
from magvlt_jax.models import vqgan


def taming_shapes(ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels, embed_dim, n_embed):
  """Names/shapes of a taming VQModel state dict, following taming's Encoder/Decoder __init__ loops."""
  out = {}

  def conv(name, cin, cout, k):
    out[f"{name}.weight"], out[f"{name}.bias"] = (cout, cin, k, k), (cout,)

  def norm(name, c):
    out[f"{name}.weight"], out[f"{name}.bias"] = (c,), (c,)

  def block(name, cin, cout):
    norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cin, cout, 3)
    norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
    if cin != cout:
      conv(f"{name}.nin_shortcut", cin, cout, 1)

  def attn(name, c):
    norm(f"{name}.norm", c)
    for p in ("q", "k", "v", "proj_out"):
      conv(f"{name}.{p}", c, c, 1)

  n = len(ch_mult)
  conv("encoder.conv_in", 3, ch, 3)
  res, in_mult = resolution, (1,) + tuple(ch_mult)
  for i in range(n):
    cin, cout = ch * in_mult[i], ch * ch_mult[i]
    for j in range(num_res_blocks):
      block(f"encoder.down.{i}.block.{j}", cin, cout)
      cin = cout
      if res in attn_resolutions:
        attn(f"encoder.down.{i}.attn.{j}", cin)
    if i != n - 1:
      conv(f"encoder.down.{i}.downsample.conv", cin, cin, 3)
      res //= 2
  for m in ("encoder", "decoder"):
    c = ch * ch_mult[-1]
    block(f"{m}.mid.block_1", c, c), attn(f"{m}.mid.attn_1", c), block(f"{m}.mid.block_2", c, c)
  norm("encoder.norm_out", cin), conv("encoder.conv_out", cin, z_channels, 3)
  cin = ch * ch_mult[-1]
  conv("decoder.conv_in", z_channels, cin, 3)
  res = resolution // 2 ** (n - 1)
  for i in reversed(range(n)):
    cout = ch * ch_mult[i]
    for j in range(num_res_blocks + 1):
      block(f"decoder.up.{i}.block.{j}", cin, cout)
      cin = cout
      if res in attn_resolutions:
        attn(f"decoder.up.{i}.attn.{j}", cin)
    if i != 0:
      conv(f"decoder.up.{i}.upsample.conv", cin, cin, 3)
      res *= 2
  norm("decoder.norm_out", cin), conv("decoder.conv_out", cin, 3, 3)
  out["quantize.embedding.weight"] = (n_embed, embed_dim)
  conv("quant_conv", z_channels, embed_dim, 1), conv("post_quant_conv", embed_dim, z_channels, 1)
  return out


def shapes_for(cfg):
  return taming_shapes(cfg.base_channels, tuple(cfg.channel_mult), cfg.num_res_blocks, tuple(cfg.attn_resolutions),
                       cfg.image_size, cfg.z_channels, cfg.embed_dim, cfg.codebook_size)


def random_state_dict(shapes, seed=0):
  rng = np.random.default_rng(seed)
  sd = {}
  for k, s in shapes.items():
    fan_in = int(np.prod(s[1:])) if len(s) == 4 else 1
    if len(s) == 1 and k.endswith(".weight"):  # GroupNorm scale
      sd[k] = (1.0 + 0.1 * rng.standard_normal(s)).astype(np.float32)
    else:
      sd[k] = (rng.standard_normal(s) / np.sqrt(fan_in)).astype(np.float32)
  return sd


def micro_config():
  """A tiny taming layout that still has attention inside a level, nin_shortcuts and 2 resolutions."""
  cfg = load_config("configs/vqgan.py:tiny")
  cfg.update(dict(image_size=16, base_channels=8, channel_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,),
                  z_channels=8, embed_dim=8, codebook_size=16, norm_groups=4,
                  norm_type="group", mid_attention=True))  # the taming layers
  cfg.quantizer.l2_normalize = False  # the taming lookup
  return cfg


def test_f16_layout_matches_taming_key_list():
  cfg = load_config("configs/vqgan.py:f16_16384")
  shapes = shapes_for(cfg)
  assert len(shapes) == 343  # = the 343 model_vqvae.* tensors of the MAGVLT checkpoint
  assert shapes["encoder.conv_out.weight"] == (256, 512, 3, 3)
  assert shapes["decoder.conv_out.weight"] == (3, 128, 3, 3)
  fake = {k: np.broadcast_to(np.float32(0), s) for k, s in shapes.items()}
  params = tv.convert_state_dict(fake, cfg)  # raises on any missing/unexpected/mis-shaped key
  vqgan.check_params(params, cfg)
  assert params["encoder"]["down_4"]["attn_1"]["q"]["kernel"].shape == (1, 1, 512, 512)
  assert params["quantize"]["embedding"].shape == (16384, 256)


def test_conversion_complete_and_exact_roundtrip(tmp_path):
  cfg = micro_config()
  sd = random_state_dict(shapes_for(cfg))
  sd["loss.discriminator.main.0.weight"] = np.zeros((4, 3, 4, 4), np.float32)  # ignored
  path = str(tmp_path / "taming.npz")
  np.savez(path, **sd)
  params = tv.convert_file(path, cfg)
  flat = vqgan.flatten_params(params)
  assert len(flat) == len(sd) - 1  # every taming key used, every param filled
  np.testing.assert_array_equal(flat["encoder/down_0/block_0/conv1/kernel"],
                                sd["encoder.down.0.block.0.conv1.weight"].transpose(2, 3, 1, 0))
  back = tv.to_taming_state_dict(params)
  assert set(back) == set(sd) - {"loss.discriminator.main.0.weight"}
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd[k])


def test_conversion_errors_name_the_key():
  cfg = micro_config()
  sd = random_state_dict(shapes_for(cfg))
  missing = dict(sd)
  del missing["decoder.up.1.block.0.conv2.bias"]
  with pytest.raises(ValueError, match=r"missing key for decoder/up_1/block_0/conv2/bias"):
    tv.convert_state_dict(missing, cfg)
  bad = dict(sd, **{"encoder.conv_in.weight": np.zeros((8, 3, 5, 5), np.float32)})
  with pytest.raises(ValueError, match=r"encoder.conv_in.weight: shape \(8, 3, 5, 5\)"):
    tv.convert_state_dict(bad, cfg)
  extra = dict(sd, **{"encoder.extra_layer.weight": np.zeros((2,), np.float32)})
  with pytest.raises(ValueError, match=r"unexpected key encoder.extra_layer.weight"):
    tv.convert_state_dict(extra, cfg)


def test_torch_ckpt_with_magvlt_prefix_and_cli(tmp_path):
  cfg = micro_config()
  sd = random_state_dict(shapes_for(cfg), seed=1)
  wrapped = {f"model_vqvae.{k}": v for k, v in sd.items()}
  wrapped["model.tok_emb.weight"] = np.zeros((4, 4), np.float32)  # transformer keys: ignored
  ckpt = str(tmp_path / "magvlt.ckpt")
  torch_pickle_writer.save_state_dict_zip(ckpt, wrapped, wrap_key="state_dict")
  params = tv.convert_file(ckpt, cfg)
  np.testing.assert_array_equal(params["quantize"]["embedding"], sd["quantize.embedding.weight"])
  # CLI on the real f16 config is too big for a unit test; a tiny taming layout (the tiny variant
  # with taming's GroupNorm and mid attention, from a config file) goes through the same code.
  cfg_tiny = load_config("configs/vqgan.py:tiny")
  cfg_tiny.update(dict(norm_type="group", mid_attention=True))
  spec = tmp_path / "tiny_taming.py"
  spec.write_text("import importlib.util, os\n"
                  f"_p = {os.path.abspath('configs/vqgan.py')!r}\n"
                  "def get_config(variant):\n"
                  "  s = importlib.util.spec_from_file_location('v', _p); m = importlib.util.module_from_spec(s)\n"
                  "  s.loader.exec_module(m); c = m.get_config(variant)\n"
                  "  c.norm_type, c.mid_attention = 'group', True\n"
                  "  return c\n")
  tiny_sd = random_state_dict(shapes_for(cfg_tiny), seed=2)
  src, out = str(tmp_path / "tiny.npz"), str(tmp_path / "out" / "tiny_params.npz")
  np.savez(src, **tiny_sd)
  with pytest.raises(ValueError, match="norm_type='layer', mid_attention=False"):
    tv.main(["--input", src, "--output", out, "--config", "tiny"])  # the tiny default is not taming's
  tv.main(["--input", src, "--output", out, "--config", f"{spec}:tiny"])
  loaded = vqgan.load_params(out, cfg_tiny)
  np.testing.assert_array_equal(np.asarray(loaded["decoder"]["conv_out"]["bias"]), tiny_sd["decoder.conv_out.bias"])
  with pytest.raises(ValueError, match=r"shape of decoder/conv_in/kernel: got \(3, 3, 64, \d+\)"):
    vqgan.load_params(out, load_config("configs/vqgan.py:f16_16384"))


# ----------------------------------------------------------------------------- numpy reference (NCHW, taming)

def _conv(x, w, b, stride=1, pad=None):
  k = w.shape[-1]
  pad = (k // 2,) * 4 if pad is None else pad  # (top, bottom, left, right)
  x = np.pad(x, ((0, 0), (0, 0), (pad[0], pad[1]), (pad[2], pad[3])))
  n, c, h, wd = x.shape
  oh, ow = (h - k) // stride + 1, (wd - k) // stride + 1
  out = np.zeros((n, w.shape[0], oh, ow), np.float64)
  for i in range(k):
    for j in range(k):
      patch = x[:, :, i:i + stride * oh:stride, j:j + stride * ow:stride]
      out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
  return out + b[None, :, None, None]


def _norm(x, sd, name, groups):
  n, c, h, w = x.shape
  g = x.reshape(n, groups, -1)
  g = (g - g.mean(-1, keepdims=True)) / np.sqrt(g.var(-1, keepdims=True) + 1e-6)
  return g.reshape(n, c, h, w) * sd[f"{name}.weight"][None, :, None, None] + sd[f"{name}.bias"][None, :, None, None]


def _swish(x):
  return x / (1 + np.exp(-x))


def _cv(x, sd, name, **kw):
  return _conv(x, sd[f"{name}.weight"], sd[f"{name}.bias"], **kw)


def _block(x, sd, name, groups):
  h = _cv(_swish(_norm(x, sd, f"{name}.norm1", groups)), sd, f"{name}.conv1")
  h = _cv(_swish(_norm(h, sd, f"{name}.norm2", groups)), sd, f"{name}.conv2")
  if f"{name}.nin_shortcut.weight" in sd:
    x = _cv(x, sd, f"{name}.nin_shortcut")
  return x + h


def _attn(x, sd, name, groups):
  n, c, h, w = x.shape
  hn = _norm(x, sd, f"{name}.norm", groups)
  q, k, v = (_cv(hn, sd, f"{name}.{p}").reshape(n, c, h * w) for p in "qkv")
  s = np.einsum("ncq,nck->nqk", q, k) * c ** -0.5
  s = np.exp(s - s.max(-1, keepdims=True))
  s /= s.sum(-1, keepdims=True)
  o = np.einsum("nqk,nck->ncq", s, v).reshape(n, c, h, w)
  return x + _cv(o, sd, f"{name}.proj_out")


def _mid(x, sd, m, g):
  return _block(_attn(_block(x, sd, f"{m}.mid.block_1", g), sd, f"{m}.mid.attn_1", g), sd, f"{m}.mid.block_2", g)


def ref_encode(sd, cfg, x):
  g, n = cfg.norm_groups, len(cfg.channel_mult)
  h = _cv(x, sd, "encoder.conv_in")
  for i in range(n):
    for j in range(cfg.num_res_blocks):
      h = _block(h, sd, f"encoder.down.{i}.block.{j}", g)
      if f"encoder.down.{i}.attn.{j}.q.weight" in sd:
        h = _attn(h, sd, f"encoder.down.{i}.attn.{j}", g)
    if i != n - 1:
      h = _cv(h, sd, f"encoder.down.{i}.downsample.conv", stride=2, pad=(0, 1, 0, 1))
  h = _cv(_swish(_norm(_mid(h, sd, "encoder", g), sd, "encoder.norm_out", g)), sd, "encoder.conv_out")
  return _cv(h, sd, "quant_conv")


def ref_decode(sd, cfg, zq):
  g, n = cfg.norm_groups, len(cfg.channel_mult)
  h = _mid(_cv(_cv(zq, sd, "post_quant_conv"), sd, "decoder.conv_in"), sd, "decoder", g)
  for i in reversed(range(n)):
    for j in range(cfg.num_res_blocks + 1):
      h = _block(h, sd, f"decoder.up.{i}.block.{j}", g)
      if f"decoder.up.{i}.attn.{j}.q.weight" in sd:
        h = _attn(h, sd, f"decoder.up.{i}.attn.{j}", g)
    if i != 0:
      h = _cv(h.repeat(2, axis=2).repeat(2, axis=3), sd, f"decoder.up.{i}.upsample.conv")
  return _cv(_swish(_norm(h, sd, "decoder.norm_out", g)), sd, "decoder.conv_out")


def test_converted_model_matches_numpy_taming_reference():
  cfg = micro_config()
  sd = {k: v.astype(np.float64) for k, v in random_state_dict(shapes_for(cfg), seed=3).items()}
  params = tv.convert_state_dict(sd, cfg)
  x = np.random.default_rng(4).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  with jax.default_matmul_precision("highest"):
    z = vqgan.VQGAN(cfg).apply({"params": params}, jnp.asarray(x), method=vqgan.VQGAN.encode_latent)
    codes = vqgan.encode(params, jnp.asarray(x), cfg)
    recon = vqgan.VQGAN(cfg).apply({"params": params}, codes, method=vqgan.VQGAN.decode)
  z_ref = ref_encode(sd, cfg, x.transpose(0, 3, 1, 2).astype(np.float64))
  np.testing.assert_allclose(np.asarray(z), z_ref.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  e = sd["quantize.embedding.weight"]
  zf = z_ref.transpose(0, 2, 3, 1).reshape(2, -1, cfg.embed_dim)
  codes_ref = np.argmin(((zf[:, :, None, :] - e[None, None]) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(np.asarray(codes), codes_ref)
  zq = e[codes_ref].reshape(2, 8, 8, cfg.embed_dim).transpose(0, 3, 1, 2)
  np.testing.assert_allclose(np.asarray(recon), ref_decode(sd, cfg, zq).transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
