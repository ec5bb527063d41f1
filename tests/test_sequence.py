"""Sequence layouts, model inputs and attention masks (SPEC section 2)."""
import jax.numpy as jnp
import numpy as np
import pytest

from magvlt_jax import sequence as seq


def test_layout_indices_base_sizes():
  t2i = seq.make_layout(seq.Task.T2I, 64, 256)
  assert (t2i.length, t2i.boc_index, t2i.bot_index, t2i.bog_index, t2i.boi_index) == (324, 0, 1, 66, 67)
  assert (t2i.text_start, t2i.image_start) == (2, 68)
  assert seq.text_slots(t2i)[[0, -1]].tolist() == [2, 65]
  assert seq.image_slots(t2i)[[0, -1]].tolist() == [68, 323]
  for task in (seq.Task.I2T, seq.Task.IT2IT):
    i2t = seq.make_layout(task, 64, 256)
    assert (i2t.length, i2t.boc_index, i2t.boi_index, i2t.bog_index, i2t.bot_index) == (324, 0, 1, 258, 259)
    assert seq.image_slots(i2t)[[0, -1]].tolist() == [2, 257]
    assert seq.text_slots(i2t)[[0, -1]].tolist() == [260, 323]
  assert hash(t2i) == hash(seq.make_layout(0, 64, 256))  # static, usable as a jit static arg


@pytest.mark.parametrize("task", list(seq.Task))
def test_build_input_fields(task):
  layout = seq.make_layout(task, 5, 6)
  codes = jnp.arange(6)[None] + 10
  text = jnp.arange(5)[None] + 1
  img_m = jnp.array([[True, False, False, False, False, True]])
  txt_m = jnp.array([[False, True, False, False, False]])
  inp = seq.build_input(layout, codes, text, img_m, txt_m, bog_token=jnp.array([seq.RIGHT]),
                        image_vocab_size=100)
  ids, spc, mod, pos = (np.asarray(a[0]) for a in (inp.ids, inp.is_special, inp.modality, inp.local_pos))
  img, txt = seq.image_slots(layout), seq.text_slots(layout)
  assert ids[img].tolist() == [seq.MASK_IMG, 11, 12, 13, 14, seq.MASK_IMG]
  assert ids[txt].tolist() == [101, seq.MASK_TXT, 103, 104, 105]
  assert spc[img].tolist() == img_m[0].tolist() and spc[txt].tolist() == txt_m[0].tolist()
  assert (mod[img] == seq.MODALITY_IMAGE).all() and (mod[txt] == seq.MODALITY_TEXT).all()
  assert pos[img].tolist() == list(range(6)) and pos[txt].tolist() == list(range(5))
  specials = [layout.boc_index, 1, layout.bog_index, layout.bog_index + 1]
  assert spc[specials].all() and (mod[specials] == seq.MODALITY_SPECIAL).all()
  assert pos[specials].tolist() == [0, 1, 2, 3]
  assert ids[layout.boc_index] == seq.BOC and ids[layout.bog_index] == seq.RIGHT
  assert ids[layout.bot_index] == seq.BOT and ids[layout.boi_index] == seq.BOI


def test_build_input_rejects_wrong_shapes():
  layout = seq.make_layout(seq.Task.T2I, 5, 6)
  with pytest.raises(ValueError, match="image_codes"):
    seq.build_input(layout, jnp.zeros((1, 7), jnp.int32), jnp.zeros((1, 5), jnp.int32),
                    image_vocab_size=10)
  with pytest.raises(ValueError, match="image_vocab_size"):
    seq.build_input(layout, jnp.zeros((1, 6), jnp.int32), jnp.zeros((1, 5), jnp.int32))


def test_text_valid_counts_eos():
  valid = np.asarray(seq.text_valid(jnp.array([1, 3, 5]), 5))
  assert valid.sum(1).tolist() == [1, 3, 5]
  assert valid[1].tolist() == [True, True, True, False, False]


def test_t2i_attention_mask_hides_padding_rows_and_columns():
  layout = seq.make_layout(seq.Task.T2I, 4, 3)
  m = np.asarray(seq.attention_mask(layout, jnp.array([2, 4])))
  assert m.shape == (2, 1, 11, 11)
  m0 = m[0, 0]
  pad = seq.text_slots(layout)[2:]  # text slots 2, 3 are padding for length 2
  real = [i for i in range(11) if i not in pad]
  assert not m0[np.ix_(real, pad)].any()  # padding hidden as keys
  assert m0[np.ix_(real, real)].all()  # everything else bidirectional
  for r in pad:  # padding rows see only themselves
    assert m0[r].tolist() == [c == r for c in range(11)]
  assert m[1, 0].all()  # full-length caption: full attention


@pytest.mark.parametrize("task", [seq.Task.I2T, seq.Task.IT2IT])
def test_i2t_attention_mask_bot_blind_to_text(task):
  layout = seq.make_layout(task, 4, 3)
  m = np.asarray(seq.attention_mask(layout, jnp.array([2])))[0, 0]
  txt = seq.text_slots(layout)
  bot = layout.bot_index
  assert m[bot].tolist() == [c <= bot for c in range(layout.length)]
  pad = txt[2:]
  others = [r for r in range(layout.length) if r != bot]
  assert not m[:, pad].any()  # padding columns hidden from every row
  assert m[np.ix_(others, txt[:2])].all()  # other rows see the real text
  for r in pad:  # padding rows stay open (official I2T rule), minus padding columns
    assert m[r].tolist() == [c not in pad for c in range(layout.length)]


def test_attention_mask_every_row_sees_itself_when_empty():
  layout = seq.make_layout(seq.Task.T2I, 3, 2)
  m = np.asarray(seq.attention_mask(layout, jnp.array([0])))[0, 0]
  assert m.any(axis=-1).all()
  for r in seq.text_slots(layout):
    assert m[r, r] and m[r].sum() == 1


def test_selector_token():
  first = jnp.array([True, False, True, False])
  vertical = jnp.array([False, False, True, True])
  assert seq.selector_token(first).tolist() == [seq.LEFT, seq.RIGHT, seq.LEFT, seq.RIGHT]
  assert seq.selector_token(first, vertical).tolist() == [seq.LEFT, seq.RIGHT, seq.TOP, seq.BOTTOM]


def test_causal_mask_is_lower_triangular():
  m = np.asarray(seq.causal_mask(4))[0, 0]
  assert m.tolist() == [[c <= r for c in range(4)] for r in range(4)]
