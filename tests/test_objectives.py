"""Objectives: MixSel layouts/targets, UnrollMask re-mask rule, task draw frequencies, the loss
falling on a tiny overfit batch for every task, and the multitask step compiling once."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from magvlt_jax import configs_util
from magvlt_jax import masking
from magvlt_jax.objectives import magvlt as objectives
from magvlt_jax import sequence as seq
from magvlt_jax.models import transformer

EOS, SEP = 1, 2
N_TXT, GRID, S = 8, 4, 16  # 8 text slots, 4x4 codes, 16x16 images


def _config():
  c = configs_util.load_config("configs/magvlt.py:tiny")
  c.model.num_layers, c.model.embed_dim, c.model.num_heads = 1, 32, 2
  c.model.dropout_rate = c.model.attention_dropout_rate = 0.0
  c.model.length_classes = N_TXT  # also sequence.text_length (a FieldReference)
  c.sequence.image_tokens = GRID * GRID
  c.sequence.image_vocab_size = 16
  c.sequence.text_vocab_size = 16
  c.train.use_unroll = c.train.use_mixsel = True  # the paper's objective (tiny turns both off)
  return c


def _encode(vq_params, images):
  """Stand-in tokenizer: mean red level of each 4x4 pixel cell, 16 levels, raster order."""
  del vq_params
  x = jnp.asarray(images, jnp.float32)
  b = x.shape[0]
  cells = x.reshape(b, GRID, S // GRID, GRID, S // GRID, 3).mean(axis=(2, 4))
  return jnp.clip(cells[..., 0] // 16, max=15).astype(jnp.int32).reshape(b, -1)


def _batch(b=4, seed=0):
  rng = np.random.default_rng(seed)
  levels = rng.integers(0, 16, (b, GRID, GRID)) * 16 + 8
  image = np.repeat(np.repeat(levels, S // GRID, 1), S // GRID, 2)[..., None].repeat(3, -1)
  image = image.astype(np.uint8)
  length = rng.integers(3, N_TXT + 1, (b,)).astype(np.int32)
  text = np.full((b, N_TXT), EOS, np.int32)
  for i, n in enumerate(length):
    text[i, :n - 1] = rng.integers(3, 16, n - 1)
  return {"image": image, "image_lr": image[:, :, ::2], "image_tb": image[:, ::2],
          "text": text, "text_length": length}


def _objective(**train_overrides):
  c = _config()
  for k, v in train_overrides.items():
    c.train[k] = v
  return c, objectives.MagvltObjective(c, transformer.from_config(c), _encode, EOS, SEP)


def test_join_captions_layout():
  text = np.array([[10, 11, EOS, EOS, EOS, EOS], [20, 21, 22, EOS, EOS, EOS]], np.int32)
  length = np.array([3, 4], np.int32)
  ids, new_len, first, second = objectives.join_captions(
      jnp.asarray(text), jnp.asarray(length), objectives.partner_index(2), SEP, EOS)
  # Example 0: "10 11" SEP "20 21 22 EOS" (6 slots, fits exactly).
  np.testing.assert_array_equal(ids[0], [10, 11, SEP, 20, 21, 22])
  assert int(new_len[0]) == 6
  np.testing.assert_array_equal(first[0], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(second[0], [0, 0, 0, 1, 1, 1])
  # Example 1: "20 21 22" SEP "10 11" then truncated at 6 (no EOS fits).
  np.testing.assert_array_equal(ids[1], [20, 21, 22, SEP, 10, 11])
  assert int(new_len[1]) == 6


def test_mix_images_and_half_regions():
  b = _batch(2)
  partner = objectives.partner_index(2)
  mixed = np.asarray(objectives.mix_images(b["image_lr"], b["image_tb"], partner,
                                           jnp.array([False, True])))
  np.testing.assert_array_equal(mixed[0, :, :S // 2], b["image_lr"][0])  # left = first
  np.testing.assert_array_equal(mixed[0, :, S // 2:], b["image_lr"][1])  # right = partner
  np.testing.assert_array_equal(mixed[1, :S // 2], b["image_tb"][1])  # top = first
  np.testing.assert_array_equal(mixed[1, S // 2:], b["image_tb"][0])  # bottom = partner
  region = np.asarray(objectives.half_region(16, jnp.array([False, True]), jnp.array([False, True])))
  grid = region.reshape(2, 4, 4)
  assert grid[0, :, 2:].all() and not grid[0, :, :2].any()  # right half (second, horizontal)
  assert grid[1, :2].all() and not grid[1, 2:].any()  # top half (first, vertical)


def test_t2i_mixsel_targets_and_selector():
  _, obj = _objective()
  b = _batch(4)
  codes = _encode(None, b["image"])
  inputs, attn, target, mask = obj.t2i_mixsel(codes, jnp.asarray(b["text"]),
                                              jnp.asarray(b["text_length"]), jax.random.key(3))
  lay = obj.layouts[seq.Task.T2I]
  bog = np.asarray(inputs.ids[:, lay.bog_index])
  assert set(bog.tolist()) <= {seq.LEFT, seq.RIGHT}
  partner = np.roll(np.arange(4), -1)
  for i in range(4):
    want = codes[i] if bog[i] == seq.LEFT else codes[partner[i]]
    np.testing.assert_array_equal(target[i], want)  # the selected caption's image
    text_ids = np.asarray(inputs.ids[i, lay.text_slice]) - obj.image_vocab
    n1 = b["text_length"][i] - 1
    np.testing.assert_array_equal(text_ids[:n1], b["text"][i, :n1])  # first caption, no EOS
    assert text_ids[n1] == SEP
  assert np.asarray(mask).sum(axis=1).min() >= 1
  assert attn.shape == (4, 1, lay.length, lay.length)


def test_i2t_and_it2it_mixsel_targets():
  _, obj = _objective()
  b = {k: jnp.asarray(v) for k, v in _batch(4, seed=1).items()}
  inputs, _, target, mask = obj.i2t_mixsel(None, b, jax.random.key(0))
  lay = obj.layouts[seq.Task.I2T]
  bog = np.asarray(inputs.ids[:, lay.bog_index])
  partner = np.roll(np.arange(4), -1)
  for i in range(4):
    first = bog[i] in (seq.LEFT, seq.TOP)
    np.testing.assert_array_equal(target[i], b["text"][i if first else partner[i]])
  valid = np.asarray(seq.text_valid(jnp.where(jnp.isin(jnp.asarray(bog), jnp.array([seq.LEFT, seq.TOP])),
                                              b["text_length"], b["text_length"][partner]), N_TXT))
  assert not (np.asarray(mask) & ~valid).any()  # padding never masked
  inputs, _, (codes, text), (img_mask, txt_mask) = obj.it2it_mixsel(None, b, jax.random.key(1))
  bog = np.asarray(inputs.ids[:, lay.bog_index])
  vertical = np.isin(bog, [seq.TOP, seq.BOTTOM])
  first = np.isin(bog, [seq.LEFT, seq.TOP])
  region = np.asarray(objectives.half_region(16, jnp.asarray(vertical), jnp.asarray(first)))
  img_mask, txt_mask = np.asarray(img_mask), np.asarray(txt_mask)
  assert not (img_mask & ~region).any() and (img_mask.sum(1) >= 1).all()
  for i in range(4):
    sep_at = int(np.argmax(np.asarray(text[i]) == SEP))
    masked = np.nonzero(txt_mask[i])[0]
    assert ((masked < sep_at) if first[i] else (masked > sep_at)).all()


def test_unroll_remask_is_subset_with_floor_count():
  key = jax.random.key(0)
  prev = masking.sample_mask(key, jnp.full((64,), 0.7), jnp.ones((64, 32), bool))
  u = jax.random.uniform(jax.random.key(1), (64,))
  for schedule in ("cosine", "linear"):
    r = masking.mask_ratio(u, schedule)
    r2 = objectives.later_ratio(jax.random.key(2), u, schedule)
    assert bool((r2 <= r + 1e-6).all())  # a later decoding step masks less
    new = masking.remask_subset(jax.random.key(3), prev, r2)
    assert not bool((new & ~prev).any())
    m = prev.sum(1)
    want = jnp.clip(jnp.floor(r2 * m).astype(jnp.int32), min=1, max=m)
    np.testing.assert_array_equal(new.sum(1), want)


def test_task_draw_frequencies():
  keys = jax.random.split(jax.random.key(0), 20000)
  tasks = np.asarray(jax.jit(jax.vmap(lambda k: objectives.draw_task(k, (8.0, 1.0, 1.0))))(keys))
  freq = np.bincount(tasks, minlength=3) / len(tasks)
  np.testing.assert_allclose(freq, [0.8, 0.1, 0.1], atol=0.015)
  only_i2t = jax.vmap(lambda k: objectives.draw_task(k, (0.0, 1.0, 0.0)))(keys[:100])
  assert (np.asarray(only_i2t) == 1).all()
  with pytest.raises(ValueError, match="task_weights"):
    objectives.draw_task(keys[0], (1.0, -1.0, 0.0))


def test_loss_falls_for_every_task_and_step_compiles_once():
  c, obj = _objective(aux_batch_stride=2)  # also covers the strided auxiliary passes
  params = transformer.init_params(c, jax.random.key(0))
  tx = optax.adam(5e-3)
  batch = {k: jnp.asarray(v) for k, v in _batch(8).items()}

  @jax.jit
  def update(params, opt_state, rng, task):
    (loss, aux), grads = jax.value_and_grad(obj.loss_fn, has_aux=True)(params, None, batch, rng, task)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, aux

  for task in seq.Task:
    p, opt_state = params, tx.init(params)
    history = []
    for i in range(60):
      p, opt_state, aux = update(p, opt_state, jax.random.key(i), jnp.int32(task))
      history.append(float(aux["task_loss"]))
      assert int(aux["task"]) == int(task)
    first, last = np.mean(history[:5]), np.mean(history[-5:])
    assert last < 0.8 * first, (task, history)
    for key in ("unroll_loss", "mixsel_loss"):
      assert np.isfinite(float(aux[key])) and float(aux[key]) > 0 or (
          key == "unroll_loss" and task == seq.Task.IT2IT)
  # One program for all three tasks and every batch: traced exactly once.
  assert obj.trace_count == 1


def test_cached_codes_replace_the_encoder():
  c, obj = _objective(use_mixsel=False)  # MixSel still encodes its mixed halves
  params = transformer.init_params(c, jax.random.key(0))
  batch = {k: jnp.asarray(v) for k, v in _batch(4).items()}
  cached = objectives.MagvltObjective(c, transformer.from_config(c), None, EOS, SEP)
  cached.read_cached_codes()  # no encoder at all: it must read the codes
  assert "image_codes" in cached.batch_keys and "image" not in cached.batch_keys
  assert "image" in obj.batch_keys  # the class's keys are unchanged
  coded = {k: batch[k] for k in cached.batch_keys if k != "image_codes"}
  coded["image_codes"] = _encode(None, batch["image"])
  # One task traced (the codes are read before the task switch): a third of the compile.
  loss = lambda o, b: jax.jit(lambda p, b: o.loss_fn(p, None, b, jax.random.key(1),
                                                     int(seq.Task.T2I))[0])(params, b)
  np.testing.assert_allclose(float(loss(cached, coded)), float(loss(obj, batch)), rtol=1e-6)
