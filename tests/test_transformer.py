"""The VL transformer: parameter count, embeddings (masked-slot quirk), tied per-modality head,
length head independence from text, masks, causal option, dtypes, remat, logical axis names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magvlt_jax import sequence as seq
from magvlt_jax.configs_util import load_config
from magvlt_jax.models import transformer

N_TXT, N_IMG, IVS, TVS = 24, 64, 256, 128


@pytest.fixture(scope="module")
def config():
  c = load_config("configs/magvlt.py:tiny")
  c.model.num_layers = 2
  return c


@pytest.fixture(scope="module")
def params(config):
  return transformer.init_params(config, jax.random.key(0))


def _inputs(task, batch=2, seed=0, image_masked=None, text_masked=None, lengths=None):
  rng = np.random.default_rng(seed)
  layout = seq.make_layout(task, N_TXT, N_IMG)
  codes = jnp.asarray(rng.integers(0, IVS, (batch, N_IMG)), jnp.int32)
  text = jnp.asarray(rng.integers(0, TVS, (batch, N_TXT)), jnp.int32)
  inp = seq.build_input(layout, codes, text, image_masked, text_masked, image_vocab_size=IVS)
  lengths = jnp.full((batch,), N_TXT) if lengths is None else jnp.asarray(lengths)
  return layout, inp, seq.attention_mask(layout, lengths), codes, text


def _apply(model, params, inp, mask, layout, outputs=("image", "text", "length"),
           deterministic=True, rng=None):
  """Jitted model.apply (one compile instead of op-by-op dispatch)."""
  def fn(p, x, m, r):
    rngs = None if r is None else {"dropout": r}
    return model.apply({"params": p}, x, m, layout=layout, deterministic=deterministic,
                       outputs=outputs, rngs=rngs)
  return jax.jit(fn)(params, inp, mask, rng)


def test_base_param_count():
  assert transformer.param_count(load_config("configs/magvlt.py:base")) == 371_533_056


def test_init_std_sets_every_weight_and_table(config):
  """config.model.init_std reaches embeddings, attention, MLP and head weights (biases and
  LayerNorms keep their zero/one init)."""
  for std in (0.02, 0.1):
    c = config.copy_and_resolve_references()
    c.model.init_std = std
    params = transformer.init_params(c, jax.random.key(1))
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    weights = {k: v for k, v in flat.items() if v.ndim >= 2 and v.size >= 1024}
    assert {"token_embed", "pos_img", "block_0/attn/wq", "block_0/mlp/fc1/kernel",
            "head_dense/kernel"} <= set(weights)
    for name, value in weights.items():
      assert abs(value.std() / std - 1.0) < 0.1, (std, name, value.std())


def test_every_param_has_logical_names(config):
  boxed = transformer.param_shapes(config, boxed=True)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  assert all(len(x.names) == len(x.value.shape) for x in leaves)
  names = {n for x in leaves for n in x.names}
  assert names <= {"vocab", "embed", "mlp", "heads", "kv", "length_classes", "positions", "special"}
  attn = nn.get_partition_spec(boxed)["block_0"]["attn"]
  assert tuple(attn["wq"]) == ("embed", "heads", "kv") and tuple(attn["wo"]) == ("heads", "kv", "embed")


def test_output_shapes_and_float32_logits_under_bf16(config, params):
  model = transformer.from_config(config, dtype=jnp.bfloat16)
  layout, inp, mask, _, _ = _inputs(seq.Task.I2T)
  out = _apply(model, params, inp, mask, layout, ("image", "text", "length", "hidden"))
  assert out["image"].shape == (2, N_IMG, IVS) and out["image"].dtype == jnp.float32
  assert out["text"].shape == (2, N_TXT, TVS) and out["text"].dtype == jnp.float32
  assert out["length"].shape == (2, N_TXT) and out["length"].dtype == jnp.float32
  assert out["hidden"].shape == (2, layout.length, 128) and out["hidden"].dtype == jnp.bfloat16
  ref = _apply(transformer.from_config(config), params, inp, mask, layout)
  np.testing.assert_allclose(out["image"], ref["image"], atol=0.15)


def test_embedding_and_masked_slot_quirk(config, params):
  model = transformer.from_config(config, num_layers=0)  # hidden == input embedding
  img_m = jnp.zeros((1, N_IMG), bool).at[0, 5].set(True)
  txt_m = jnp.zeros((1, N_TXT), bool).at[0, 3].set(True)
  layout, inp, mask, codes, text = _inputs(seq.Task.T2I, 1, image_masked=img_m, text_masked=txt_m)
  h = _apply(model, params, inp, mask, layout, ("hidden",))["hidden"][0]
  p = params
  i0, t0 = layout.image_start, layout.text_start
  np.testing.assert_allclose(h[i0 + 5], p["special_embed"][seq.MASK_IMG] + p["pos_img"][5] + p["pos_spc"][5],
                             atol=1e-6)
  np.testing.assert_allclose(h[t0 + 3], p["special_embed"][seq.MASK_TXT] + p["pos_txt"][3] + p["pos_spc"][3],
                             atol=1e-6)
  np.testing.assert_allclose(h[i0 + 6], p["token_embed"][codes[0, 6]] + p["pos_img"][6], atol=1e-6)
  np.testing.assert_allclose(h[t0 + 4], p["token_embed"][IVS + text[0, 4]] + p["pos_txt"][4], atol=1e-6)
  np.testing.assert_allclose(h[layout.boi_index], p["special_embed"][seq.BOI] + p["pos_spc"][3], atol=1e-6)
  np.testing.assert_allclose(h[layout.bot_index], p["special_embed"][seq.BOT] + p["pos_spc"][1], atol=1e-6)


def test_tied_head_uses_modality_slices(config, params):
  model = transformer.from_config(config)
  layout, inp, mask, _, _ = _inputs(seq.Task.T2I)
  out = _apply(model, params, inp, mask, layout, ("image", "text", "hidden"))
  p = params
  d = p["head_dense"]
  h = nn.gelu(out["hidden"] @ d["kernel"] + d["bias"], approximate=False)
  h = nn.LayerNorm(epsilon=1e-5).apply({"params": p["head_ln"]}, h)
  full = h @ p["token_embed"].T + p["output_bias"]
  np.testing.assert_allclose(out["image"], full[:, layout.image_slice, :IVS], atol=2e-4)
  np.testing.assert_allclose(out["text"], full[:, layout.text_slice, IVS:], atol=2e-4)


def test_length_logits_independent_of_text(config, params):
  # The BOT row sees nothing after itself. With one block that makes the length logits a function
  # of the image alone; deeper models see text through the image rows (official mask, SPEC 2).
  model = transformer.from_config(config, num_layers=1)
  layout, inp_a, mask_a, _, _ = _inputs(seq.Task.I2T, seed=0, lengths=[5, 24])
  _, inp_b, mask_b, _, _ = _inputs(seq.Task.I2T, seed=1, lengths=[9, 3])
  # Same image, different text and lengths: identical length logits.
  inp_b = inp_b.replace(**{f: getattr(inp_b, f).at[:, :layout.text_start].set(getattr(inp_a, f)[:, :layout.text_start])
                           for f in ("ids", "is_special", "modality", "local_pos")})
  apply = lambda x, m: _apply(model, params, x, m, layout, ("length", "text"))
  out_a, out_b = apply(inp_a, mask_a), apply(inp_b, mask_b)
  np.testing.assert_allclose(out_a["length"], out_b["length"], atol=1e-5)
  assert not np.allclose(out_a["text"], out_b["text"], atol=1e-3)
  # A different image changes them.
  _, inp_c, _, _, _ = _inputs(seq.Task.I2T, seed=2, lengths=[5, 24])
  assert not np.allclose(apply(inp_c, mask_a)["length"], out_a["length"], atol=1e-4)


def test_t2i_padding_text_does_not_affect_image(config, params):
  model = transformer.from_config(config)
  layout, inp, mask, _, _ = _inputs(seq.Task.T2I, 1, lengths=[4])
  pad = seq.text_slots(layout)[4:]
  other = inp.replace(ids=inp.ids.at[:, pad].set(IVS + 7))
  run = lambda x: _apply(model, params, x, mask, layout, ("image",))["image"]
  np.testing.assert_allclose(run(inp), run(other), atol=1e-5)


def test_bidirectional_vs_causal(config, params):
  layout, inp, mask, _, _ = _inputs(seq.Task.T2I, 1)
  changed = inp.replace(ids=inp.ids.at[:, -1].set((inp.ids[0, -1] + 1) % IVS))
  for causal in (False, True):
    model = transformer.from_config(config, causal=causal)
    run = lambda x: _apply(model, params, x, mask, layout, ("hidden",))["hidden"]
    first_a, first_b = run(inp)[:, :-1], run(changed)[:, :-1]
    assert np.allclose(first_a, first_b, atol=1e-6) == causal


def test_dropout_paths_and_remat(config, params):
  layout, inp, mask, _, _ = _inputs(seq.Task.I2T)
  outs = ("image", "length")
  det = _apply(transformer.from_config(config), params, inp, mask, layout, outs)
  # Explicit-softmax attention (taken whenever attention dropout is active) matches
  # jax.nn.dot_product_attention when the rates are negligible.
  tiny = transformer.from_config(config, attention_dropout_rate=1e-9, dropout_rate=0.0)
  explicit = _apply(tiny, params, inp, mask, layout, outs, False, jax.random.key(1))
  np.testing.assert_allclose(explicit["image"], det["image"], atol=1e-4)
  drop = _apply(transformer.from_config(config, dropout_rate=0.1, attention_dropout_rate=0.1),
                params, inp, mask, layout, outs, False, jax.random.key(1))
  assert not np.allclose(drop["image"], det["image"], atol=1e-3)

  def loss(p, remat):
    model = transformer.from_config(config, remat=remat, num_layers=1)
    return model.apply({"params": p}, inp, mask, layout=layout, outputs=outs)["image"].mean()
  g0 = jax.jit(jax.grad(loss), static_argnums=1)(params, False)
  g1 = jax.jit(jax.grad(loss), static_argnums=1)(params, True)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


def test_scanned_layers_match_unrolled(config, params):
  # scan_layers stacks the same blocks on a "layers" axis: same outputs, same gradients (with
  # remat too), logical names gain a leading "layers", and stack/unstack convert both ways.
  layout, inp, mask, _, _ = _inputs(seq.Task.IT2IT)
  outs = ("image", "text", "length")
  stacked = transformer.stack_layers(params, config.model.num_layers)
  assert "block_0" not in stacked and stacked["blocks"]["mlp"]["fc1"]["kernel"].shape == (2, 128, 512)
  scan_config = config.copy_and_resolve_references()
  scan_config.model.scan_layers = True
  shapes = transformer.param_shapes(scan_config)
  jax.tree.map(lambda a, b: np.testing.assert_equal(a.shape, b.shape), shapes, stacked)
  assert transformer.param_count(scan_config) == transformer.param_count(config)
  names = transformer.logical_axes(scan_config)["blocks"]["attn"]["wq"]
  assert tuple(names) == ("layers", "embed", "heads", "kv")
  ref = _apply(transformer.from_config(config), params, inp, mask, layout, outs)
  got = _apply(transformer.from_config(scan_config), stacked, inp, mask, layout, outs)
  for k in outs:
    np.testing.assert_allclose(got[k], ref[k], atol=1e-5)

  def loss(p, model):
    return model.apply({"params": p}, inp, mask, layout=layout, outputs=outs)["image"].mean()
  g_ref = jax.jit(jax.grad(loss), static_argnums=1)(params, transformer.from_config(config))
  g_scan = jax.jit(jax.grad(loss), static_argnums=1)(
      stacked, transformer.from_config(scan_config, remat=True))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               transformer.stack_layers(g_ref, config.model.num_layers), g_scan)
  back = transformer.unstack_layers(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  # Dropout is live inside the scanned body (split_rngs: each layer draws its own mask).
  drop = _apply(transformer.from_config(scan_config, dropout_rate=0.1), stacked, inp, mask, layout,
                outs, False, jax.random.key(3))
  assert not np.allclose(drop["image"], got["image"], atol=1e-3)


def test_rejects_wrong_sequence_length(config, params):
  layout = seq.make_layout(seq.Task.T2I, N_TXT, N_IMG + 4)
  inp = seq.build_input(layout, jnp.zeros((1, N_IMG + 4), jnp.int32), jnp.zeros((1, N_TXT), jnp.int32),
                        image_vocab_size=IVS)
  with pytest.raises(ValueError, match="sequence length"):
    transformer.from_config(config).apply({"params": params}, inp, None, layout=layout)


def test_segment_embeddings_and_predict_next(config):
  cfg = load_config("configs/magvlt.py:tiny")
  cfg.model.num_layers = 1
  cfg.model.num_segments = 2
  cfg.model.causal = True
  params = transformer.init_params(cfg, jax.random.key(0))
  assert params["segment_embed"].shape == (2, 128)
  model = transformer.from_config(cfg)
  layout, inp, mask, _, _ = _inputs(seq.Task.T2I, 1)
  seg = jnp.zeros((1, layout.length), jnp.int32)
  run = jax.jit(lambda s, nxt: model.apply({"params": params}, inp, mask, layout=layout, segment_ids=s,
                                           predict_next=nxt, outputs=("image", "hidden")),
                static_argnums=1)
  base, shifted = run(seg, False), run(seg, True)
  other = run(seg.at[:, layout.image_start:].set(1), False)
  h = base["hidden"]
  assert not np.allclose(other["hidden"][:, layout.image_start:], h[:, layout.image_start:], atol=1e-4)
  np.testing.assert_allclose(other["hidden"][:, :layout.image_start], h[:, :layout.image_start], atol=1e-6)
  # predict_next reads the logits one slot earlier: BOI predicts image token 0.
  np.testing.assert_allclose(shifted["image"][:, 1:], base["image"][:, :-1], atol=1e-5)
  with pytest.raises(ValueError, match="segment_ids"):
    model.apply({"params": params}, inp, mask, layout=layout)
