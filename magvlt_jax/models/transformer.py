"""The MAGVLT vision-and-language transformer (SPEC section 2), flax.linen.

Embeddings: one shared token table [image_vocab + text_vocab, D] (image code v -> row v, text id
w -> row image_vocab + w), a special table [10, D] (incl. MASK_IMG/MASK_TXT and the MixSel
selectors), and learned positions for image [n_img, D], text [n_txt, D] and special slots [L, D].
Blocks are pre-LN with no final LayerNorm; the head is Dense -> GELU -> LayerNorm, tied to the
token table plus an output bias, evaluated per modality on its own vocabulary slice only. The
length head reads the BOT slot. Bidirectional by default; `causal=True` for the AR baselines.
X-LXMERT options, both off by default (then params and outputs are MAGVLT's): `box_embedding`
embeds image slots as LXMERT's object embedder, 0.5 * (LN(token) + LN(Dense(box))) with the
cell's normalised grid box (x0, x1, y0, y1) in place of the learned image position; `itm_head`
adds the image-text matching output 'itm' [B, 2] (pooler Dense -> tanh -> Dense on BOC, the
[CLS]-like slot). The LXMERT two-stream encoder (models/two_stream.py) subclasses this module
and replaces only `_encode`; `from_config` picks it with config.model.arch.

Call (see CONTRACT):
  model.apply({'params': p}, inputs, attn_mask, layout=layout, deterministic=True,
              outputs=('image', 'text', 'length'), rngs={'dropout': key})
"""
import importlib
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax import sequence as seq
from magvlt_jax.models import layers

ALL_OUTPUTS = ("image", "text", "length", "hidden", "itm")


def grid_boxes(n_img: int) -> np.ndarray:
  """float32 [n_img, 4]: (x0, x1, y0, y1) in [0, 1] of each raster cell of a square grid (the
  box coordinates LXMERT's object embedder takes, here of the 8x8 grid's cells)."""
  g = int(round(n_img ** 0.5))
  if g * g != n_img:
    raise ValueError(f"box_embedding needs a square image grid, got {n_img} image tokens")
  row, col = np.divmod(np.arange(n_img), g)
  return (np.stack([col, col + 1, row, row + 1], axis=-1) / g).astype(np.float32)


class VLTransformer(nn.Module):
  num_layers: int
  embed_dim: int
  num_heads: int
  image_vocab_size: int
  text_vocab_size: int
  n_img: int
  n_txt: int
  length_classes: int
  mlp_ratio: int = 4
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  embedding_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  causal: bool = False
  remat: bool = False
  scan_layers: bool = False  # one nn.scan over the blocks: params stacked on a "layers" axis
  attention_impl: str = "xla"
  num_segments: int = 0  # >0: add a learned segment embedding per slot (L-Verse BiART [REF]/[GEN])
  box_embedding: bool = False  # X-LXMERT: image slots embedded with their grid box (see docstring)
  itm_head: bool = False  # X-LXMERT: image-text matching logits at BOC (output 'itm')
  # KV-cache decoding (the AR decoder; same params, `model.clone(decode=True)`): inputs are the
  # next chunk of slots, attn_mask [B, 1, chunk, L] already causal, the 'cache' collection mutable;
  # image/text outputs are the next-token logits read at the chunk's last slot, [B, 1, V].
  decode: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  init_std: float = layers.INIT_STD  # N(0, init_std) for every weight and embedding table

  @property
  def seq_length(self) -> int:
    return 4 + self.n_img + self.n_txt

  def _embed(self, inputs: seq.ModelInput, tok_table):
    d, pd = self.embed_dim, self.param_dtype
    spc_table = self.param("special_embed", layers.normal_init(("special", "embed"), self.init_std),
                           (seq.NUM_SPECIAL, d), pd)
    pos_init = layers.normal_init(("positions", "embed"), self.init_std)
    pos_img = None if self.box_embedding else self.param("pos_img", pos_init, (self.n_img, d), pd)
    pos_txt = self.param("pos_txt", pos_init, (self.n_txt, d), pd)
    pos_spc = self.param("pos_spc", pos_init, (self.seq_length, d), pd)
    ids, pos = inputs.ids, inputs.local_pos
    # Gather from replicated-over-embed tables: a gather from a table sharded on both axes
    # forces XLA into a full rematerialisation when the result is batch-sharded.
    tok_table = layers.constrain(tok_table, ("vocab", None))
    spc_table, pos_txt, pos_spc = (layers.constrain(t, (None, None))
                                   for t in (spc_table, pos_txt, pos_spc))
    is_special = inputs.is_special[..., None]
    x = jnp.where(is_special, jnp.take(spc_table, jnp.minimum(ids, seq.NUM_SPECIAL - 1), axis=0),
                  jnp.take(tok_table, ids, axis=0))
    # Masked image/text slots keep their modality position and also get pos_spc (official quirk).
    is_img = (inputs.modality == seq.MODALITY_IMAGE)[..., None]
    is_txt = (inputs.modality == seq.MODALITY_TEXT)[..., None]
    img_pos = jnp.clip(pos, max=self.n_img - 1)
    if pos_img is not None:
      pos_img = layers.constrain(pos_img, (None, None))
      x = x + jnp.where(is_img, jnp.take(pos_img, img_pos, axis=0), 0.0)
    x = x + jnp.where(is_txt, jnp.take(pos_txt, jnp.clip(pos, max=self.n_txt - 1), axis=0), 0.0)
    x = x + jnp.where(is_special, jnp.take(pos_spc, pos, axis=0), 0.0)
    if self.box_embedding:
      x = jnp.where(is_img, self._box_embed(x, img_pos), x)
    return x.astype(self.dtype)

  def _box_embed(self, x, img_pos):
    """LXMERT object embedder on the grid: 0.5 * (LN(feature) + LN(Dense(box)))."""
    eps, dt, pd = self.layer_norm_eps, self.dtype, self.param_dtype
    boxes = jnp.take(jnp.asarray(grid_boxes(self.n_img)), img_pos, axis=0)
    b = layers.dense(self.embed_dim, ("box", "embed"), dt, pd, name="box_dense",
                     init_std=self.init_std)(boxes)
    b = layers.layer_norm(eps, dt, pd, name="box_ln")(b)
    f = layers.layer_norm(eps, dt, pd, name="feature_ln")(x)
    return 0.5 * (f + b)

  def _encode(self, x, mask, layout, deterministic):
    """The blocks over the embedded sequence [B, L, D] -> [B, L, D] (two_stream.py overrides)."""
    del layout
    block_args = (self.num_heads, self.mlp_ratio * self.embed_dim, self.dropout_rate,
                  self.attention_dropout_rate, self.layer_norm_eps, deterministic,
                  self.attention_impl, self.dtype, self.param_dtype, self.init_std,
                  self.seq_length if self.decode else 0)
    if self.scan_layers:
      return layers.scanned_blocks(self.num_layers, self.remat)(*block_args, name="blocks")(x, mask)
    block_cls = layers.maybe_remat(layers.Block, self.remat)
    for i in range(self.num_layers):
      x = block_cls(*block_args, name=f"block_{i}")(x, mask)
    return x

  def _itm(self, x, layout):
    """Image-text matching logits [B, 2] (class 1 = matched) from the BOC slot."""
    pool = layers.dense(self.embed_dim, ("embed", "mlp"), self.dtype, self.param_dtype,
                        name="itm_pool", init_std=self.init_std)
    head = layers.dense(2, ("embed", "itm_classes"), self.dtype, self.param_dtype,
                        name="itm_head", init_std=self.init_std)
    return head(jnp.tanh(pool(x[:, layout.boc_index]))).astype(jnp.float32)

  def _head(self, h, tok_table, bias, lo, hi, dense, norm):
    h = norm(nn.gelu(dense(h), approximate=False))
    h = layers.constrain(h, ("batch", "length", "embed"))
    # Under fsdp the table is sharded on 'embed' and h on 'batch' over the same mesh axis: without
    # these constraints XLA resolved the conflict by all-gathering h over the whole global batch
    # (an 8 GiB f32 buffer per chip for base on v5e-256); gathering the table slice costs MiBs.
    w = layers.constrain(tok_table[lo:hi].astype(self.dtype), ("vocab", None))
    logits = jnp.einsum("bld,vd->blv", h, w, preferred_element_type=jnp.float32)
    logits = layers.constrain(logits, ("batch", "length", "vocab"))
    return logits + bias[lo:hi].astype(jnp.float32)

  @nn.compact
  def __call__(self, inputs: seq.ModelInput, attn_mask=None, *, layout: seq.Layout,
               deterministic: bool = True, outputs: Sequence[str] = ("image", "text", "length"),
               predict_next: bool = False, segment_ids=None):
    """Returns a dict with the requested outputs (logits in float32).

    attn_mask: bool [B, 1, L, L] from sequence.attention_mask (None: full attention).
    predict_next: read the image/text logits one slot earlier (AR baselines: slot i predicts
    slot i + 1, so BOI predicts image token 0 and BOT predicts text token 0).
    segment_ids: int [B, L] in [0, num_segments) when the model has segment embeddings.
    """
    bad = [o for o in outputs if o not in ALL_OUTPUTS]
    if bad:
      raise ValueError(f"VLTransformer: unknown outputs {bad}; expected a subset of {ALL_OUTPUTS}")
    if self.decode:
      if "length" in outputs or "hidden" in outputs:
        raise ValueError("VLTransformer(decode=True) gives only 'image'/'text' next-token logits")
    elif inputs.ids.shape[1] != self.seq_length or layout.length != self.seq_length:
      raise ValueError(f"VLTransformer: sequence length {inputs.ids.shape[1]} / layout "
                       f"{layout.length} does not match the model's {self.seq_length}")
    vocab = self.image_vocab_size + self.text_vocab_size
    tok_table = self.param("token_embed", layers.normal_init(("vocab", "embed"), self.init_std),
                           (vocab, self.embed_dim), self.param_dtype)
    x = self._embed(inputs, tok_table)
    if self.num_segments:
      if segment_ids is None:
        raise ValueError("VLTransformer: num_segments > 0 needs segment_ids [B, L]")
      seg_table = self.param("segment_embed", layers.normal_init(("special", "embed"), self.init_std),
                             (self.num_segments, self.embed_dim), self.param_dtype)
      x = x + jnp.take(layers.constrain(seg_table, (None, None)), segment_ids, axis=0).astype(self.dtype)
    x = nn.Dropout(self.embedding_dropout_rate, deterministic=deterministic)(x)
    x = layers.constrain(x, ("batch", "length", "embed"))
    mask = attn_mask
    if self.causal and not self.decode:
      mask = seq.causal_mask(self.seq_length) if mask is None else mask & seq.causal_mask(self.seq_length)
    x = self._encode(x, mask, layout, deterministic)

    result = {}
    if "hidden" in outputs:
      result["hidden"] = x
    if "itm" in outputs:
      if not self.itm_head or self.decode:
        raise ValueError("VLTransformer: output 'itm' needs itm_head=True (config.model.itm_head)")
      result["itm"] = self._itm(x, layout)
    if "image" in outputs or "text" in outputs:
      dense = layers.dense(self.embed_dim, ("embed", "mlp"), self.dtype, self.param_dtype,
                           name="head_dense", init_std=self.init_std)
      norm = layers.layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name="head_ln")
      bias = self.param("output_bias", layers.zeros_init(("vocab",)), (vocab,), self.param_dtype)
      shift = 1 if predict_next else 0
      if self.decode:  # the next token after the chunk's last slot, in each requested modality
        h = x[:, -1:]
        if "image" in outputs:
          result["image"] = self._head(h, tok_table, bias, 0, self.image_vocab_size, dense, norm)
        if "text" in outputs:
          result["text"] = self._head(h, tok_table, bias, self.image_vocab_size, vocab, dense, norm)
        return result
      if "image" in outputs:
        start = layout.image_start - shift
        h = x[:, start:start + self.n_img]
        result["image"] = self._head(h, tok_table, bias, 0, self.image_vocab_size, dense, norm)
      if "text" in outputs:
        start = layout.text_start - shift
        h = x[:, start:start + self.n_txt]
        result["text"] = self._head(h, tok_table, bias, self.image_vocab_size, vocab, dense, norm)
    if "length" in outputs:
      length_head = layers.dense(self.length_classes, ("embed", "length_classes"), self.dtype,
                                 self.param_dtype, use_bias=False, name="length_head",
                                 init_std=self.init_std)
      result["length"] = length_head(x[:, layout.bot_index]).astype(jnp.float32)
    return result


def stack_layers(params, num_layers: int):
  """Unscanned params (block_0 .. block_{n-1}) -> scanned params ("blocks", leaves stacked on a
  leading layer axis): a checkpoint trained with model.scan_layers=False used with True."""
  params = dict(params)
  blocks = [params.pop(f"block_{i}") for i in range(num_layers)]
  params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return params


def unstack_layers(params):
  """Scanned params ("blocks") -> unscanned (block_0 .. block_{n-1}); inverse of stack_layers."""
  params = dict(params)
  blocks = params.pop("blocks")
  n = jax.tree.leaves(blocks)[0].shape[0]
  for i in range(n):
    params[f"block_{i}"] = jax.tree.map(lambda x, i=i: x[i], blocks)
  return params


# config.model.arch -> "module:class" (a VLTransformer or a subclass with the same call).
ARCHS = {
    "single_stream": "magvlt_jax.models.transformer:VLTransformer",
    "two_stream": "magvlt_jax.models.two_stream:TwoStreamTransformer",
}


def arch_class(config):
  arch = config.model.get("arch", "single_stream")
  if arch not in ARCHS:
    raise ValueError(f"config.model.arch={arch!r} is not a known transformer; use one of "
                     f"{sorted(ARCHS)}")
  module, _, cls = ARCHS[arch].partition(":")
  return getattr(importlib.import_module(module), cls)


def from_config(config, **overrides) -> VLTransformer:
  """The transformer of a full system config (config.model + config.sequence): a VLTransformer,
  or the class config.model.arch names (its extra fields from config.model, `arch_kwargs`)."""
  cls = arch_class(config)
  m, s = config.model, config.sequence
  kwargs = dict(
      num_layers=int(m.num_layers), embed_dim=int(m.embed_dim), num_heads=int(m.num_heads),
      image_vocab_size=int(s.image_vocab_size), text_vocab_size=int(s.text_vocab_size),
      n_img=int(s.image_tokens), n_txt=int(s.text_length), length_classes=int(m.length_classes),
      mlp_ratio=int(m.mlp_ratio), dropout_rate=float(m.dropout_rate),
      attention_dropout_rate=float(m.attention_dropout_rate),
      embedding_dropout_rate=float(m.embedding_dropout_rate),
      layer_norm_eps=float(m.layer_norm_eps), causal=bool(m.causal), remat=bool(m.remat),
      scan_layers=bool(m.get("scan_layers", False)), attention_impl=str(m.attention_impl),
      num_segments=int(m.get("num_segments", 0)), dtype=layers.get_dtype(m.dtype),
      param_dtype=layers.get_dtype(m.param_dtype),
      init_std=float(m.get("init_std", layers.INIT_STD)),
      box_embedding=bool(m.get("box_embedding", False)), itm_head=bool(m.get("itm_head", False)))
  kwargs.update(getattr(cls, "arch_kwargs", lambda _: {})(config))
  kwargs.update(overrides)
  return cls(**kwargs)


def dummy_inputs(config, batch: int = 1):
  """(layout, ModelInput, attn_mask) of the configured shapes (T2I layout, nothing masked)."""
  layout = seq.layout_from_config(config, seq.Task.T2I)
  inputs = seq.build_input(layout, jnp.zeros((batch, layout.n_img), jnp.int32),
                           jnp.zeros((batch, layout.n_txt), jnp.int32),
                           image_vocab_size=int(config.sequence.image_vocab_size))
  mask = seq.attention_mask(layout, jnp.full((batch,), layout.n_txt, jnp.int32))
  return layout, inputs, mask


def init_fn(config):
  """rng -> boxed (LogicallyPartitioned) params of `config`; jit/eval_shape it as needed."""
  model = from_config(config)

  def init(rng):
    layout, inputs, mask = dummy_inputs(config)  # traced with init: one compile, no eager ops
    segments = jnp.zeros(inputs.ids.shape, jnp.int32) if model.num_segments else None
    outputs = ("image", "text", "length") + (("itm",) if model.itm_head else ())
    variables = model.init({"params": rng}, inputs, mask, layout=layout, deterministic=True,
                           outputs=outputs, segment_ids=segments)
    return variables["params"]
  return init


_init_fn = init_fn  # older name, used by tools/aot_compile.py


def init_params(config, rng, boxed: bool = False):
  """Randomly initialised params (plain nested dicts; `boxed=True` keeps LogicallyPartitioned)."""
  params = jax.jit(init_fn(config))(rng)
  return params if boxed else nn.meta.unbox(params)


def param_shapes(config, boxed: bool = False):
  """Abstract params (jax.ShapeDtypeStruct leaves) via jax.eval_shape: nothing is allocated."""
  params = jax.eval_shape(init_fn(config), jax.random.key(0))
  return params if boxed else nn.meta.unbox(params)


def param_count(config) -> int:
  """Number of transformer parameters of `config` (no allocation)."""
  leaves = jax.tree.leaves(param_shapes(config))
  return int(sum(int(np.prod(x.shape)) for x in leaves))


def logical_axes(config):
  """Pytree of logical axis-name tuples matching init_params(...) (for sharding rules)."""
  return nn.get_partition_spec(param_shapes(config, boxed=True))
