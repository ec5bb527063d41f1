"""Sequence layouts, model inputs and attention masks (SPEC section 2).

The only module that knows where BOC/BOT/BOI/BOG sit. Two layouts, one per batch:
  T2I:          [BOC, BOT, text(n_txt), BOG, BOI, image(n_img)]
  I2T / IT2IT:  [BOC, BOI, image(n_img), BOG, BOT, text(n_txt)]
Special slots get special positions 0, 1 (prefix) and 2, 3 (infix). Masked image/text slots are
embedded from the special table (MASK_IMG / MASK_TXT) and, as in the official code, receive both
their modality position and the special position at their modality-local index.
"""
import dataclasses
import enum

import flax.struct
import jax.numpy as jnp
import numpy as np

# Special-token ids (official SPECIAL_TOKENS_HNH).
BOI, BOT, BOC, BOG, MASK_IMG, MASK_TXT, LEFT, RIGHT, TOP, BOTTOM = range(10)
NUM_SPECIAL = 10

# Slot modality codes used in ModelInput.modality.
MODALITY_SPECIAL, MODALITY_IMAGE, MODALITY_TEXT = 0, 1, 2


class Task(enum.IntEnum):
  T2I = 0
  I2T = 1
  IT2IT = 2


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static (hashable) slot indices of one task's sequence."""
  task: Task
  length: int
  text_start: int
  image_start: int
  bot_index: int
  boi_index: int
  boc_index: int
  bog_index: int
  n_txt: int
  n_img: int

  @property
  def text_slice(self) -> slice:
    return slice(self.text_start, self.text_start + self.n_txt)

  @property
  def image_slice(self) -> slice:
    return slice(self.image_start, self.image_start + self.n_img)


def make_layout(task, n_txt: int, n_img: int) -> Layout:
  """Builds the layout of `task` (Task or int) for n_txt text and n_img image slots."""
  task = Task(int(task))
  if n_txt < 1 or n_img < 1:
    raise ValueError(f"make_layout: n_txt and n_img must be >= 1, got {n_txt}, {n_img}")
  length = 4 + n_txt + n_img
  if task == Task.T2I:
    return Layout(task=task, length=length, text_start=2, image_start=4 + n_txt, bot_index=1,
                  boi_index=3 + n_txt, boc_index=0, bog_index=2 + n_txt, n_txt=n_txt, n_img=n_img)
  return Layout(task=task, length=length, text_start=4 + n_img, image_start=2, bot_index=3 + n_img,
                boi_index=1, boc_index=0, bog_index=2 + n_img, n_txt=n_txt, n_img=n_img)


def layout_from_config(config, task) -> Layout:
  """Layout of `task` for the sizes in a full magvlt config."""
  return make_layout(task, int(config.sequence.text_length), int(config.sequence.image_tokens))


def image_slots(layout: Layout) -> np.ndarray:
  """Sequence indices of the image slots, in raster order."""
  return np.arange(layout.image_start, layout.image_start + layout.n_img, dtype=np.int32)


def text_slots(layout: Layout) -> np.ndarray:
  """Sequence indices of the text slots."""
  return np.arange(layout.text_start, layout.text_start + layout.n_txt, dtype=np.int32)


def selector_token(first, vertical=None):
  """MixSel selector for the BOG slot: LEFT/RIGHT (or TOP/BOTTOM where `vertical`).

  first: bool [B], True selects the first half (LEFT/TOP). vertical: bool [B] or None (T2I uses
  LEFT/RIGHT only, so pass None there). Returns int32 [B].
  """
  first = jnp.asarray(first, bool)
  tok = jnp.where(first, LEFT, RIGHT)
  if vertical is not None:
    tok = jnp.where(jnp.asarray(vertical, bool), jnp.where(first, TOP, BOTTOM), tok)
  return tok.astype(jnp.int32)


@flax.struct.dataclass
class ModelInput:
  """Per-slot description of one batch of sequences; all arrays [B, L]."""
  ids: jnp.ndarray  # int32: token-table row (image v; text image_vocab + w) or special id
  is_special: jnp.ndarray  # bool: special slot or masked image/text slot
  modality: jnp.ndarray  # int32: 0 special, 1 image, 2 text
  local_pos: jnp.ndarray  # int32: modality-local index; specials 0..3


def _segment(ids, is_special, modality, local_pos):
  return (jnp.asarray(ids, jnp.int32), jnp.asarray(is_special, bool),
          jnp.asarray(modality, jnp.int32), jnp.asarray(local_pos, jnp.int32))


def _special_seg(token, batch, pos):
  token = jnp.broadcast_to(jnp.asarray(token, jnp.int32).reshape(-1, 1), (batch, 1))
  one = jnp.ones((batch, 1), jnp.int32)
  return _segment(token, one.astype(bool), one * MODALITY_SPECIAL, one * pos)


def build_input(layout: Layout, image_codes, text_ids, image_masked=None, text_masked=None,
                bog_token=None, image_vocab_size=None) -> ModelInput:
  """Assembles the ModelInput of `layout`.

  image_codes: int [B, n_img]; text_ids: int [B, n_txt] (EOS padded); image_masked/text_masked:
  bool [B, n] (None: nothing masked); bog_token: int [B] or scalar for the BOG slot (None: BOG;
  MixSel: selector_token(...)); image_vocab_size: offset of the text rows in the token table.
  """
  if image_vocab_size is None:
    raise ValueError("build_input: image_vocab_size is required (config.sequence.image_vocab_size)")
  image_codes = jnp.asarray(image_codes)
  text_ids = jnp.asarray(text_ids)
  batch = image_codes.shape[0]
  if image_codes.shape != (batch, layout.n_img) or text_ids.shape != (batch, layout.n_txt):
    raise ValueError(f"build_input: expected image_codes [B, {layout.n_img}] and text_ids "
                     f"[B, {layout.n_txt}], got {image_codes.shape} and {text_ids.shape}")
  if image_masked is None:
    image_masked = jnp.zeros(image_codes.shape, bool)
  if text_masked is None:
    text_masked = jnp.zeros(text_ids.shape, bool)
  image_masked = jnp.asarray(image_masked, bool)
  text_masked = jnp.asarray(text_masked, bool)
  if bog_token is None:
    bog_token = BOG
  img = _segment(jnp.where(image_masked, MASK_IMG, image_codes), image_masked,
                 jnp.full(image_codes.shape, MODALITY_IMAGE),
                 jnp.broadcast_to(jnp.arange(layout.n_img), image_codes.shape))
  txt = _segment(jnp.where(text_masked, MASK_TXT, text_ids + image_vocab_size), text_masked,
                 jnp.full(text_ids.shape, MODALITY_TEXT),
                 jnp.broadcast_to(jnp.arange(layout.n_txt), text_ids.shape))
  boc = _special_seg(BOC, batch, 0)
  bog = _special_seg(bog_token, batch, 2)
  if layout.task == Task.T2I:
    parts = [boc, _special_seg(BOT, batch, 1), txt, bog, _special_seg(BOI, batch, 3), img]
  else:
    parts = [boc, _special_seg(BOI, batch, 1), img, bog, _special_seg(BOT, batch, 3), txt]
  fields = [jnp.concatenate([p[i] for p in parts], axis=1) for i in range(4)]
  return ModelInput(ids=fields[0], is_special=fields[1], modality=fields[2], local_pos=fields[3])


def text_valid(text_length, n_txt: int):
  """bool [B, n_txt]: text slot j is real (j < length; the length counts the EOS)."""
  text_length = jnp.asarray(text_length, jnp.int32)
  return jnp.arange(n_txt, dtype=jnp.int32)[None, :] < text_length[:, None]


def key_valid(layout: Layout, text_length):
  """bool [B, L]: slots that may be attended to (all but text padding)."""
  valid = text_valid(text_length, layout.n_txt)
  batch = valid.shape[0]
  before = jnp.ones((batch, layout.text_start), bool)
  after = jnp.ones((batch, layout.length - layout.text_start - layout.n_txt), bool)
  return jnp.concatenate([before, valid, after], axis=1)


def attention_mask(layout: Layout, text_length):
  """bool [B, 1, L, L], True = query row may attend to key column (SPEC section 2).

  Text columns at index >= length are hidden from every row. T2I: padding rows see nothing.
  I2T/IT2IT: the BOT row sees nothing after itself (length depends on the image only).
  Every row that would see nothing sees itself (official "at least one attention" rule).
  """
  keys = key_valid(layout, text_length)  # [B, L]
  length = layout.length
  mask = jnp.broadcast_to(keys[:, None, :], (keys.shape[0], length, length))
  if layout.task == Task.T2I:
    mask = mask & keys[:, :, None]
  else:
    col = jnp.arange(length)
    bot_row = (jnp.arange(length) == layout.bot_index)[:, None] & (col > layout.bot_index)[None, :]
    mask = mask & ~bot_row[None]
  eye = jnp.eye(length, dtype=bool)[None]
  mask = mask | (eye & ~mask.any(axis=-1, keepdims=True))
  return mask[:, None]


def causal_mask(length: int):
  """bool [1, 1, L, L] lower-triangular mask for the autoregressive baselines."""
  return jnp.tril(jnp.ones((length, length), bool))[None, None]


# L-Verse BiART segments: every slot is a conditional reference or part of the generation target.
SEGMENT_REF, SEGMENT_GEN = 0, 1
NUM_SEGMENTS = 2


def segment_ids(layout: Layout, batch: int):
  """int32 [B, L]: GEN on the generated modality (T2I: the image; I2T / IT2IT: the text) and on
  its start token (BOI / BOT, the slot that predicts its first token), REF everywhere else."""
  seg = np.full((layout.length,), SEGMENT_REF, np.int32)
  if layout.task == Task.T2I:
    seg[layout.boi_index] = SEGMENT_GEN
    seg[layout.image_slice] = SEGMENT_GEN
  else:
    seg[layout.bot_index] = SEGMENT_GEN
    seg[layout.text_slice] = SEGMENT_GEN
  return jnp.broadcast_to(jnp.asarray(seg), (batch, layout.length))
