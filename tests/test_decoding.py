"""Masked iterative decoding: counts, fixed tokens, regions, orders, guidance, jit-once, and an
overfit tiny model that decodes its training pairs back."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from magvlt_jax import configs_util, decoding, decoding_text, masking, sequence
from magvlt_jax.models import transformer

EOS = 1


class FakeModel:
  """Deterministic logits_fn: fixed per-slot logits plus a term that depends on the visible
  tokens (so predictions change across steps); counts its traces."""

  def __init__(self, n_txt, n_img, v_img=32, v_txt=20, length=5, seed=0):
    r = np.random.RandomState(seed)
    self.img = jnp.asarray(r.randn(n_img, v_img) * 2, jnp.float32)
    self.txt = jnp.asarray(r.randn(n_txt, v_txt) * 2, jnp.float32)
    self.mix_img = jnp.asarray(r.randn(v_img), jnp.float32)
    self.mix_txt = jnp.asarray(r.randn(v_txt), jnp.float32)
    self.length_logits = jax.nn.one_hot(length - 1, n_txt) * 10.0
    self.traces = 0

  def __call__(self, inputs, attn, *, layout, outputs):
    self.traces += 1
    visible = jnp.where(inputs.is_special, 0, inputs.ids % 7).sum(-1).astype(jnp.float32)
    wobble = jnp.sin(visible)[:, None, None]
    b = inputs.ids.shape[0]
    out = {}
    if "image" in outputs:
      out["image"] = self.img[None] + wobble * self.mix_img
    if "text" in outputs:
      out["text"] = self.txt[None] + wobble * self.mix_txt
    if "length" in outputs:
      out["length"] = jnp.broadcast_to(self.length_logits, (b, self.length_logits.shape[0]))
    return out


def _spec(n_txt, n_img, task, steps=None, **kw):
  layout = sequence.make_layout(sequence.Task.T2I if task in ("t2i", "inpaint") else
                                sequence.Task.I2T, n_txt, n_img)
  gen_img = task in ("t2i", "inpaint", "uncond")
  gen_txt = task in ("i2t", "infill", "uncond")
  length_mode = {"i2t": "predict", "uncond": "predict_each_step"}.get(task, "fixed")
  steps = steps or (10 if gen_img and not gen_txt else 12)
  return decoding.DecodeSpec(layout=layout, num_steps=steps, image_vocab_size=32, eos_id=EOS,
                             generate_image=gen_img, generate_text=gen_txt, length_mode=length_mode,
                             record_history=True, **kw)


def _text(batch, n_txt, length=6):
  ids = np.full((batch, n_txt), EOS, np.int32)
  ids[:, :length - 1] = np.arange(3, 3 + length - 1)
  return jnp.asarray(ids), jnp.full((batch,), length, jnp.int32)


def test_t2i_unmask_counts_match_official():
  spec = _spec(8, 256, "t2i")
  fake = FakeModel(8, 256)
  text, length = _text(2, 8)
  out = jax.jit(lambda k: decoding.text_to_image(fake, spec, k, text, length))(jax.random.PRNGKey(0))
  masked = np.asarray(out.history["image_masked"]).sum(-1)  # [T, B]
  unmasked = np.diff(np.concatenate([np.full((1, 2), 256), masked]), axis=0) * -1
  expected = [3, 9, 15, 21, 26, 31, 34, 37, 39, 41]
  np.testing.assert_array_equal(unmasked[:, 0], expected)
  np.testing.assert_array_equal(unmasked[:, 1], expected)
  np.testing.assert_array_equal(masking.decode_unmask_counts(10, 256), expected)


@pytest.mark.parametrize("order", ["maskgit", "random", "raster"])
def test_revealed_image_tokens_never_change(order):
  spec = _spec(8, 64, "t2i", order=order)
  text, length = _text(3, 8)
  out = jax.jit(lambda k: decoding.text_to_image(FakeModel(8, 64), spec, k, text, length))(jax.random.PRNGKey(1))
  codes, masked = np.asarray(out.history["image_codes"]), np.asarray(out.history["image_masked"])
  for s in range(1, spec.num_steps):
    fixed = ~masked[s - 1]
    np.testing.assert_array_equal(codes[s][fixed], codes[s - 1][fixed])
    assert not (masked[s] & fixed).any(), "a revealed slot was masked again"
  assert not masked[-1].any()
  np.testing.assert_array_equal(codes[-1], out.image_codes)
  if order == "raster":  # revealed slots always form a raster prefix
    for s in range(spec.num_steps):
      n_rev = int((~masked[s][0]).sum())
      assert (~masked[s][0][:n_rev]).all()


def test_mask_predict_linear_remasking():
  spec = _spec(8, 64, "t2i", order="mask_predict")
  text, length = _text(2, 8)
  out = jax.jit(lambda k: decoding.text_to_image(FakeModel(8, 64), spec, k, text, length))(jax.random.PRNGKey(2))
  masked = np.asarray(out.history["image_masked"]).sum(-1)[:, 0]
  np.testing.assert_array_equal(masked, masking.decode_keep_counts(10, 64, "linear"))
  assert masked[-1] == 0


def test_inpaint_keeps_codes_outside_region():
  spec = _spec(8, 64, "inpaint")
  region = decoding.centre_region(64)
  assert region.sum() == 16 and region.reshape(8, 8)[2:6, 2:6].all()
  assert decoding.centre_region(256).reshape(16, 16)[4:12, 4:12].sum() == 64
  codes = jnp.asarray(np.random.RandomState(0).randint(0, 32, (2, 64)), jnp.int32)
  text, length = _text(2, 8)
  out = jax.jit(lambda k: decoding.inpaint(FakeModel(8, 64), spec, k, codes, region, text, length))(
      jax.random.PRNGKey(3))
  hist = np.asarray(out.history["image_codes"])
  np.testing.assert_array_equal(hist[:, :, ~region], np.broadcast_to(codes[:, ~region], hist[:, :, ~region].shape))
  masked = np.asarray(out.history["image_masked"])
  assert not masked[:, :, ~region].any() and not masked[-1].any()
  assert (np.asarray(out.image_codes)[:, region] != np.asarray(codes)[:, region]).any()


def test_i2t_remasks_only_first_n_slots():
  n = 5
  spec = _spec(10, 16, "i2t")
  codes = jnp.zeros((2, 16), jnp.int32)
  out = jax.jit(lambda k: decoding.image_to_text(FakeModel(10, 16, length=n), spec, k, codes))(
      jax.random.PRNGKey(4))
  masked = np.asarray(out.history["text_masked"])  # [T, B, n_txt]
  assert not masked[:, :, n:].any()
  expected = [max(1, int(n * (12 - t) / 12)) for t in range(12)]
  np.testing.assert_array_equal(masked.sum(-1)[:, 0], expected)
  np.testing.assert_array_equal(np.asarray(out.text_length), [n, n])
  ids = np.asarray(out.text_ids)
  assert (ids[:, n:] == EOS).all() and (ids[:, :n] >= 0).all()
  assert np.isfinite(np.asarray(out.text_score)).all()


@pytest.mark.parametrize("probe_slots", [0, 4])
def test_i2t_length_probe_shows_the_configured_text_slots(probe_slots):
  """The length pass hides text columns >= length_probe_slots (official: 16 of 64); 0 shows all."""
  n_txt, n_img, n = 10, 16, 6
  seen = []

  class Recorder(FakeModel):
    def __call__(self, inputs, attn, *, layout, outputs):
      seen.append((tuple(outputs), attn))
      return super().__call__(inputs, attn, layout=layout, outputs=outputs)

  spec = _spec(n_txt, n_img, "i2t", length_probe_slots=probe_slots)
  out = decoding.image_to_text(Recorder(n_txt, n_img, length=n), spec, jax.random.PRNGKey(0),
                               jnp.zeros((1, n_img), jnp.int32))
  assert seen[0][0] == ("length",)  # the probe runs first, outside the loop
  np.testing.assert_array_equal(
      np.asarray(seen[0][1]),
      np.asarray(sequence.attention_mask(spec.layout, [probe_slots or n_txt])))
  np.testing.assert_array_equal(np.asarray(out.text_length), [n])
  with pytest.raises(ValueError, match="length_probe_slots"):
    _spec(n_txt, n_img, "i2t", length_probe_slots=n_txt + 1)


def test_text_remask_orders_pick_exact_counts():
  logp = jnp.asarray([[-0.1, -3.0, -0.2, -2.0, -0.5, 0.0]])
  valid = jnp.asarray([[True, True, True, True, True, False]])
  key = jax.random.PRNGKey(0)
  pick = lambda order, step: np.asarray(decoding_text.remask(key, logp, valid, step, 4, order))[0]
  # step 1 of 4 over 5 valid slots: max(1, int(5 * 3 / 4)) = 3 re-masked, never the invalid slot
  for order in ("maskgit", "mask_predict", "random", "raster"):
    assert pick(order, 1).sum() == 3 and not pick(order, 1)[5]
  assert pick("mask_predict", 1).tolist() == [False, True, False, True, True, False]  # lowest logp
  assert pick("raster", 1).tolist() == [False, False, True, True, True, False]  # left to right
  assert pick("maskgit", 3).sum() == 1


def test_infill_keeps_tokens_outside_span():
  spec = _spec(12, 16, "infill")
  text, length = _text(2, 12, length=10)
  span = np.asarray(decoding.middle_span(length, 12))
  assert span[0].tolist() == [j in (2, 3, 4, 5) for j in range(12)]  # 9 words: middle half
  out = jax.jit(lambda k: decoding.infill(FakeModel(12, 16), spec, k, jnp.zeros((2, 16), jnp.int32),
                                          text, length))(jax.random.PRNGKey(5))
  hist = np.asarray(out.history["text_ids"])
  np.testing.assert_array_equal(hist[:, :, ~span[0]], np.broadcast_to(np.asarray(text)[:, ~span[0]], hist[:, :, ~span[0]].shape))
  assert not np.asarray(out.history["text_masked"])[:, :, ~span[0]].any()
  assert (np.asarray(out.text_ids)[:, span[0]] != np.asarray(text)[:, span[0]]).any()


def test_uncond_generates_both_and_tracks_length():
  spec = _spec(10, 16, "uncond")
  out = jax.jit(lambda k: decoding.generate(FakeModel(10, 16, length=7), spec, k, 3, (2, 4)))(
      jax.random.PRNGKey(6))
  lengths = np.asarray(out.history["text_length"])
  assert (lengths[0] == 7).all() and (np.asarray(out.text_length) == 7).all()
  assert not np.asarray(out.history["image_masked"])[-1].any()
  assert (np.asarray(out.text_ids)[:, 7:] == EOS).all()
  assert np.isfinite(np.asarray(out.text_score)).all() and (np.asarray(out.text_score) > -1e3).all()


def test_each_loop_traces_once_per_shape():
  fake = FakeModel(8, 16)
  text, length = _text(2, 8)
  region = jnp.asarray(decoding.centre_region(16))
  runs = {
      "t2i": lambda k, c: decoding.text_to_image(fake, _spec(8, 16, "t2i"), k, text, length),
      "inpaint": lambda k, c: decoding.inpaint(fake, _spec(8, 16, "inpaint"), k, c, region, text,
                                               length),
      "i2t": lambda k, c: decoding.image_to_text(fake, _spec(8, 16, "i2t"), k, c),
      "infill": lambda k, c: decoding.infill(fake, _spec(8, 16, "infill"), k, c, text, length),
      "uncond": lambda k, c: decoding.generate(fake, _spec(8, 16, "uncond"), k, 2),
  }
  jitted = {name: jax.jit(lambda k, c, f=f: f(k, c).image_codes) for name, f in runs.items()}
  for name, f in jitted.items():
    f(jax.random.PRNGKey(0), jnp.zeros((2, 16), jnp.int32))
  traces = fake.traces
  assert traces == 6  # one loop body per task + the I2T length probe
  for name, f in jitted.items():
    f(jax.random.PRNGKey(1), jnp.ones((2, 16), jnp.int32))
  assert fake.traces == traces, "a second call with the same shapes retraced"


def test_float32_sampling_from_bf16_logits():
  fake = FakeModel(8, 16)
  def bf16(inputs, attn, **kw):
    return {k: v.astype(jnp.bfloat16) for k, v in fake(inputs, attn, **kw).items()}
  text, length = _text(2, 8)
  out = jax.jit(lambda k: decoding.text_to_image(bf16, _spec(8, 16, "t2i"), k, text, length))(
      jax.random.PRNGKey(0))
  assert out.image_score.dtype == jnp.float32 and out.image_codes.dtype == jnp.int32


# --------------------------------------------------------------------- real tiny model
@pytest.fixture(scope="module")
def tiny():
  config = configs_util.load_config("configs/magvlt.py:tiny")
  config.model.num_layers = 1
  config.model.embed_dim = 64
  config.model.num_heads = 2
  model = transformer.from_config(config)
  r = np.random.RandomState(0)  # random params without compiling the init program
  params = jax.tree_util.tree_map_with_path(
      lambda path, l: jnp.asarray(1.0 + 0.1 * r.randn(*l.shape) if "scale" in str(path[-1])
                                  else 0.3 * r.randn(*l.shape), l.dtype),
      transformer.param_shapes(config))
  def logits_fn_of(p):
    return lambda inputs, attn, *, layout, outputs: model.apply(
        {"params": p}, inputs, attn, layout=layout, deterministic=True, outputs=outputs)
  return config, params, logits_fn_of


@pytest.mark.parametrize("task", ["t2i", "i2t"])
def test_guidance_scale_zero_equals_unguided(tiny, task):
  config, params, logits_fn_of = tiny
  n_txt, n_img = config.sequence.text_length, config.sequence.image_tokens
  text, length = _text(2, n_txt)
  codes = jnp.asarray(np.random.RandomState(0).randint(0, 256, (2, n_img)), jnp.int32)

  def make(guided):
    spec = decoding.spec_from_config(config, task, eos_id=EOS, guidance=guided, num_steps=4)
    fn = lambda p, k, s: (decoding.text_to_image(logits_fn_of(p), spec, k, text, length, s)
                          if task == "t2i" else
                          decoding.image_to_text(logits_fn_of(p), spec, k, codes, s))
    return jax.jit(fn)  # the scale is traced: one compile serves every scale

  compiled = {False: make(False), True: make(True)}

  def run(guided, scale):
    out = compiled[guided](params, jax.random.PRNGKey(7), scale)
    return np.asarray(out.image_codes), np.asarray(out.text_ids)

  plain = run(False, 0.0)
  zero = run(True, 0.0)
  strong = run(True, 3.0)
  np.testing.assert_array_equal(plain[0], zero[0])
  np.testing.assert_array_equal(plain[1], zero[1])
  changed = (plain[0] != strong[0]).any() if task == "t2i" else (plain[1] != strong[1]).any()
  assert changed, "guidance scale 3 should change the samples"


# --------------------------------------------------------------------- overfit tiny model
def _overfit(config, codes, text, lengths, steps=250):
  """Trains a tiny transformer with masked CE on T2I and I2T (+ length) for the given pairs."""
  model = transformer.from_config(config)
  n_txt, n_img = text.shape[1], codes.shape[1]
  vocab = int(config.sequence.image_vocab_size)
  lt2i, li2t = sequence.make_layout(0, n_txt, n_img), sequence.make_layout(1, n_txt, n_img)
  batch = codes.shape[0]
  opt = optax.adam(5e-3)

  def ce(logits, target, weight):
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), target[..., None], -1)[..., 0]
    return (nll * weight).sum() / jnp.maximum(weight.sum(), 1)

  def loss_fn(p, key):
    k = jax.random.split(key, 4)
    img_mask = masking.sample_mask(k[1], masking.sample_ratio(k[0], batch, "cosine"),
                                   jnp.ones(codes.shape, bool))
    inp = sequence.build_input(lt2i, codes, text, img_mask, None, image_vocab_size=vocab)
    out = model.apply({"params": p}, inp, sequence.attention_mask(lt2i, lengths), layout=lt2i,
                      outputs=("image",))
    txt_mask = masking.sample_mask(k[3], masking.sample_ratio(k[2], batch, "linear"),
                                   sequence.text_valid(lengths, n_txt))
    inp = sequence.build_input(li2t, codes, text, None, txt_mask, image_vocab_size=vocab)
    out2 = model.apply({"params": p}, inp, sequence.attention_mask(li2t, lengths), layout=li2t,
                       outputs=("text", "length"))
    return (ce(out["image"], codes, img_mask) + ce(out2["text"], text, txt_mask)
            + ce(out2["length"][:, None], (lengths - 1)[:, None], jnp.ones((batch, 1))))

  @jax.jit
  def train(params, key):
    def body(i, carry):
      p, s = carry
      loss, g = jax.value_and_grad(loss_fn)(p, jax.random.fold_in(key, i))
      u, s = opt.update(g, s, p)
      return optax.apply_updates(p, u), s
    p, _ = jax.lax.fori_loop(0, steps, body, (params, opt.init(params)))
    return p, loss_fn(p, key)

  params, loss = train(transformer.init_params(config, jax.random.PRNGKey(0)), jax.random.PRNGKey(1))
  fn = lambda inputs, attn, *, layout, outputs: model.apply(
      {"params": params}, inputs, attn, layout=layout, deterministic=True, outputs=outputs)
  return fn, float(loss)


@pytest.mark.slow
def test_overfit_model_decodes_its_training_pairs():
  config = configs_util.load_config("configs/magvlt.py:tiny")
  config.model.num_layers, config.model.embed_dim, config.model.num_heads = 1, 64, 2
  r = np.random.RandomState(0)
  codes = jnp.asarray(r.randint(0, 256, (4, 64)), jnp.int32)
  lengths = np.array([5, 7, 6, 8], np.int32)
  text = np.full((4, 24), EOS, np.int32)
  for i, n in enumerate(lengths):
    text[i, :n - 1] = r.randint(3, 100, n - 1)
  text, lengths = jnp.asarray(text), jnp.asarray(lengths)
  fn, loss = _overfit(config, codes, text, lengths)
  assert loss < 0.1, loss
  # Official schedules (T2I: 10 steps, temperature 1.4 -> 0.6; I2T: 12 steps, temperature 0.1).
  t2i = decoding.spec_from_config(config, "t2i", eos_id=EOS, vocab_limit=100)
  i2t = decoding.spec_from_config(config, "i2t", eos_id=EOS, vocab_limit=100)
  run = jax.jit(lambda k: (decoding.text_to_image(fn, t2i, k, text, lengths).image_codes,
                           decoding.image_to_text(fn, i2t, k, codes)))
  image_codes, captions = run(jax.random.PRNGKey(2))
  np.testing.assert_array_equal(np.asarray(image_codes), np.asarray(codes))
  np.testing.assert_array_equal(np.asarray(captions.text_length), np.asarray(lengths))
  np.testing.assert_array_equal(np.asarray(captions.text_ids), np.asarray(text))
