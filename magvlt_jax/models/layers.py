"""Transformer building blocks with logical axis names on every parameter (flax.linen).

Attention creates its 3-D q/k/v/out kernels directly (not DenseGeneral, whose logical
partitioning breaks on 3-D names under jax.set_mesh: google/flax#3676) and runs through
jax.nn.dot_product_attention, so XLA or cuDNN kernels can be used. With attention dropout
active it falls back to an explicit float32 softmax, since dot_product_attention has no dropout.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
INIT_STD = 0.02  # official _init_weights: N(0, 0.02) for linear and embedding weights (config.model.init_std)
ATTENTION_IMPLS = ("xla", "cudnn")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
DTYPE_NAMES = tuple(_DTYPES)


def get_dtype(name) -> Dtype:
  """Maps a config dtype name ('float32' | 'bfloat16' | 'float16') to a jnp dtype."""
  if not isinstance(name, str):
    return name
  if name not in _DTYPES:
    raise ValueError(f"unknown dtype name {name!r}; expected one of {sorted(_DTYPES)}")
  return _DTYPES[name]


def normal_init(names, std: float = INIT_STD):
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), names)


def zeros_init(names):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def constrain(x, names):
  """Activation sharding constraint by logical names (no-op without a mesh / rules)."""
  return nn.with_logical_constraint(x, names)


def layer_norm(eps, dtype, param_dtype, axis_name="embed", name=None):
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
                      bias_init=zeros_init((axis_name,)))


def dense(features, names, dtype, param_dtype, use_bias=True, name=None, init_std: float = INIT_STD):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                  kernel_init=normal_init(names, init_std), bias_init=zeros_init(names[-1:]))


class Attention(nn.Module):
  """Multi-head attention with biases; heads are contiguous head_dim-wide column blocks.
  Self-attention by default; `context` [B, S, D] gives cross-attention (keys and values from it,
  queries from x; LXMERT's cross-modality layers)."""
  num_heads: int
  dropout_rate: float = 0.0
  deterministic: bool = True
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = INIT_STD
  # >0: KV-cache decoding over a cache of this many slots ('cache' collection, flax lm1b style):
  # x is the next chunk of slots, written at cache_index; mask is [B, 1, chunk, cache_length].
  cache_length: int = 0

  def _cached_kv(self, k, v):
    """Writes this chunk's k, v into the cache at cache_index; returns the whole cache."""
    shape = (k.shape[0], self.cache_length) + k.shape[2:]
    ck = self.variable("cache", "key", jnp.zeros, shape, k.dtype)
    cv = self.variable("cache", "value", jnp.zeros, shape, v.dtype)
    idx = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    i = idx.value
    ck.value = jax.lax.dynamic_update_slice_in_dim(ck.value, k, i, axis=1)
    cv.value = jax.lax.dynamic_update_slice_in_dim(cv.value, v, i, axis=1)
    idx.value = i + k.shape[1]
    return ck.value, cv.value

  def _proj(self, x, name, features, heads, head_dim):
    w = self.param(f"w{name}", normal_init(("embed", "heads", "kv"), self.init_std),
                   (features, heads, head_dim), self.param_dtype)
    b = self.param(f"b{name}", zeros_init(("heads", "kv")), (heads, head_dim), self.param_dtype)
    y = jnp.einsum("bld,dhk->blhk", x, w.astype(self.dtype)) + b.astype(self.dtype)
    return constrain(y, ("batch", "length", "heads", "kv"))

  @nn.compact
  def __call__(self, x, mask, context=None):
    features = x.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"embed_dim {features} is not divisible by num_heads {self.num_heads}")
    head_dim = features // self.num_heads
    kv_in = x if context is None else context
    q = self._proj(x, "q", features, self.num_heads, head_dim)
    k, v = (self._proj(kv_in, n, features, self.num_heads, head_dim) for n in ("k", "v"))
    if self.cache_length:
      k, v = self._cached_kv(k, v)
    if self.dropout_rate > 0.0 and not self.deterministic:
      out = self._explicit_attention(q, k, v, mask, head_dim)
    else:
      impl = None if self.attention_impl == "xla" else self.attention_impl
      out = jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=impl)
    out = constrain(out.astype(self.dtype), ("batch", "length", "heads", "kv"))
    wo = self.param("wo", normal_init(("heads", "kv", "embed"), self.init_std),
                    (self.num_heads, head_dim, features), self.param_dtype)
    bo = self.param("bo", zeros_init(("embed",)), (features,), self.param_dtype)
    return jnp.einsum("blhk,hkd->bld", out, wo.astype(self.dtype)) + bo.astype(self.dtype)

  def _explicit_attention(self, q, k, v, mask, head_dim):
    # float32 softmax with attention dropout (dot_product_attention has no dropout).
    scores = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(head_dim))
    if mask is not None:
      scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(self.dropout_rate, deterministic=False)(probs)
    return jnp.einsum("bhqs,bshk->bqhk", probs.astype(self.dtype), v)


class Mlp(nn.Module):
  """Dense(4D) -> exact GELU -> Dense(D)."""
  hidden_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = INIT_STD

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    h = dense(self.hidden_dim, ("embed", "mlp"), self.dtype, self.param_dtype, name="fc1",
              init_std=self.init_std)(x)
    h = constrain(nn.gelu(h, approximate=False), ("batch", "length", "mlp"))
    return dense(features, ("mlp", "embed"), self.dtype, self.param_dtype, name="fc2",
                 init_std=self.init_std)(h)


class Block(nn.Module):
  """Pre-LN block: x + Drop(Attn(LN1 x)); x + Drop(MLP(LN2 x))."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  deterministic: bool = True
  attention_impl: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  init_std: float = INIT_STD
  cache_length: int = 0  # >0: KV-cache decoding (Attention.cache_length)

  @nn.compact
  def __call__(self, x, mask):
    h = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name="ln1")(x)
    h = Attention(self.num_heads, self.attention_dropout_rate, self.deterministic,
                  self.attention_impl, self.dtype, self.param_dtype, self.init_std,
                  self.cache_length, name="attn")(h, mask)
    x = x + nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(h)
    h = layer_norm(self.layer_norm_eps, self.dtype, self.param_dtype, name="ln2")(x)
    h = Mlp(self.mlp_dim, self.dtype, self.param_dtype, self.init_std, name="mlp")(h)
    x = x + nn.Dropout(self.dropout_rate, deterministic=self.deterministic)(h)
    return constrain(x, ("batch", "length", "embed"))


def maybe_remat(module_cls, remat: bool, prevent_cse: bool = True):
  """nn.remat(module_cls) when `remat` (recompute block activations in the backward pass)."""
  return nn.remat(module_cls, prevent_cse=prevent_cse) if remat else module_cls


class _ScanBlock(Block):
  """Block with nn.scan's (carry, output) signature."""

  def __call__(self, x, mask):  # pylint: disable=arguments-differ
    return super().__call__(x, mask), None


LAYERS_AXIS = "layers"  # logical name of the stacked-layer axis of scanned params (never sharded)


def scanned_blocks(num_layers: int, remat: bool):
  """`num_layers` Blocks as ONE nn.scan: the program holds one block body, not num_layers copies
  (compile time and HLO size stop growing with depth), params are stacked [num_layers, ...] on the
  logical axis "layers", each layer draws its own init and dropout keys. Call the returned class
  as `cls(*Block fields, name=...)(x, mask) -> x`."""
  # Under scan, remat's CSE barrier is unnecessary and blocks fusion across the loop body.
  body = maybe_remat(_ScanBlock, remat, prevent_cse=False)
  scanned = nn.scan(body, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=(nn.broadcast,), length=num_layers,
                    metadata_params={nn.PARTITION_NAME: LAYERS_AXIS})

  class ScannedBlocks(scanned):  # pylint: disable=missing-class-docstring
    def __call__(self, x, mask):  # pylint: disable=arguments-differ
      return super().__call__(x, mask)[0]
  return ScannedBlocks

