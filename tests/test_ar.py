"""ARGVLT: the config validates, the causal model cannot see the future, the AR loss weighs the
generated modality 0.9 and the condition 0.1, a tiny run through trainer.Setup lowers the loss,
and KV-cache decoding gives the same tokens as full recomputation."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from magvlt_jax import configs_util, decoders, decoding_ar
from magvlt_jax import objectives
from magvlt_jax import sequence as seq
from magvlt_jax.configs_util import load_config
from magvlt_jax.models import transformer, vqgan
from magvlt_jax.objectives.common import smoothed_ce
from magvlt_jax.train import steps as steps_lib
from magvlt_jax.train import train_state, trainer

EOS = 1


def small_config():
  c = load_config("configs/argvlt.py:tiny")
  v = c.vqgan
  v.base_channels, v.z_channels, v.embed_dim, v.codebook_size = 8, 16, 16, 32
  c.model.num_layers, c.model.embed_dim, c.model.num_heads = 2, 32, 2
  c.model.length_classes = 8  # text_length follows (a FieldReference)
  c.data.global_batch_size = 4
  c.optimizer.warmup_steps = 1
  c.optimizer.peak_lr = 3e-3
  return c


class _Tok:
  eos_id, sep_id, vocab_size = EOS, 2, 128


def _identity_objective(c, model):
  """The AR objective with images given directly as codes (the encoder is not under test)."""
  return objectives.objective_class(c)(c, model, lambda _, codes: codes, EOS, 2)


def _data(c, b=2, seed=0):
  rng = np.random.default_rng(seed)
  codes = rng.integers(0, c.sequence.image_vocab_size, (b, c.sequence.image_tokens)).astype(np.int32)
  n = c.sequence.text_length
  text = np.full((b, n), EOS, np.int32)
  text[:, :4] = rng.integers(3, 100, (b, 4))
  return jnp.asarray(codes), jnp.asarray(text), jnp.full((b,), 5, jnp.int32)


@pytest.mark.parametrize("variant", ["tiny", "base", "large"])
def test_configs_validate(variant):
  c = load_config(f"configs/argvlt.py:{variant}")
  configs_util.validate_config(c)
  assert c.objective == "ar" and c.model.causal and c.decoding.kind == "ar"
  assert (c.train.generated_loss_weight, c.train.condition_loss_weight) == (0.9, 0.1)
  magvlt = load_config(f"configs/magvlt.py:{variant}")
  assert (c.model.num_layers, c.model.embed_dim) == (magvlt.model.num_layers, magvlt.model.embed_dim)


def test_bad_config_names_the_key():
  c = load_config("configs/argvlt.py:tiny")
  c.model.causal = False
  with pytest.raises(ValueError, match="config.model.causal"):
    configs_util.validate_config(c)
  c = load_config("configs/argvlt.py:tiny")
  c.train.task_weights = (1.0, 1.0, 1.0)
  with pytest.raises(ValueError, match="config.train.task_weights"):
    configs_util.validate_config(c)


def test_future_token_cannot_change_earlier_logits():
  c = small_config()
  model = transformer.from_config(c)
  params = transformer.init_params(c, jax.random.key(0))
  codes, text, tlen = _data(c)
  for task in (seq.Task.T2I, seq.Task.I2T):
    lay = seq.layout_from_config(c, task)
    attn = seq.attention_mask(lay, tlen)

    def run(codes_):
      inputs = seq.build_input(lay, codes_, text, image_vocab_size=c.sequence.image_vocab_size)
      return model.apply({"params": params}, inputs, attn, layout=lay, outputs=("image", "text"),
                         predict_next=True)
    a, b = run(codes), run(codes.at[:, 5].set((codes[:, 5] + 1) % c.sequence.image_vocab_size))
    # image slot j's logits predict code j from codes < j: codes 0..5 predictions unchanged.
    np.testing.assert_allclose(a["image"][:, :6], b["image"][:, :6], atol=1e-6)
    assert not np.allclose(a["image"][:, 6:], b["image"][:, 6:])
    if task == seq.Task.T2I:  # text precedes the image: untouched
      np.testing.assert_allclose(a["text"], b["text"], atol=1e-6)
    else:
      assert not np.allclose(a["text"], b["text"])


def test_loss_weights_on_a_hand_built_batch():
  c = small_config()
  model = transformer.from_config(c)
  params = transformer.init_params(c, jax.random.key(1))
  obj = _identity_objective(c, model)
  codes, text, tlen = _data(c)
  valid = np.asarray(seq.text_valid(tlen, c.sequence.text_length))
  for i, task in enumerate(obj.layouts):
    img_logits, txt_logits = obj.logits(params, task, codes, text, tlen)
    ce_img = np.asarray(smoothed_ce(img_logits, codes, 0.1)).mean()
    ce_txt = (np.asarray(smoothed_ce(txt_logits, text, 0.1)) * valid).sum() / valid.sum()
    gen, cond = (ce_img, ce_txt) if task == seq.Task.T2I else (ce_txt, ce_img)
    loss, aux = obj.loss_fn(params, None, {"image": codes, "text": text, "text_length": tlen},
                            jax.random.key(0), task=i)
    np.testing.assert_allclose(float(loss), 0.9 * gen + 0.1 * cond, rtol=1e-5)
    np.testing.assert_allclose(float(aux["generated_loss"]), gen, rtol=1e-5)
    assert float(aux["text_count"]) == valid.sum()  # padding is not scored


@pytest.mark.slow
def test_tiny_argvlt_loss_falls_through_the_trainer(tmp_path):
  c = small_config()
  vq_params = vqgan.init_params(c.vqgan, jax.random.key(0))
  setup = trainer.Setup(c, str(tmp_path), _Tok(), vq_params)
  assert type(setup.objective).__name__ == "ArObjective"
  rng = np.random.default_rng(0)
  s = c.vqgan.image_size
  _, text, tlen = _data(c, b=4)
  batch = setup.global_batch({"image": rng.integers(0, 255, (4, s, s, 3), dtype=np.uint8),
                              "text": np.asarray(text), "text_length": np.asarray(tlen)})
  state = setup.init_state(0)
  losses = []
  for step in range(25):
    state, metrics = setup.step_fn(state, batch, setup.tokenizer_params, setup.base_rng(step),
                                   setup.empty_metrics())
    losses.append(steps_lib.compute_metrics(metrics)["loss"])
  assert np.isfinite(losses).all()
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:3]), losses
  assert setup.objective.trace_count == 1  # one program for both tasks


def _trained_like_params(c):
  """Random params with a larger scale, so greedy decoding is not a constant sequence."""
  params = transformer.init_params(c, jax.random.key(3))
  return jax.tree.map(lambda x: x * 3.0, params)


@pytest.mark.parametrize("task", ["t2i", "i2t", "inpaint"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_cached_decoding_equals_full_recomputation(task, temperature):
  c = small_config()
  model = transformer.from_config(c)
  params = _trained_like_params(c)
  codes, text, tlen = _data(c, b=3)
  s = c.sequence
  spec = decoding_ar.make_spec(task, s.text_length, s.image_tokens, s.image_vocab_size, EOS,
                               temperature, top_k=8 if temperature else 0, vocab_limit=100)
  region = jnp.zeros(codes.shape, bool).at[:, 4:9].set(True)
  args = {"t2i": dict(text_ids=text, text_length=tlen), "i2t": dict(image_codes=codes),
          "inpaint": dict(image_codes=codes, text_ids=text, text_length=tlen, region=region)}[task]
  key = jax.random.key(7)
  cached = jax.jit(lambda p, k: decoding_ar.decode(model, p, spec, k, **args))(params, key)
  full = jax.jit(lambda p, k: decoding_ar.decode_uncached(model, p, spec, k, **args))(params, key)
  for name in ("image_codes", "text_ids", "text_length"):
    np.testing.assert_array_equal(np.asarray(getattr(cached, name)), np.asarray(getattr(full, name)))
  gen = cached.image_codes if task != "i2t" else cached.text_ids
  assert len(np.unique(np.asarray(gen))) > 1  # a non-trivial sequence was compared
  if task == "inpaint":  # context codes kept at their positions
    keep = ~np.asarray(region)
    np.testing.assert_array_equal(np.asarray(cached.image_codes)[keep], np.asarray(codes)[keep])
  if task == "i2t":
    ids, length = np.asarray(cached.text_ids), np.asarray(cached.text_length)
    assert (ids < 100).all()  # vocab_limit respected
    for row, n in zip(ids, length):
      assert (row[n:] == EOS).all() and (row[:n - 1] != EOS).all()


def test_ar_decoder_registry_runs_t2i_and_loglik():
  c = small_config()
  c.model.scan_layers = True  # base/large's layout: the cache is stacked on the layer axis too
  model = transformer.from_config(c)
  params = _trained_like_params(c)
  dec = decoders.create(c, model, eos_id=EOS, vocab_limit=100)
  assert isinstance(dec, decoders.ArDecoder)
  _, text, tlen = _data(c, b=2)
  _, fn = dec.task_fn("t2i")
  out = jax.jit(fn)(params, jax.random.key(0), 0.0, text, tlen)
  assert out.image_codes.shape == (2, c.sequence.image_tokens)
  spec = dec.spec("t2i")
  full = jax.jit(lambda p, k: decoding_ar.decode_uncached(model, p, spec, k, text_ids=text, text_length=tlen))(
      params, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(out.image_codes), np.asarray(full.image_codes))
  _, ll = dec.loglik_fn("image")
  score = np.asarray(jax.jit(ll)(params, out.image_codes, text, tlen))
  assert score.shape == (2,) and (score < 0).all()
  with pytest.raises(ValueError, match="does not support task 'infill'"):
    dec.task_fn("infill")


def biart_config():
  c = small_config()
  lv = load_config("configs/lverse.py:tiny")
  c.objective, c.model.num_segments = lv.objective, lv.model.num_segments
  c.train.alternate_tasks = lv.train.alternate_tasks
  c.train.generated_loss_weight = c.train.condition_loss_weight = 1.0
  return c


@pytest.mark.parametrize("variant", ["tiny", "base", "large"])
def test_lverse_configs_validate(variant):
  c = load_config(f"configs/lverse.py:{variant}")
  configs_util.validate_config(c)
  assert c.objective == "biart" and c.model.num_segments == 2 and c.model.causal
  if variant != "tiny":
    assert c.sequence.text_length == 64 and c.decoding.num_image_candidates == 64
  c.model.num_segments = 0
  with pytest.raises(ValueError, match="config.model.num_segments"):
    configs_util.validate_config(c)


def test_segment_ids_per_direction():
  lay_t2i, lay_i2t = seq.make_layout(seq.Task.T2I, 3, 4), seq.make_layout(seq.Task.I2T, 3, 4)
  R, G = seq.SEGMENT_REF, seq.SEGMENT_GEN
  # T2I [BOC, BOT, t, t, t, BOG, BOI, i, i, i, i]: the image and BOI are the target.
  assert np.asarray(seq.segment_ids(lay_t2i, 1))[0].tolist() == [R] * 6 + [G] * 5
  # I2T [BOC, BOI, i, i, i, i, BOG, BOT, t, t, t]: the text and BOT are the target.
  assert np.asarray(seq.segment_ids(lay_i2t, 2))[1].tolist() == [R] * 7 + [G] * 4


def test_biart_segments_matter_and_cached_decoding_matches():
  c = biart_config()
  model = transformer.from_config(c)
  params = _trained_like_params(c)
  assert "segment_embed" in params
  obj = _identity_objective(c, model)
  codes, text, tlen = _data(c)
  batch = {"image": codes, "text": text, "text_length": tlen}
  loss, aux = obj.loss_fn(params, None, batch, jax.random.key(0), task=0)
  np.testing.assert_allclose(float(loss), float(aux["generated_loss"] + aux["condition_loss"]), rtol=1e-6)
  flat = dict(params, segment_embed=params["segment_embed"][::-1])  # swap [REF] and [GEN]
  assert not np.isclose(float(loss), float(obj.loss_fn(flat, None, batch, jax.random.key(0), task=0)[0]))
  s = c.sequence
  for task, args in (("t2i", dict(text_ids=text, text_length=tlen)), ("i2t", dict(image_codes=codes))):
    spec = decoding_ar.make_spec(task, s.text_length, s.image_tokens, s.image_vocab_size, EOS, 1.0, 8, 100)
    a = jax.jit(lambda p, k: decoding_ar.decode(model, p, spec, k, **args))(params, jax.random.key(2))
    b = jax.jit(lambda p, k: decoding_ar.decode_uncached(model, p, spec, k, **args))(params, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a.image_codes), np.asarray(b.image_codes))
    np.testing.assert_array_equal(np.asarray(a.text_ids), np.asarray(b.text_ids))


def test_biart_alternates_the_direction_per_step():
  """configs/lverse.py: train.alternate_tasks -> T2I on even steps, I2T on odd ones, through the
  train step (it passes state.step), one compiled program."""
  c = biart_config()
  assert c.train.alternate_tasks
  model = transformer.from_config(c)
  obj = _identity_objective(c, model)
  assert obj.uses_step
  codes, text, tlen = _data(c)
  batch = {"image": codes, "text": text, "text_length": tlen}
  tx = optax.adam(0.0)  # has the update count the step reads
  state = train_state.TrainState.create(transformer.init_params(c, jax.random.key(1)), tx)
  step = jax.jit(functools.partial(steps_lib.train_step, objective=obj, tx=tx,
                                   schedule=lambda _: 0.0))
  tasks = []
  for _ in range(4):
    state, metrics = step(state, batch, None, jax.random.key(0), steps_lib.empty_metrics(obj))
    tasks.append(steps_lib.compute_metrics(metrics)["frac_i2t"])
  assert tasks == [0.0, 1.0, 0.0, 1.0] and obj.trace_count == 1
  with pytest.raises(ValueError, match="needs the step"):
    obj.loss_fn(state.params, None, batch, jax.random.key(0))
  c.train.task_weights = (1.0, 0.0)
  with pytest.raises(ValueError, match="config.train.alternate_tasks"):
    configs_util.validate_config(c)
