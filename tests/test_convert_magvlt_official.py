"""Released-MAGVLT conversion: a fake Lightning .ckpt in the official key layout (shrunk shapes,
written torch-free) -> a workdir the Sampler loads; strictness; the official config variants."""
import os

import jax
import numpy as np
import pytest

from magvlt_jax import checkpoints, configs_util, sampler as sampler_lib
from magvlt_jax import text as text_lib
from magvlt_jax.convert import magvlt_official as mo
from magvlt_jax.convert import taming_vqgan as tv
from magvlt_jax.convert import torch_pickle_writer
from magvlt_jax.models import transformer, vqgan

from tests import test_convert_taming as taming_test


def micro_config():
  """A shrunk official layout: 2 layers x 32 wide, taming VQGAN 16x16 -> 8x8 codes (64 slots)."""
  config = configs_util.load_config("configs/magvlt.py:tiny")
  config.model.update(dict(num_layers=2, embed_dim=32, num_heads=2, scan_layers=False))
  config.model.length_classes = 8  # also text_length
  config.decoding.uncond_text_length = (4, 8)
  micro = taming_test.micro_config()
  config.vqgan.update({k: micro[k] for k in ("image_size", "base_channels", "channel_mult",
                                             "num_res_blocks", "attn_resolutions", "z_channels",
                                             "embed_dim", "codebook_size", "norm_groups",
                                             "norm_type", "mid_attention")})
  config.vqgan.quantizer.l2_normalize = False
  config.sequence.image_tokens = vqgan.latent_grid(config.vqgan) ** 2
  config.sequence.text_vocab_size = config.text.vocab_size = 64
  d = config.decoding
  d.t2i_steps = d.i2t_steps = d.uncond_steps = 2
  d.num_image_candidates = d.num_text_candidates = 1
  d.rerank = "none"
  config.sample.batch_size = 1
  return config


def official_shapes(config):
  """The official `model.*` key names and shapes (notes section 8) for `config`'s sizes."""
  d, s = int(config.model.embed_dim), config.sequence
  vocab = int(s.image_vocab_size + s.text_vocab_size)
  n_img, n_txt = int(s.image_tokens), int(s.text_length)
  out = {"tok_emb.weight": (vocab, d), "tok_emb_spc.weight": (10, d),
         "pos_emb_img.pos_embed": (n_img, d), "pos_emb_txt.pos_embed": (n_txt, d),
         "pos_emb_spc.pos_embed": (4 + n_img + n_txt, d),
         "lm_layer.linear.weight": (d, d), "lm_layer.linear.bias": (d,),
         "lm_layer.ln.weight": (d,), "lm_layer.ln.bias": (d,), "lm_layer.output_bias": (vocab,),
         "length_predictor.weight": (int(config.model.length_classes), d)}
  for i in range(int(config.model.num_layers)):
    b = f"blocks.{i}"
    for ln in ("ln1", "ln2"):
      out[f"{b}.{ln}.weight"] = out[f"{b}.{ln}.bias"] = (d,)
    for p in ("query", "key", "value", "proj"):
      out[f"{b}.attn.{p}.weight"], out[f"{b}.attn.{p}.bias"] = (d, d), (d,)
    out[f"{b}.mlp.0.weight"], out[f"{b}.mlp.0.bias"] = (4 * d, d), (4 * d,)
    out[f"{b}.mlp.2.weight"], out[f"{b}.mlp.2.bias"] = (d, 4 * d), (d,)
  return {"model." + k: v for k, v in out.items()}


def fake_state_dict(config, seed=0):
  rng = np.random.default_rng(seed)
  sd = {k: (0.05 * rng.standard_normal(s)).astype(np.float32)
        for k, s in official_shapes(config).items()}
  vq = taming_test.random_state_dict(taming_test.shapes_for(config.vqgan), seed + 1)
  sd.update({"model_vqvae." + k: v for k, v in vq.items()})
  return sd


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  root = tmp_path_factory.mktemp("official")
  config = micro_config()
  sd = fake_state_dict(config)
  ckpt = str(root / "magvlt-it2it-micro.ckpt")
  torch_pickle_writer.save_state_dict_zip(ckpt, sd, wrap_key="state_dict")  # Lightning layout
  spm = str(root / "spm.model")
  text_lib.TextTokenizer.train([f"a {c} circle on the {p}" for c in ("red", "blue")
                                for p in ("left", "right")] * 10, 40, spm)
  out = str(root / "workdir")
  mo.convert_file(ckpt, out, config, text_files=[spm])
  return config, sd, out


def test_every_key_placed_with_the_official_transposes(converted):
  config, sd, out = converted
  params = checkpoints.load_params(out, abstract=transformer.param_shapes(config))
  flat = {"/".join(str(k.key) for k in p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
  n_model = sum(k.startswith("model.") for k in sd)
  assert len(flat) == n_model  # one param per official transformer key
  assert sum(v.size for v in flat.values()) == sum(
      v.size for k, v in sd.items() if k.startswith("model."))
  np.testing.assert_array_equal(flat["token_embed"], sd["model.tok_emb.weight"])
  np.testing.assert_array_equal(flat["length_head/kernel"], sd["model.length_predictor.weight"].T)
  np.testing.assert_array_equal(flat["block_1/mlp/fc1/kernel"], sd["model.blocks.1.mlp.0.weight"].T)
  # Heads are contiguous 16-wide column blocks of the [out, in] torch weight.
  wq = sd["model.blocks.0.attn.query.weight"]
  np.testing.assert_array_equal(flat["block_0/attn/wq"][:, 1, :], wq[16:32].T)
  np.testing.assert_array_equal(flat["block_0/attn/bk"][1], sd["model.blocks.0.attn.key.bias"][16:])
  np.testing.assert_array_equal(flat["block_0/attn/wo"][1],
                                sd["model.blocks.0.attn.proj.weight"][:, 16:32].T)
  vq = vqgan.load_params(out, config.vqgan)
  back = tv.to_taming_state_dict(jax.tree.map(np.asarray, vq))
  assert len(back) == sum(k.startswith("model_vqvae.") for k in sd)
  for k, v in back.items():
    np.testing.assert_array_equal(v, sd["model_vqvae." + k])


def test_attention_matches_the_torch_formula(converted):
  """Block 0's query projection in our layout equals x @ W.T + b of the torch Linear."""
  config, sd, out = converted
  params = checkpoints.load_params(out, abstract=transformer.param_shapes(config))
  x = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
  ours = np.einsum("ld,dhk->lhk", x, np.asarray(params["block_0"]["attn"]["wq"]))
  ours = (ours + np.asarray(params["block_0"]["attn"]["bq"])).reshape(5, 32)
  ref = x @ sd["model.blocks.0.attn.query.weight"].T + sd["model.blocks.0.attn.query.bias"]
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)


def test_converted_workdir_samples(converted):
  config, _, out = converted
  assert checkpoints.load_config(out).model.num_layers == 2
  sampler = sampler_lib.Sampler.from_checkpoint(out)
  images = sampler.text_to_image(["a red circle"], n=1, seed=0)
  assert images[0].size == (16, 16)
  captions = sampler.image_to_text(np.zeros((1, 16, 16, 3), np.uint8), n=1, seed=0)
  assert len(captions) == 1 and isinstance(captions[0], str)


def test_scanned_layout_stacks_the_blocks(converted):
  config, sd, _ = converted
  scanned = config.copy_and_resolve_references()
  scanned.model.scan_layers = True
  model_sd, _, _ = mo.split_state_dict(sd)
  params = mo.convert_transformer(model_sd, scanned)
  assert params["blocks"]["mlp"]["fc2"]["kernel"].shape == (2, 128, 32)
  np.testing.assert_array_equal(params["blocks"]["ln2"]["scale"][1], sd["model.blocks.1.ln2.weight"])


@pytest.mark.parametrize("edit, named", [
    ("drop", "model.blocks.1.attn.value.bias"),
    ("extra", "model.blocks.2.ln1.weight"),
    ("shape", "model.lm_layer.output_bias"),
    ("drop_vq", "missing key for encoder/conv_in/kernel"),
    ("foreign", "optimizer.state"),
])
def test_strict_errors_name_the_key(edit, named):
  config = micro_config()
  sd = fake_state_dict(config)
  if edit == "drop":
    del sd[named]
  elif edit == "extra":
    sd[named] = np.ones((32,), np.float32)
  elif edit == "shape":
    sd[named] = np.zeros((7,), np.float32)
  elif edit == "drop_vq":
    del sd["model_vqvae.encoder.conv_in.weight"]
  else:
    sd[named] = np.zeros((1,), np.float32)
  with pytest.raises(ValueError, match=named.replace(".", r"\.")):
    mo.convert_state_dict(sd, config, source="fake.ckpt")


def test_workdir_refuses_to_overwrite_checkpoints(converted, tmp_path):
  config, sd, out = converted
  with pytest.raises(FileExistsError, match="checkpoints"):
    mo.write_workdir(out, config, {}, {})


@pytest.mark.parametrize("variant, layers, width", [("official_base", 24, 1024),
                                                   ("official_large", 36, 1280)])
def test_official_variants(variant, layers, width):
  c = configs_util.load_config(f"configs/magvlt.py:{variant}")
  configs_util.validate_config(c)
  assert (c.model.num_layers, c.model.embed_dim, c.model.embed_dim // c.model.num_heads) == (
      layers, width, 128)
  assert (c.sequence.text_vocab_size, c.sequence.text_length, c.sequence.image_tokens) == (49408, 64, 256)
  assert c.vqgan.codebook_size == 16384 and c.vqgan.norm_type == "group"
  d = c.decoding
  assert (d.t2i_steps, tuple(d.image_temperature), tuple(d.gumbel_scale)) == (10, (1.4, 0.6), (2.0, 0.2))
  assert (d.i2t_steps, d.text_top_k, d.text_temperature) == (12, 32, 0.1)
  assert (d.num_image_candidates, d.num_text_candidates) == (32, 64)
  assert d.length_probe_text_length == 16  # sampling_i2t.py's dummy txt_mask of 16 ones
  # Every official key has exactly one of our params of the same size (371,533,056 for base).
  n_official = sum(int(np.prod(s)) for s in official_shapes(c).values())
  assert transformer.param_count(c) == n_official
  if variant == "official_base":
    assert n_official == 371_533_056


def test_trainer_resumes_from_the_converted_state(converted):
  """--mode=train restores checkpoints/0 (converted params + fresh optimizer state) to fine-tune."""
  from magvlt_jax import image_tokenizers
  from magvlt_jax.train import trainer
  config, sd, out = converted
  tok = text_lib.TextTokenizer.load(os.path.join(out, "text", "spm.model"))
  setup = trainer.Setup(config, out, tok, image_tokenizers.params_for_run(config, out))
  store = checkpoints.CheckpointStore(os.path.join(out, "checkpoints"), async_save=False)
  state, data_state = store.restore_latest(setup.abstract_state())
  store.close()
  assert int(state.step) == 0 and data_state is None
  np.testing.assert_array_equal(np.asarray(state.params["pos_spc"]), sd["model.pos_emb_spc.pos_embed"])
  assert all(float(np.abs(np.asarray(x)).max()) == 0.0 for x in jax.tree.leaves(state.opt_state)
             if np.ndim(x) > 0)  # fresh Adam moments


def _official_forward_i2t(sd, config, img, txt, txt_len, img_masked, txt_masked):
  """numpy transcription of the official Transformer1d + LMLayer + length predictor forward in the
  I2T layout, written from notes/official_magvlt.md sections 2-3 with the torch key names."""
  from scipy.special import erf
  w = {k[len("model."):]: v.astype(np.float64) for k, v in sd.items() if k.startswith("model.")}
  s = config.sequence
  v_img, n_img, n_txt, heads = int(s.image_vocab_size), int(s.image_tokens), int(s.text_length), int(
      config.model.num_heads)
  b = img.shape[0]
  gelu = lambda x: 0.5 * x * (1.0 + erf(x / np.sqrt(2.0)))

  def ln(x, name):
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w[f"{name}.weight"] + w[f"{name}.bias"]

  lin = lambda x, name: x @ w[f"{name}.weight"].T + w.get(f"{name}.bias", 0.0)
  # [BOC, BOI, image, BOG, BOT, text]; specials BOI=0 BOT=1 BOC=2 BOG=3 MASK_IMG=4 MASK_TXT=5.
  tok = np.concatenate([np.full((b, 1), 2), np.full((b, 1), 0), np.where(img_masked, 4, img),
                        np.full((b, 1), 3), np.full((b, 1), 1), np.where(txt_masked, 5, txt)], 1)
  pos = np.concatenate([np.zeros((b, 1)), np.ones((b, 1)), np.tile(np.arange(n_img), (b, 1)),
                        np.full((b, 1), 2), np.full((b, 1), 3), np.tile(np.arange(n_txt), (b, 1))],
                       1).astype(int)
  f, t = np.zeros((b, 2), bool), np.ones((b, 2), bool)
  loc_img = np.concatenate([f, np.ones((b, n_img), bool), f, np.zeros((b, n_txt), bool)], 1)
  loc_txt = np.concatenate([f, np.zeros((b, n_img), bool), f, np.ones((b, n_txt), bool)], 1)
  loc_spc = np.concatenate([t, img_masked, t, txt_masked], 1)
  L = tok.shape[1]
  x = np.zeros((b, L, w["tok_emb.weight"].shape[1]))
  x[loc_img & ~loc_spc] = w["tok_emb.weight"][tok[loc_img & ~loc_spc]]
  x[loc_txt & ~loc_spc] = w["tok_emb.weight"][v_img + tok[loc_txt & ~loc_spc]]
  x[loc_spc] = w["tok_emb_spc.weight"][tok[loc_spc]]
  x[loc_img] += w["pos_emb_img.pos_embed"][pos[loc_img]]
  x[loc_txt] += w["pos_emb_txt.pos_embed"][pos[loc_txt]]
  x[loc_spc] += w["pos_emb_spc.pos_embed"][pos[loc_spc]]
  offset, bot = 4 + n_img, 2 + n_img + 1
  mask = np.ones((b, L, L), bool)
  for i, n in enumerate(txt_len):
    mask[i, :, offset + n:offset + n_txt] = False
  mask[:, bot, bot + 1:] = False
  mask[~mask.any(-1)[..., None] & np.eye(L, dtype=bool)[None]] = True
  for i in range(int(config.model.num_layers)):
    p = f"blocks.{i}"
    h = ln(x, f"{p}.ln1")
    q, k, v = (lin(h, f"{p}.attn.{n}").reshape(b, L, heads, -1) for n in ("query", "key", "value"))
    att = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    att = np.where(mask[:, None], att, -np.inf)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    x = x + lin(np.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, L, -1), f"{p}.attn.proj")
    x = x + lin(gelu(lin(ln(x, f"{p}.ln2"), f"{p}.mlp.0")), f"{p}.mlp.2")
  h = ln(gelu(lin(x, "lm_layer.linear")), "lm_layer.ln")
  logits = h @ w["tok_emb.weight"].T + w["lm_layer.output_bias"]
  return {"image": logits[:, 2:2 + n_img, :v_img], "text": logits[:, offset:, v_img:],
          "length": x[:, bot] @ w["length_predictor.weight"].T}


def test_converted_logits_equal_a_numpy_transcription_of_the_official_forward(converted):
  from magvlt_jax import sequence as seq
  config, sd, out = converted
  params = checkpoints.load_params(out, abstract=transformer.param_shapes(config))
  rng = np.random.default_rng(5)
  s = config.sequence
  img = rng.integers(0, s.image_vocab_size, (2, s.image_tokens))
  txt = rng.integers(0, s.text_vocab_size, (2, s.text_length))
  txt_len = np.array([3, 8])
  img_masked = rng.random(img.shape) < 0.3
  txt_masked = rng.random(txt.shape) < 0.5
  ref = _official_forward_i2t(sd, config, img, txt, txt_len, img_masked, txt_masked)
  layout = seq.layout_from_config(config, seq.Task.I2T)
  inputs = seq.build_input(layout, img, txt, img_masked, txt_masked,
                           image_vocab_size=int(s.image_vocab_size))
  with jax.default_matmul_precision("highest"):
    ours = transformer.from_config(config).apply(
        {"params": params}, inputs, seq.attention_mask(layout, txt_len), layout=layout,
        outputs=("image", "text", "length"))
  for name in ("image", "text", "length"):
    err = np.linalg.norm(np.asarray(ours[name]) - ref[name]) / np.linalg.norm(ref[name])
    assert err < 1e-5, (name, err)


def test_sampler_from_an_official_ckpt_with_clip_bpe(tmp_path):
  """Sampler.from_checkpoint(X.ckpt): converted next to the file once, ClipBPE text from
  config.text.clip_vocab (a micro CLIP-format vocabulary)."""
  import gzip
  from magvlt_jax import text_clip
  vocab = str(tmp_path / text_clip.CLIP_GZ_FILE)
  with gzip.open(vocab, "wt", encoding="utf-8") as f:
    f.write("#version: 0.2\nc a\nca t</w>\nr e\nre d</w>\n")
  config = micro_config()
  config.text.kind, config.text.clip_vocab = "clip_bpe", vocab
  config.sequence.text_vocab_size = config.text.vocab_size = 518  # 512 byte symbols + 4 + 2
  ckpt = str(tmp_path / "magvlt-it2it-micro.ckpt")
  torch_pickle_writer.save_state_dict_zip(ckpt, fake_state_dict(config), wrap_key="state_dict")
  sampler = sampler_lib.Sampler.from_checkpoint(ckpt, config=config)
  assert os.path.exists(ckpt + ".magvlt_jax/config.json")
  assert isinstance(sampler.tokenizer, text_clip.ClipBPETokenizer) and sampler.tokenizer.eos_id == 517
  ids, lengths = sampler.encode_text(["a red cat"])
  assert ids[0, :4].tolist() == [320, 515, 513, 517] and lengths[0] == 4  # a</w> is 320 as in CLIP
  assert sampler.text_to_image(["a red cat"], n=1, seed=0)[0].size == (16, 16)
  again = sampler_lib.Sampler.from_checkpoint(ckpt)  # reuses the converted workdir and its config
  assert again.tokenizer.vocab_size == 518


@pytest.mark.slow  # ~70 s CPU (134 s wall under load): dataset build, an eval and a 2-step run
def test_converted_workdir_evaluates_and_fine_tunes(tmp_path):
  """The converted workdir runs `--mode=evaluate` and `--mode=train` (main.run) unchanged: the
  report is complete, and training resumes from the converted step 0 and moves the params."""
  from magvlt_jax import main
  from magvlt_jax.evaluation import report as rep
  config = micro_config()
  config.data.synthetic.update(num_train=16, num_eval=8)
  config.data.global_batch_size = 4
  for key in ("num_t2i", "num_i2t", "num_inpaint", "num_infill", "num_recon"):
    config.eval[key] = 2
  config.eval.batch_size = config.eval.num_grid = 2
  config.train.update(num_steps=2, log_every=1, checkpoint_every=2, sample_every=1000,
                      num_sample_prompts=2)
  sd = fake_state_dict(config, seed=4)
  ckpt = str(tmp_path / "magvlt-it2it-micro.ckpt")
  torch_pickle_writer.save_state_dict_zip(ckpt, sd, wrap_key="state_dict")
  spm = str(tmp_path / "spm.model")
  text_lib.TextTokenizer.train([f"a {c} {s} in the {p}" for c in ("red", "blue")
                                for s in ("circle", "square") for p in ("left", "right")] * 5,
                               40, spm)
  out = str(tmp_path / "workdir")
  mo.convert_file(ckpt, out, config, text_files=[spm])

  main.run(config, out, "evaluate")
  report = rep.load_report(os.path.join(out, "eval", "report_step_0.json"))
  assert rep.check_complete(report) == []
  assert report["counts"]["t2i"] == 2 and report["counts"]["i2t"] == 2
  assert report["metrics"]["tokenizer"]["psnr"] > 0

  main.run(config, out, "train")
  store = checkpoints.CheckpointStore(os.path.join(out, "checkpoints"), async_save=False)
  assert store.all_steps()[-1] == 2
  store.close()
  tuned = checkpoints.load_params(out, abstract=transformer.param_shapes(config), step=2)
  before, after = sd["model.tok_emb.weight"], np.asarray(tuned["token_embed"])
  change = np.linalg.norm(after - before) / np.linalg.norm(before)
  # Fine-tuned from the converted weights (two warm-up steps move them a little), not re-initialised
  # (a fresh init would differ by ~100%).
  assert 0.0 < change < 0.05, change
