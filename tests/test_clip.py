"""CLIP: OpenAI / open_clip key layouts with a tiny width, numpy reference forward, BPE tokenizer."""
import gzip

import numpy as np
import pytest

from magvlt_jax.convert import torch_pickle
from magvlt_jax.convert import torch_pickle_writer
from magvlt_jax.models import clip, clip_tokenizer

MERGES = ["t h", "th e</w>", "c a", "ca t</w>", "d o", "do g</w>", "a n</w>", "r e", "re d</w>"]
W, LAYERS, PATCH, RES, TW, CTX, EMBED = 64, 2, 8, 32, 64, 12, 32


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("bpe") / "bpe_simple_vocab_16e6.txt.gz"
  with gzip.open(path, "wt", encoding="utf-8") as f:
    f.write("#version: tiny\n" + "\n".join(MERGES) + "\n")
  return str(path)


def _openai_state_dict(vocab, seed=0):
  """Random tensors in the OpenAI CLIP (ViT) state dict layout."""
  rng = np.random.default_rng(seed)
  r = lambda *s: (rng.normal(size=s) * 0.2).astype(np.float32)
  sd = {"visual.conv1.weight": r(W, 3, PATCH, PATCH), "visual.class_embedding": r(W),
        "visual.positional_embedding": r((RES // PATCH) ** 2 + 1, W), "visual.proj": r(W, EMBED),
        "token_embedding.weight": r(vocab, TW), "positional_embedding": r(CTX, TW),
        "text_projection": r(TW, EMBED), "logit_scale": np.array(4.6052, np.float32),
        "input_resolution": np.array(RES), "context_length": np.array(CTX),
        "vocab_size": np.array(vocab)}
  for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
    width = TW if ln == "ln_final" else W
    sd[f"{ln}.weight"], sd[f"{ln}.bias"] = 1 + r(width), r(width)
  for tower, width in (("visual.transformer", W), ("transformer", TW)):
    for i in range(LAYERS):
      p = f"{tower}.resblocks.{i}"
      sd.update({f"{p}.attn.in_proj_weight": r(3 * width, width), f"{p}.attn.in_proj_bias": r(3 * width),
                 f"{p}.attn.out_proj.weight": r(width, width), f"{p}.attn.out_proj.bias": r(width),
                 f"{p}.ln_1.weight": 1 + r(width), f"{p}.ln_1.bias": r(width),
                 f"{p}.ln_2.weight": 1 + r(width), f"{p}.ln_2.bias": r(width),
                 f"{p}.mlp.c_fc.weight": r(4 * width, width), f"{p}.mlp.c_fc.bias": r(4 * width),
                 f"{p}.mlp.c_proj.weight": r(width, 4 * width), f"{p}.mlp.c_proj.bias": r(width)})
  return sd


def _ln(x, sd, name):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * sd[f"{name}.weight"] + sd[f"{name}.bias"]


def _np_transformer(x, sd, prefix, causal):
  """OpenAI's ResidualAttentionBlock stack (nn.MultiheadAttention, QuickGELU) in numpy."""
  n, width = x.shape[1], x.shape[2]
  heads, hd = width // 64, 64
  for i in range(LAYERS):
    p = f"{prefix}.resblocks.{i}"
    qkv = _ln(x, sd, f"{p}.ln_1") @ sd[f"{p}.attn.in_proj_weight"].T + sd[f"{p}.attn.in_proj_bias"]
    q, k, v = np.split(qkv, 3, axis=-1)
    split = lambda t: t.reshape(t.shape[0], n, heads, hd).transpose(0, 2, 1, 3)
    logits = split(q) @ split(k).transpose(0, 1, 3, 2) / np.sqrt(hd)
    if causal:
      logits = logits + np.triu(np.full((n, n), -np.inf), 1)
    att = np.exp(logits - logits.max(-1, keepdims=True))
    att = (att / att.sum(-1, keepdims=True)) @ split(v)
    att = att.transpose(0, 2, 1, 3).reshape(x.shape)
    x = x + att @ sd[f"{p}.attn.out_proj.weight"].T + sd[f"{p}.attn.out_proj.bias"]
    h = _ln(x, sd, f"{p}.ln_2") @ sd[f"{p}.mlp.c_fc.weight"].T + sd[f"{p}.mlp.c_fc.bias"]
    h = h / (1 + np.exp(-1.702 * h))
    x = x + h @ sd[f"{p}.mlp.c_proj.weight"].T + sd[f"{p}.mlp.c_proj.bias"]
  return x


def _np_encode_image(pixels, sd):  # pixels [B, RES, RES, 3], already normalised
  b, g = pixels.shape[0], RES // PATCH
  patches = pixels.reshape(b, g, PATCH, g, PATCH, 3).transpose(0, 1, 3, 5, 2, 4).reshape(b, g * g, -1)
  x = patches @ sd["visual.conv1.weight"].reshape(W, -1).T
  x = np.concatenate([np.broadcast_to(sd["visual.class_embedding"], (b, 1, W)), x], 1)
  x = _ln(x + sd["visual.positional_embedding"], sd, "visual.ln_pre")
  x = _np_transformer(x, sd, "visual.transformer", causal=False)
  return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def _np_encode_text(tokens, sd):
  x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
  x = _ln(_np_transformer(x, sd, "transformer", causal=True), sd, "ln_final")
  return x[np.arange(len(tokens)), tokens.argmax(-1)] @ sd["text_projection"]


def test_tokenizer_round_trip(bpe_path):
  tok = clip_tokenizer.CLIPTokenizer(bpe_path)
  assert tok.vocab_size == 512 + len(MERGES) + 2
  ids = tok.encode("The  red CAT &amp; a dog!")
  pieces = [tok.decoder[i] for i in ids]
  assert pieces[:2] == ["the</w>", "red</w>"] and "cat</w>" in pieces and "dog</w>" in pieces
  assert tok.decode(ids) == "the red cat & a dog !"
  assert tok.decode(tok.encode("zebra éclair")) == "zebra éclair"  # unmerged bytes survive
  batch = tok.tokenize(["the cat", "a dog " * 20], context_length=CTX)
  assert batch.shape == (2, CTX) and batch.dtype == np.int32
  assert list(batch[0, :4]) == [tok.sot_id, tok.encoder["the</w>"], tok.encoder["cat</w>"], tok.eot_id]
  assert batch[1, -1] == tok.eot_id and batch[0, 4:].sum() == 0
  with pytest.raises(ValueError, match="tokens >"):
    tok.tokenize(["a dog " * 20], context_length=CTX, truncate=False)


def test_openai_layout_loads_every_key_and_matches_reference(bpe_path, tmp_path):
  vocab = clip_tokenizer.CLIPTokenizer(bpe_path).vocab_size
  sd = _openai_state_dict(vocab)
  path = str(tmp_path / "clip_tiny.pth")
  torch_pickle_writer.save_state_dict_zip(path, sd)
  scorer = clip.CLIPScorer.from_path(path, bpe_path, batch_size=3)
  c = scorer.config
  assert (c.vision_width, c.vision_layers, c.vision_patch_size, c.image_resolution) == (W, LAYERS, PATCH, RES)
  assert (c.transformer_width, c.transformer_layers, c.context_length, c.embed_dim) == (TW, LAYERS, CTX, EMBED)

  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(4, RES, RES, 3), dtype=np.uint8)
  texts = ["the red cat", "a dog", "the dog and the cat", "red"]
  pixels = (images / 255.0 - np.array(clip.MEAN)) / np.array(clip.STD)
  want_img = _np_encode_image(pixels, sd)
  want_txt = _np_encode_text(scorer.tokenizer.tokenize(texts, CTX), sd)
  norm = lambda e: e / np.linalg.norm(e, axis=-1, keepdims=True)
  np.testing.assert_allclose(scorer.encode_images(images), norm(want_img), atol=2e-4)
  np.testing.assert_allclose(scorer.encode_texts(texts), norm(want_txt), atol=2e-4)
  sims = clip.clip_similarity(images, texts, scorer)
  np.testing.assert_allclose(sims, np.sum(norm(want_img) * norm(want_txt), -1), atol=3e-4)
  np.testing.assert_allclose(np.diag(scorer.similarity_matrix(images, texts)), sims, atol=1e-5)
  # a larger, non-square image goes through resize + centre crop
  assert scorer.encode_images(rng.integers(0, 256, (2, 48, 64, 3), dtype=np.uint8)).shape == (2, EMBED)


def test_open_clip_checkpoint_and_key_errors(bpe_path, tmp_path):
  vocab = clip_tokenizer.CLIPTokenizer(bpe_path).vocab_size
  sd = _openai_state_dict(vocab)
  path = str(tmp_path / "epoch_1.pt")
  torch_pickle_writer.save_state_dict_zip(path, {f"module.{k}": v for k, v in sd.items()},
                                   wrap_key="state_dict")
  config, params = clip.convert_state_dict(torch_pickle.load_state_dict(path))
  np.testing.assert_array_equal(params["transformer"]["resblocks_1"]["in_proj"]["kernel"],
                                sd["transformer.resblocks.1.attn.in_proj_weight"].T)
  assert config.vocab_size == vocab
  with pytest.raises(ValueError, match=r"1 unused \['logit_bias'\]"):
    clip.convert_state_dict(dict(sd, logit_bias=np.zeros(1, np.float32)))
  with pytest.raises(ValueError, match=r"1 missing \['visual.ln_post.bias'\]"):
    clip.convert_state_dict({k: v for k, v in sd.items() if k != "visual.ln_post.bias"})


def test_missing_weights_name_the_config_key(tmp_path):
  with pytest.raises(ValueError, match="config.decoding.clip_weights"):
    clip.CLIPScorer.from_path("")
  with pytest.raises(FileNotFoundError, match="config.decoding.clip_weights"):
    clip.CLIPScorer.from_path(str(tmp_path / "ViT-B-32.pth"))
