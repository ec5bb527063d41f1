"""X-LXMERT: uniform image masking, CCC targets, ITM pairs and labels, Mask-Predict-K reveal
counts through the shared decoding loop, the grid-box embedding, the two-stream encoder's
cross-attention isolation, and a tiny overfit run of the objective."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from magvlt_jax import configs_util, decoding, sequence as seq
from magvlt_jax.models import transformer, two_stream
from magvlt_jax.objectives import xlxmert

EOS, SEP = 1, 2
N_TXT, GRID, V_IMG, V_TXT = 8, 4, 16, 16


def _config(variant="tiny", **model):
  c = configs_util.load_config(f"configs/xlxmert.py:{variant}")
  c.model.embed_dim, c.model.num_heads = 32, 2
  if c.model.arch == "two_stream":
    c.model.two_stream.language_layers = c.model.two_stream.relation_layers = 1
    c.model.two_stream.cross_layers = 1
  else:
    c.model.num_layers = 2
  c.model.length_classes = N_TXT
  c.sequence.image_tokens = GRID * GRID
  c.sequence.image_vocab_size, c.sequence.text_vocab_size = V_IMG, V_TXT
  for k, v in model.items():
    c.model[k] = v
  return c


def _batch(b=8, seed=0):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, V_IMG, (b, GRID * GRID)).astype(np.int32)
  length = rng.integers(3, N_TXT + 1, (b,)).astype(np.int32)
  text = np.full((b, N_TXT), EOS, np.int32)
  for i, n in enumerate(length):
    text[i, :n - 1] = rng.integers(3, V_TXT, n - 1)
  # The "tokenizer" returns the codes carried in the image field (the k-means assignment).
  return {"image": jnp.asarray(codes), "text": jnp.asarray(text), "text_length": jnp.asarray(length)}


def _encode(params, images):
  del params
  return jnp.asarray(images, jnp.int32)


class RecordingModel:
  """Stand-in for the transformer: records each call's inputs, returns fixed random logits."""
  itm_head = True

  def __init__(self, b):
    r = np.random.RandomState(0)
    self.logits = {"image": jnp.asarray(r.randn(b, GRID * GRID, V_IMG), jnp.float32),
                   "text": jnp.asarray(r.randn(b, N_TXT, V_TXT), jnp.float32),
                   "length": jnp.asarray(r.randn(b, N_TXT), jnp.float32),
                   "itm": jnp.asarray(r.randn(b, 2), jnp.float32)}
    self.calls = []

  def apply(self, variables, inputs, attn, *, layout, outputs, **kw):
    del variables, kw
    self.calls.append((inputs, attn, layout, outputs))
    return {k: self.logits[k] for k in outputs}


def test_uniform_mask_ratio_histogram_is_flat_and_counts_follow_it():
  b, n = 20000, 64
  ratio, mask = xlxmert.uniform_image_mask(jax.random.key(0), b, n)
  ratio, count = np.asarray(ratio), np.asarray(mask).sum(-1)
  hist, _ = np.histogram(ratio, bins=10, range=(0, 1))
  assert np.abs(hist - b / 10).max() < 0.06 * b / 10, hist  # ~5 sigma of a flat histogram
  np.testing.assert_array_equal(count, np.clip(np.ceil(ratio * n), 1, n))
  counts = np.bincount(count, minlength=n + 1)[1:]
  assert counts.min() > 0.7 * b / n and counts.max() < 1.3 * b / n, counts  # every count 1..n
  # Which cells: uniform over positions (each cell masked ~ half the time).
  per_cell = np.asarray(mask).mean(0)
  assert np.abs(per_cell - per_cell.mean()).max() < 0.03


def test_ccc_targets_are_the_codes_of_the_masked_cells():
  c = _config()
  batch = _batch()
  model = RecordingModel(8)
  obj = xlxmert.XlxmertObjective(c, model, _encode, EOS, SEP)
  _, aux = obj.loss_fn({}, None, batch, jax.random.key(3), modality=0)
  (inputs, _, layout, outputs), = model.calls
  assert outputs == ("image",) and layout.task == seq.Task.T2I
  ids = np.asarray(inputs.ids[:, layout.image_slice])
  masked = np.asarray(inputs.is_special[:, layout.image_slice])
  codes = np.asarray(batch["image"])
  assert masked.any() and (masked.sum(-1) >= 1).all()
  np.testing.assert_array_equal(ids[masked], seq.MASK_IMG)  # masked cells carry no code
  np.testing.assert_array_equal(ids[~masked], codes[~masked])  # the rest show their cluster id
  logp = jax.nn.log_softmax(model.logits["image"], -1)
  target_logp = np.take_along_axis(np.asarray(logp), codes[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(aux["ccc_loss"]), -target_logp[masked].mean(), rtol=1e-5)
  assert float(aux["image_count"]) == masked.sum()
  assert float(aux["mlm_loss"]) == 0.0 and float(aux["itm_loss"]) == 0.0


def test_mlm_masks_only_real_text_and_fixed_ratio():
  c = _config()
  c.train.text_masking, c.train.text_mask_ratio = "fixed", 0.3
  batch = _batch()
  model = RecordingModel(8)
  obj = xlxmert.XlxmertObjective(c, model, _encode, EOS, SEP)
  _, aux = obj.loss_fn({}, None, batch, jax.random.key(4), modality=1)
  (inputs, _, layout, outputs), probe = model.calls
  assert outputs == ("text",) and probe[3] == ("length",)
  masked = np.asarray(inputs.is_special[:, layout.text_slice])
  length = np.asarray(batch["text_length"])
  np.testing.assert_array_equal(masked.sum(-1), np.ceil(0.3 * length))
  assert not (masked & ~np.asarray(seq.text_valid(length, N_TXT))).any()
  assert float(aux["text_count"]) == masked.sum()


def test_itm_pairs_and_labels():
  text = jnp.asarray([[3, 4, EOS], [3, 4, EOS], [5, 6, 7], [8, EOS, EOS]] * 250, jnp.int32)
  length = jnp.asarray([3, 3, 3, 2] * 250, jnp.int32)
  new_text, new_len, matched = xlxmert.mismatch(jax.random.key(0), text, length, 0.5)
  new_text, matched = np.asarray(new_text), np.asarray(matched)
  same = (new_text == np.asarray(text)).all(-1) & (np.asarray(new_len) == np.asarray(length))
  np.testing.assert_array_equal(matched, same)  # label = the caption is (still) the image's own
  # Every replacement is another caption of the batch; ~half replaced, ~1/4 of those identical.
  rows = {tuple(r) for r in np.asarray(text)}
  assert all(tuple(r) in rows for r in new_text)
  assert 0.55 < matched.mean() < 0.70, matched.mean()  # 0.5 + 0.5 * P(same caption) = 0.625
  # Through the objective: the ITM head is read on the none step with the swapped captions.
  c = _config()
  batch = _batch(8)
  model = RecordingModel(8)
  obj = xlxmert.XlxmertObjective(c, model, _encode, EOS, SEP)
  _, aux = obj.loss_fn({}, None, batch, jax.random.key(5), modality=2)
  (inputs, _, layout, outputs), = model.calls
  assert outputs == ("itm",) and not np.asarray(inputs.is_special[:, layout.image_slice]).any()
  shown = np.asarray(inputs.ids[:, layout.text_slice]) - V_IMG
  own = (shown == np.asarray(batch["text"])).all(-1)
  labels = own.astype(np.int32)  # batch captions are all distinct here
  logp = np.asarray(jax.nn.log_softmax(model.logits["itm"], -1))
  np.testing.assert_allclose(float(aux["itm_loss"]), -logp[np.arange(8), labels].mean(), rtol=1e-5)
  assert float(aux["itm_matched"]) == labels.sum()


def _fake_logits_fn(n_img):
  r = np.random.RandomState(0)
  table = jnp.asarray(r.randn(n_img, 32) * 3, jnp.float32)

  def fn(inputs, attn, *, layout, outputs):
    del attn, layout
    wobble = jnp.sin(jnp.where(inputs.is_special, 0, inputs.ids % 5).sum(-1))[:, None, None]
    return {"image": table[None] + wobble} if "image" in outputs else {}
  return fn


@pytest.mark.parametrize("n_img,expected", [(4, [4, 3, 2, 1]), (64, [64, 48, 32, 16])])
def test_mask_predict_4_updates_a_linearly_decaying_count(n_img, expected):
  c = _config()
  c.sequence.image_tokens = n_img
  spec = decoding.spec_from_config(c, "t2i", eos_id=EOS, record_history=True)
  assert spec.order == "mask_predict" and spec.num_steps == 4  # X-LXMERT's Mask-Predict-4
  text = jnp.full((2, N_TXT), EOS, jnp.int32).at[:, :3].set(5)
  out = decoding.text_to_image(_fake_logits_fn(n_img), spec, jax.random.key(0), text,
                               jnp.full((2,), 4, jnp.int32))
  masked = np.asarray(out.history["image_masked"])  # [T, B, n] after each step
  before = np.concatenate([np.ones((1,) + masked.shape[1:], bool), masked[:-1]])
  np.testing.assert_array_equal(before.sum(-1).T, [expected] * 2)  # slots updated per step
  assert not masked[-1].any()


def test_box_embedding_replaces_image_positions_only_when_on():
  off, on = _config(box_embedding=False), _config()
  p_off = transformer.param_shapes(off)
  p_on = transformer.param_shapes(on)
  assert "pos_img" in p_off and "box_dense" not in p_off
  assert set(p_on) - set(p_off) == {"box_dense", "box_ln", "feature_ln"}
  assert set(p_off) - set(p_on) == {"pos_img"}
  # Same code in every cell: with zero blocks the hidden states differ only through the boxes.
  model = transformer.from_config(on, num_layers=0)
  params = transformer.init_params(on, jax.random.key(0))
  layout = seq.make_layout(seq.Task.T2I, N_TXT, GRID * GRID)
  inputs = seq.build_input(layout, jnp.zeros((1, GRID * GRID), jnp.int32),
                           jnp.full((1, N_TXT), EOS, jnp.int32), image_vocab_size=V_IMG)
  hidden = jax.jit(lambda p, i: model.apply({"params": p}, i, None, layout=layout,
                                             outputs=("hidden",))["hidden"])(params, inputs)
  img = np.asarray(hidden[0, layout.image_slice])
  assert np.abs(img[:, None] - img[None]).sum(-1)[~np.eye(GRID * GRID, dtype=bool)].min() > 1e-3
  np.testing.assert_allclose(transformer.grid_boxes(4)[3], [0.5, 1.0, 0.5, 1.0])  # cell (1, 1) of 2x2


def test_two_stream_cross_attention_sees_only_the_other_stream():
  c = _config("tiny_lxmert")
  c.model.two_stream.language_layers = c.model.two_stream.relation_layers = 0
  model = transformer.from_config(c)
  assert isinstance(model, two_stream.TwoStreamTransformer)
  params = transformer.init_params(c, jax.random.key(0))
  layout = seq.make_layout(seq.Task.T2I, N_TXT, GRID * GRID)
  b = _batch(2)

  @jax.jit
  def cross(codes, text):
    inputs = seq.build_input(layout, codes, text, image_vocab_size=V_IMG)
    attn = seq.attention_mask(layout, b["text_length"])
    _, state = model.apply({"params": params}, inputs, attn, layout=layout, outputs=("image",),
                           mutable=["intermediates"])
    inter = state["intermediates"]["cross_0"]
    return inter["cross_lang"][0], inter["cross_image"][0]

  lang, img = two_stream.stream_indices(layout)
  q_txt = int(np.searchsorted(lang, layout.text_start))  # language-stream row of text slot 0
  cl, ci = map(np.asarray, cross(b["image"], b["text"]))
  text2 = b["text"].at[:, 1].set(9)  # another language slot than the query
  cl2, ci2 = map(np.asarray, cross(b["image"], text2))
  np.testing.assert_allclose(cl2[:, q_txt], cl[:, q_txt], atol=1e-6)  # language keys unseen
  assert np.abs(ci2 - ci).max() > 1e-4  # the image stream's cross-attention reads the text
  codes2 = b["image"].at[:, 5].set((b["image"][:, 5] + 1) % V_IMG)
  cl3, ci3 = map(np.asarray, cross(codes2, b["text"]))
  np.testing.assert_allclose(np.delete(ci3, 5, axis=1), np.delete(ci, 5, axis=1), atol=1e-6)
  assert np.abs(cl3[:, q_txt] - cl[:, q_txt]).max() > 1e-4  # ... and language reads the image
  full = jax.jit(lambda p, i: model.apply({"params": p}, i, None, layout=layout, outputs=(
      "image", "text", "length", "itm")))(params, seq.build_input(layout, b["image"], b["text"],
                                                                  image_vocab_size=V_IMG))
  assert full["image"].shape == (2, GRID * GRID, V_IMG) and full["itm"].shape == (2, 2)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["tiny", "tiny_lxmert"])
def test_loss_falls_on_an_overfit_batch_and_compiles_once(variant):
  c = _config(variant)
  model = transformer.from_config(c)
  obj = xlxmert.XlxmertObjective(c, model, _encode, EOS, SEP)
  params = transformer.init_params(c, jax.random.key(0))
  tx = optax.adam(3e-3)
  batch = _batch(8)

  @jax.jit
  def update(params, opt_state, rng, modality):
    (_, aux), grads = jax.value_and_grad(obj.loss_fn, has_aux=True)(params, None, batch, rng, modality)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  keys = {0: "ccc_loss", 1: "mlm_loss", 2: "itm_loss"}
  opt_state = tx.init(params)
  history = {m: [] for m in keys}
  for i in range(90):
    m = i % 3
    params, opt_state, aux = update(params, opt_state, jax.random.key(i % 6), jnp.int32(m))
    history[m].append(float(aux[keys[m]]))
    assert int(aux["modality"]) == m
  for m, h in history.items():
    assert np.mean(h[-4:]) < 0.7 * np.mean(h[:4]), (keys[m], h)
  assert obj.trace_count == 1  # one program for all three modalities
  fields = obj.metric_fields()
  assert {"ccc_loss", "mlm_loss", "itm_loss", "itm_accuracy", "frac_image"} <= set(fields)


@pytest.mark.parametrize("variant", ["tiny", "tiny_lxmert", "base", "base_uniter"])
def test_configs_validate(variant):
  c = configs_util.load_config(f"configs/xlxmert.py:{variant}")
  configs_util.validate_config(c)
  assert c.sequence.image_tokens == 64 and c.objective == "xlxmert"


@pytest.mark.parametrize("key,value,named", [
    ("model.arch", "three_stream", "config.model.arch"),
    ("model.itm_head", False, "config.model.itm_head"),
    ("train.modality_weights", (1.0, 1.0), "config.train.modality_weights"),
    ("train.text_masking", "bernoulli", "config.train.text_masking"),
])
def test_bad_settings_name_the_key(key, value, named):
  c = configs_util.load_config("configs/xlxmert.py:tiny_lxmert")
  section, leaf = key.split(".")
  c[section][leaf] = value
  with pytest.raises(ValueError, match=named.replace(".", r"\.")):
    configs_util.validate_config(c)
