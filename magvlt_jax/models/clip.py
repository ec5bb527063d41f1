"""CLIP (ViT image tower + causal text tower) in Flax, loaded from user-supplied weights.

Supported weight files (config.decoding.clip_weights, shared by config.eval.clip_weights):
  * an OpenAI CLIP *state dict* saved with torch.save (`visual.conv1.weight`, `visual.transformer.
    resblocks.N.attn.in_proj_weight`, `token_embedding.weight`, `text_projection`, `logit_scale`...),
    e.g. `torch.save(clip.load("ViT-B/32", jit=False)[0].state_dict(), "ViT-B-32.pth")`;
  * an open_clip checkpoint of a ViT CLIP (`{"state_dict": {"module.visual...": ...}}`, the same key
    layout; pass activation="gelu" for open_clip models trained without QuickGELU);
  * an `.npz` holding either of the above key sets.
Not supported: OpenAI's TorchScript `.pt` archives (convert them to a state dict once with torch),
the ModifiedResNet (RN50...) towers, Hugging Face `CLIPModel` folders.
The architecture (widths, layers, patch, resolution, context, vocab) is read from the shapes, as
OpenAI's build_model does; heads = width // 64 (at least 1).
"""
import dataclasses
import os
from typing import Any, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax.convert import torch_layout
from magvlt_jax.models import clip_tokenizer

CONFIG_KEY = "config.decoding.clip_weights"
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  embed_dim: int = 512
  image_resolution: int = 224
  vision_layers: int = 12
  vision_width: int = 768
  vision_patch_size: int = 32
  context_length: int = 77
  vocab_size: int = 49408
  transformer_width: int = 512
  transformer_layers: int = 12
  activation: str = "quick_gelu"  # OpenAI weights; "gelu" for most open_clip trainings

  @property
  def vision_heads(self):
    return max(1, self.vision_width // 64)

  @property
  def transformer_heads(self):
    return max(1, self.transformer_width // 64)


class ResidualAttentionBlock(nn.Module):
  width: int
  heads: int
  activation: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, causal: bool):
    ln = lambda name: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)
    b, n, w = x.shape
    hd = w // self.heads
    y = ln("ln_1")(x)
    qkv = nn.Dense(3 * w, dtype=self.dtype, name="in_proj")(y).reshape(b, n, 3, self.heads, hd)
    q, k, v = (qkv[:, :, i].astype(jnp.float32) for i in range(3))
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    if causal:
      logits = jnp.where(jnp.tril(jnp.ones((n, n), bool)), logits, -1e30)
    att = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1), v).reshape(b, n, w)
    x = x + nn.Dense(w, dtype=self.dtype, name="out_proj")(att.astype(self.dtype))
    y = nn.Dense(4 * w, dtype=self.dtype, name="c_fc")(ln("ln_2")(x))
    y = y * jax.nn.sigmoid(1.702 * y) if self.activation == "quick_gelu" else nn.gelu(y, False)
    return x + nn.Dense(w, dtype=self.dtype, name="c_proj")(y)


class Transformer(nn.Module):
  width: int
  layers: int
  heads: int
  activation: str = "quick_gelu"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, causal: bool = False):
    for i in range(self.layers):
      x = ResidualAttentionBlock(self.width, self.heads, self.activation, self.dtype,
                                 name=f"resblocks_{i}")(x, causal)
    return x


class VisionTransformer(nn.Module):
  config: CLIPConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, pixels):  # [B, R, R, 3] normalised
    c = self.config
    p, w = c.vision_patch_size, c.vision_width
    x = nn.Conv(w, (p, p), (p, p), padding="VALID", use_bias=False, dtype=self.dtype,
                name="conv1")(pixels.astype(self.dtype))
    b = x.shape[0]
    x = x.reshape(b, -1, w)
    cls = self.param("class_embedding", nn.initializers.normal(w ** -0.5), (w,))
    grid = (c.image_resolution // p) ** 2
    pos = self.param("positional_embedding", nn.initializers.normal(w ** -0.5), (grid + 1, w))
    x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, w)).astype(x.dtype), x], axis=1) + pos
    x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="ln_pre")(x)
    x = Transformer(w, c.vision_layers, c.vision_heads, c.activation, self.dtype,
                    name="transformer")(x)
    x = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name="ln_post")(x[:, 0])
    proj = self.param("proj", nn.initializers.normal(w ** -0.5), (w, c.embed_dim))
    return x.astype(jnp.float32) @ proj


class CLIP(nn.Module):
  """Methods: encode_image(pixels) and encode_text(tokens) -> unnormalised [B, embed_dim]."""
  config: CLIPConfig
  dtype: Any = jnp.float32

  def setup(self):
    c = self.config
    tw = c.transformer_width
    self.visual = VisionTransformer(c, self.dtype)
    self.transformer = Transformer(tw, c.transformer_layers, c.transformer_heads, c.activation,
                                   self.dtype)
    self.token_embedding = nn.Embed(c.vocab_size, tw)
    self.positional_embedding = self.param("positional_embedding", nn.initializers.normal(0.01),
                                           (c.context_length, tw))
    self.ln_final = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)
    self.text_projection = self.param("text_projection", nn.initializers.normal(tw ** -0.5),
                                      (tw, c.embed_dim))
    self.logit_scale = self.param("logit_scale", lambda _: jnp.array(np.log(1 / 0.07), jnp.float32))

  def encode_image(self, pixels):
    return self.visual(pixels)

  def encode_text(self, tokens):
    x = self.token_embedding(tokens).astype(self.dtype) + self.positional_embedding
    x = self.ln_final(self.transformer(x, causal=True))
    eot = jnp.argmax(tokens, axis=-1)  # EOT has the largest id in CLIP's vocabulary
    return x[jnp.arange(x.shape[0]), eot].astype(jnp.float32) @ self.text_projection

  def __call__(self, pixels, tokens):
    return self.encode_image(pixels), self.encode_text(tokens)


def preprocess(images_uint8, resolution: int):
  """uint8 NHWC -> CLIP input: bicubic resize of the short side, centre crop, mean/std."""
  x = jnp.asarray(images_uint8).astype(jnp.float32) / 255.0
  b, h, w, _ = x.shape
  scale = resolution / min(h, w)
  nh, nw = max(resolution, round(h * scale)), max(resolution, round(w * scale))
  if (nh, nw) != (h, w):
    x = jax.image.resize(x, (b, nh, nw, 3), "bicubic", antialias=True)
  top, left = (nh - resolution) // 2, (nw - resolution) // 2
  x = x[:, top:top + resolution, left:left + resolution]
  return (x - jnp.array(MEAN)) / jnp.array(STD)


# ----------------------------------------------------------------------------- weights

_IGNORED = ("input_resolution", "context_length", "vocab_size")  # scalars in some OpenAI dicts


def _normalise_keys(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  out = {}
  for k, v in sd.items():
    k = k[len("module."):] if k.startswith("module.") else k  # open_clip DDP checkpoints
    if k not in _IGNORED and not k.endswith("attn_mask"):
      out[k] = v
  return out


def config_from_state_dict(sd: Mapping[str, np.ndarray], activation: str = "quick_gelu"):
  """Infers the CLIPConfig from tensor shapes (OpenAI build_model rules)."""
  if "visual.conv1.weight" not in sd:
    hint = " (a ModifiedResNet CLIP?)" if any(k.startswith("visual.layer1") for k in sd) else ""
    raise ValueError(f"not a ViT CLIP state dict{hint}: 'visual.conv1.weight' missing; "
                     f"first keys {sorted(sd)[:5]} ({CONFIG_KEY})")
  conv = sd["visual.conv1.weight"]
  grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
  count = lambda prefix: len({k.split(".")[len(prefix.split("."))] for k in sd
                              if k.startswith(prefix + ".")})
  return CLIPConfig(
      embed_dim=sd["text_projection"].shape[1], image_resolution=conv.shape[-1] * grid,
      vision_layers=count("visual.transformer.resblocks"), vision_width=conv.shape[0],
      vision_patch_size=conv.shape[-1], context_length=sd["positional_embedding"].shape[0],
      vocab_size=sd["token_embedding.weight"].shape[0],
      transformer_width=sd["ln_final.weight"].shape[0],
      transformer_layers=count("transformer.resblocks"), activation=activation)


def _torch_key(names):
  names = [n.replace("resblocks_", "resblocks.") for n in names]
  *mods, leaf = names
  if mods and mods[-1] == "in_proj":
    return ".".join(mods[:-1] + ["attn", f"in_proj_{'weight' if leaf == 'kernel' else 'bias'}"])
  if mods and mods[-1] == "out_proj":
    mods = mods[:-1] + ["attn", "out_proj"]
  if mods and mods[-1] in ("c_fc", "c_proj"):
    mods = mods[:-1] + ["mlp", mods[-1]]
  renamed = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
  return ".".join(mods + [renamed])


def abstract_params(config: CLIPConfig):
  r, t = config.image_resolution, config.context_length
  return jax.eval_shape(CLIP(config).init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, r, r, 3), jnp.float32),
                        jax.ShapeDtypeStruct((1, t), jnp.int32))["params"]


def convert_state_dict(sd: Mapping[str, np.ndarray], activation: str = "quick_gelu",
                       source: str = "state dict"):
  """(CLIPConfig, params) from an OpenAI/open_clip ViT state dict; every key used, shapes checked."""
  sd = _normalise_keys(sd)
  config = config_from_state_dict(sd, activation)
  params = torch_layout.assign(abstract_params(config), sd, _torch_key,
                               f"a ViT CLIP ({CONFIG_KEY})", source)
  return config, params


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  what = ("CLIP reranking / CLIP score need CLIP weights (also read as config.eval.clip_weights): "
          "a ViT CLIP state dict or an open_clip checkpoint")
  return torch_layout.read_weights(torch_layout.check_path(path, CONFIG_KEY, what))


class CLIPScorer:
  """Loaded CLIP + tokenizer with jitted, batched encoders (one compilation per batch size)."""

  def __init__(self, config: CLIPConfig, params, tokenizer, batch_size: int = 64, dtype=jnp.float32):
    self.config, self.params, self.tokenizer, self.batch_size = config, params, tokenizer, batch_size
    model = CLIP(config, dtype)
    res = config.image_resolution
    self._image_fn = jax.jit(lambda p, x: model.apply({"params": p}, preprocess(x, res),
                                                      method=CLIP.encode_image))
    self._text_fn = jax.jit(lambda p, t: model.apply({"params": p}, t, method=CLIP.encode_text))

  @classmethod
  def from_path(cls, weights_path: str, bpe_path: Optional[str] = None,
                activation: str = "quick_gelu", **kw) -> "CLIPScorer":
    """bpe_path: the BPE merges file; default: beside the weights, else open_clip's bundled one."""
    config, params = convert_state_dict(read_state_dict(weights_path), activation, weights_path)
    if not bpe_path:
      beside = os.path.join(os.path.dirname(weights_path), "bpe_simple_vocab_16e6.txt.gz")
      bpe_path = beside if os.path.exists(beside) else clip_tokenizer.find_bpe_file()
    if not bpe_path:
      raise FileNotFoundError("CLIP needs its BPE file bpe_simple_vocab_16e6.txt.gz: pass bpe_path, "
                              "put it beside the weights, or pip install open-clip-torch")
    tok = clip_tokenizer.CLIPTokenizer(bpe_path)
    if tok.vocab_size != config.vocab_size:
      raise ValueError(f"BPE file {bpe_path} gives {tok.vocab_size} tokens but the weights "
                       f"expect {config.vocab_size}")
    return cls(config, params, tok, **kw)

  def _batched(self, fn, data):
    outs = []
    for s in range(0, len(data), self.batch_size):
      chunk = np.asarray(data[s:s + self.batch_size])
      n = len(chunk)
      if n < self.batch_size:  # pad to a fixed shape, drop afterwards
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.batch_size - n, 0)])
      outs.append(np.asarray(fn(self.params, chunk))[:n])
    emb = np.concatenate(outs)
    return emb / np.linalg.norm(emb, axis=-1, keepdims=True)

  def encode_images(self, images_uint8) -> np.ndarray:
    """L2-normalised image embeddings [N, embed_dim] of uint8 NHWC images (any size)."""
    return self._batched(self._image_fn, np.asarray(images_uint8))

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    tokens = self.tokenizer.tokenize(list(texts), self.config.context_length)
    return self._batched(self._text_fn, tokens)

  def similarity(self, images_uint8, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarity of each image with its own text [N]."""
    if len(images_uint8) != len(texts):
      raise ValueError(f"{len(images_uint8)} images but {len(texts)} texts")
    return np.sum(self.encode_images(images_uint8) * self.encode_texts(texts), axis=-1)

  def similarity_matrix(self, images_uint8, texts: Sequence[str]) -> np.ndarray:
    """Cosine similarities [num_images, num_texts] (reranking candidates against prompts)."""
    return self.encode_images(images_uint8) @ self.encode_texts(texts).T


def clip_similarity(images_uint8, texts: Sequence[str], scorer: CLIPScorer) -> np.ndarray:
  """Paired cosine similarity [N]; CLIPScore = 100 * mean(max(., 0))."""
  return scorer.similarity(images_uint8, texts)
