"""LXMERT's two-stream encoder (X-LXMERT's backbone; SPEC section 6) as a VLTransformer option.

The sequence, embeddings and heads are VLTransformer's (same params, same outputs, same call), so
the objectives, decoders and sampler use it unchanged (config.model.arch = "two_stream"). Only
the encoder differs: the slots are split into an image stream (the n_img image slots) and a
language stream (every other slot: BOC, BOT, BOG, BOI and the text), then
  language layers  (config.model.two_stream.language_layers, paper 9): self-attention blocks on
                   the language stream only;
  relation layers  (relation_layers, paper 5): self-attention blocks on the image stream only;
  cross layers     (cross_layers, paper 5): per stream, cross-attention to the OTHER stream (one
                   attention module shared by both directions, as LXMERT's LXRTXLayer, each
                   direction reading the layer's inputs), then a self-attention + MLP block.
Blocks are pre-LN like VLTransformer's (LXMERT is post-LN; ours keeps one block type). Attention
masks are the sub-matrices of sequence.attention_mask for each (query stream, key stream) pair,
so text padding stays hidden exactly as in the single-stream model. The outputs are scattered
back to the original slot order before the heads.
"""
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from magvlt_jax.models import layers
from magvlt_jax.models.transformer import VLTransformer


def stream_indices(layout):
  """(language slot indices, image slot indices) of `layout`, each sorted, int32 numpy."""
  img = np.arange(layout.image_start, layout.image_start + layout.n_img, dtype=np.int32)
  lang = np.setdiff1d(np.arange(layout.length, dtype=np.int32), img).astype(np.int32)
  return lang, img


def _sub_mask(mask, rows, cols):
  return None if mask is None else mask[:, :, rows][:, :, :, cols]


class CrossBlock(layers.Block):
  """One LXMERT cross-modality layer on (language x [B, Lt, D], image y [B, Li, D]); Block's
  fields (cache_length unused)."""

  @nn.compact
  def __call__(self, x, y, masks):
    """masks: dict of the 'ly' (language rows, image keys), 'yl', 'll', 'yy' sub-masks."""
    eps, dt, pd = self.layer_norm_eps, self.dtype, self.param_dtype
    cross = layers.Attention(self.num_heads, self.attention_dropout_rate, self.deterministic,
                             self.attention_impl, dt, pd, self.init_std, name="cross_attn")
    nx = layers.layer_norm(eps, dt, pd, name="ln_cross_lang")(x)
    ny = layers.layer_norm(eps, dt, pd, name="ln_cross_image")(y)
    cx = cross(nx, masks["ly"], context=ny)  # language queries, image keys/values only
    cy = cross(ny, masks["yl"], context=nx)  # image queries, language keys/values only
    self.sow("intermediates", "cross_lang", cx)
    self.sow("intermediates", "cross_image", cy)
    drop = nn.Dropout(self.dropout_rate, deterministic=self.deterministic)
    x, y = x + drop(cx), y + drop(cy)
    args = (self.num_heads, self.mlp_dim, self.dropout_rate, self.attention_dropout_rate, eps,
            self.deterministic, self.attention_impl, dt, pd, self.init_std)
    x = layers.Block(*args, name="lang_block")(x, masks["ll"])
    y = layers.Block(*args, name="image_block")(y, masks["yy"])
    return x, y


class TwoStreamTransformer(VLTransformer):
  """VLTransformer with LXMERT's language / object-relation / cross-modality encoder."""
  language_layers: int = 9
  relation_layers: int = 5
  cross_layers: int = 5

  @staticmethod
  def arch_kwargs(config):
    t = config.model.two_stream
    return dict(language_layers=int(t.language_layers), relation_layers=int(t.relation_layers),
                cross_layers=int(t.cross_layers))

  def _encode(self, x, mask, layout, deterministic):
    if self.decode or self.causal or self.scan_layers:
      raise ValueError("the two-stream transformer (config.model.arch='two_stream') is "
                       "bidirectional and unrolled: set model.causal=False, model.scan_layers=False "
                       "and use the masked decoder")
    lang, img = stream_indices(layout)
    masks = {"ll": _sub_mask(mask, lang, lang), "yy": _sub_mask(mask, img, img),
             "ly": _sub_mask(mask, lang, img), "yl": _sub_mask(mask, img, lang)}
    args = (self.num_heads, self.mlp_ratio * self.embed_dim, self.dropout_rate,
            self.attention_dropout_rate, self.layer_norm_eps, deterministic, self.attention_impl,
            self.dtype, self.param_dtype, self.init_std)
    block_cls = layers.maybe_remat(layers.Block, self.remat)
    xl, xi = x[:, lang], x[:, img]
    for i in range(self.language_layers):
      xl = block_cls(*args, name=f"lang_{i}")(xl, masks["ll"])
    for i in range(self.relation_layers):
      xi = block_cls(*args, name=f"relation_{i}")(xi, masks["yy"])
    cross_cls = layers.maybe_remat(CrossBlock, self.remat)
    for i in range(self.cross_layers):
      xl, xi = cross_cls(*args, name=f"cross_{i}")(xl, xi, masks)
    inverse = np.argsort(np.concatenate([lang, img]))
    out = jnp.concatenate([xl, xi], axis=1)[:, inverse]
    return layers.constrain(out, ("batch", "length", "embed"))
