"""The X-LXMERT pre-training loss (X-LXMERT paper sections 3-5 and appendix C.5; SPEC section 6).

Per step one modality to mask is drawn from [image, text, none] with
config.train.modality_weights (paper: uniform); the three are the branches of ONE lax.switch, so
the step compiles once (the paper draws per step too; MAGVLT's task draw works the same way).
  image  [BOC,BOT,text,BOG,BOI,image]: uniform masking, r ~ U(0,1) per example, then
         clamp(ceil(r n), 1, n) random cells masked (an exact uniform subset); Cluster-Centroid
         Classification: cross-entropy over the image vocabulary (the cluster ids of the
         grid_kmeans tokenizer; any tokenizer's codes) on the masked cells, targets = the codes.
  text   [BOC,BOI,image,BOG,BOT,text]: masked LM on the real text slots (padding never masked):
         train.text_masking "fixed" masks ceil(train.text_mask_ratio n) slots (LXMERT/BERT's 0.15
         as an exact count), "uniform" draws the ratio from U(0,1) like the image side (needed
         for image -> caption by masked decoding, MAGVLT's I2T). Plus the caption-length loss on
         MAGVLT's probe pass (objectives/magvlt.py), which the I2T decoder's length head needs.
  none   [BOC,BOT,text,BOG,BOI,image], nothing masked: image-text matching. Each caption is
         replaced with probability train.itm_mismatch_prob by another caption of the batch (a
         random permutation); label "matched" unless replaced by a different caption (a
         replacement equal to the original, common in small synthetic sets, stays matched).
         2-way cross-entropy on the model's 'itm' head at BOC (the [CLS]-like slot).
Total = CE (image or text) + train.length_loss_weight * length (text steps) + train.itm_weight
* ITM (none steps). Label smoothing: train.label_smoothing (paper: none).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax import masking
from magvlt_jax import sequence as seq
from magvlt_jax.objectives import common
from magvlt_jax.objectives.common import masked_loss, smoothed_ce
from magvlt_jax.objectives.magvlt import MagvltObjective

MODALITIES = ("image", "text", "none")
TEXT_MASKINGS = ("fixed", "uniform")
METRIC_KEYS = ("loss", "ccc_loss", "mlm_loss", "itm_loss", "length_loss", "image_correct",
               "image_count", "text_correct", "text_count", "itm_correct", "itm_count",
               "itm_matched", "length_correct", "length_count")


def draw_modality(key, weights) -> jnp.ndarray:
  """int32 scalar index into MODALITIES drawn proportionally to `weights`."""
  return common.draw_task(key, weights, MODALITIES)


def uniform_image_mask(key, batch: int, n: int):
  """(ratio [B], mask bool [B, n]): ratio ~ U(0,1), then clamp(ceil(ratio n), 1, n) random cells."""
  k_u, k_m = jax.random.split(key)
  ratio = jax.random.uniform(k_u, (batch,), jnp.float32)
  return ratio, masking.sample_mask(k_m, ratio, jnp.ones((batch, n), bool))


def mismatch(key, text, text_length, prob: float):
  """ITM pairs: (text', length', matched bool [B]); each caption is replaced with probability
  `prob` by the caption at a random permutation of the batch."""
  k_perm, k_rep = jax.random.split(key)
  b = text.shape[0]
  perm = jax.random.permutation(k_perm, b)
  replace = jax.random.bernoulli(k_rep, prob, (b,))
  other, other_len = text[perm], text_length[perm]
  same = jnp.all(other == text, axis=-1) & (other_len == text_length)
  new_text = jnp.where(replace[:, None], other, text)
  new_len = jnp.where(replace, other_len, text_length)
  return new_text, new_len, ~replace | same


class XlxmertObjective(MagvltObjective):
  """CCC + MLM + ITM. `model` must have the ITM head (config.model.itm_head=True). Reuses
  MAGVLT's input building, forward and length probe (MagvltObjective helpers)."""
  batch_keys = ("image", "text", "text_length")

  def __init__(self, config, model, encode_fn, eos_id: int, sep_id: int):  # pylint: disable=super-init-not-called
    common.Objective.__init__(self, config, model, encode_fn, eos_id, sep_id)
    if not model.itm_head:
      raise ValueError("the 'xlxmert' objective needs the ITM head: set config.model.itm_head=True")
    t = config.train
    self.image_vocab = int(config.sequence.image_vocab_size)
    self.n_txt, self.n_img = int(config.sequence.text_length), int(config.sequence.image_tokens)
    self.weights = tuple(float(w) for w in t.modality_weights)
    draw_modality(jax.random.key(0), self.weights)
    self.smoothing = float(t.label_smoothing)
    self.length_weight, self.itm_weight = float(t.length_loss_weight), float(t.itm_weight)
    self.text_masking, self.text_ratio = str(t.text_masking), float(t.text_mask_ratio)
    self.mismatch_prob = float(t.itm_mismatch_prob)
    self.aux_stride = 1
    self.layouts = {task: seq.make_layout(task, self.n_txt, self.n_img) for task in seq.Task}

  @classmethod
  def validate_config(cls, config):
    t = config.train
    for key in ("modality_weights", "text_masking", "text_mask_ratio", "itm_mismatch_prob",
                "itm_weight", "label_smoothing", "length_loss_weight"):
      if key not in t:
        raise ValueError(f"config.train.{key} is missing; add it (see configs/xlxmert.py)")
    w = tuple(t.modality_weights)
    if len(w) != 3 or any((not math.isfinite(v)) or v < 0 for v in w) or sum(w) <= 0:
      raise ValueError(f"config.train.modality_weights={w!r} must be 3 non-negative weights "
                       "(image, text, none) with a positive sum; e.g. (1, 1, 1)")
    if t.text_masking not in TEXT_MASKINGS:
      raise ValueError(f"config.train.text_masking={t.text_masking!r} is not a known value; use "
                       f"one of {list(TEXT_MASKINGS)}")
    for key in ("text_mask_ratio", "itm_mismatch_prob"):
      if not 0.0 < t[key] <= 1.0:
        raise ValueError(f"config.train.{key}={t[key]!r} must be in (0, 1]; e.g. 0.15 / 0.5")
    if not 0.0 <= t.label_smoothing < 1.0:
      raise ValueError(f"config.train.label_smoothing={t.label_smoothing!r} must be in [0, 1)")
    for key in ("itm_weight", "length_loss_weight"):
      if not t[key] >= 0:
        raise ValueError(f"config.train.{key}={t[key]!r} must be non-negative")
    if not config.model.get("itm_head", False):
      raise ValueError("config.model.itm_head=False: the 'xlxmert' objective needs the ITM head; "
                       "set config.model.itm_head=True (configs/xlxmert.py does)")

  # ---------------------------------------------------------------- metrics
  def metric_fields(self):
    avg = common.average
    fields = {
        "ccc_loss": avg("ccc_loss", "is_image"),
        "mlm_loss": avg("mlm_loss", "is_text"),
        "itm_loss": avg("itm_loss", "is_none"),
        "length_loss": avg("length_loss", "is_text"),
        "ccc_accuracy": avg("image_correct", "image_count"),
        "mlm_accuracy": avg("text_correct", "text_count"),
        "itm_accuracy": avg("itm_correct", "itm_count"),
        "itm_matched_frac": avg("itm_matched", "itm_count"),
        "length_accuracy": avg("length_correct", "length_count"),
    }
    for name in MODALITIES:
      fields[f"frac_{name}"] = avg(f"is_{name}")
    return fields

  def metric_inputs(self, aux):
    return dict(aux, **common.selectors(aux["modality"], enumerate(MODALITIES)))

  # ---------------------------------------------------------------- branches
  def _out(self, **values):
    zero = jnp.float32(0.0)
    out = {k: jnp.asarray(values.get(k, zero), jnp.float32) for k in METRIC_KEYS}
    out["loss"] = (out["ccc_loss"] + out["mlm_loss"] + self.length_weight * out["length_loss"]
                   + self.itm_weight * out["itm_loss"])
    return out

  def text_mask(self, key, valid):
    """bool [B, n_txt]: the MLM mask over the real text slots (train.text_masking)."""
    k_u, k_m = jax.random.split(key)
    if self.text_masking == "uniform":
      ratio = jax.random.uniform(k_u, valid.shape[:1], jnp.float32)
    else:
      ratio = jnp.full(valid.shape[:1], self.text_ratio, jnp.float32)
    return masking.sample_mask(k_m, ratio, valid)

  def _image(self, params, codes, text, tlen, key):
    lay = self.layouts[seq.Task.T2I]
    k_m, k_d = jax.random.split(key)
    _, mask = uniform_image_mask(k_m, codes.shape[0], self.n_img)
    inputs = self._input(lay, codes, text, img_mask=mask)
    out = self._forward(params, inputs, seq.attention_mask(lay, tlen), lay, ("image",), k_d)
    ccc = masked_loss(out["image"], codes, mask, self.smoothing)
    return self._out(ccc_loss=ccc["loss"], image_correct=ccc["correct"], image_count=ccc["count"])

  def _text(self, params, codes, text, tlen, key):
    lay = self.layouts[seq.Task.I2T]
    k_m, k_d, k_len = jax.random.split(key, 3)
    mask = self.text_mask(k_m, seq.text_valid(tlen, self.n_txt))
    inputs = self._input(lay, codes, text, txt_mask=mask)
    out = self._forward(params, inputs, seq.attention_mask(lay, tlen), lay, ("text",), k_d)
    mlm = masked_loss(out["text"], text, mask, self.smoothing)
    length = self._length_probe(params, codes, text, tlen, k_len)
    return self._out(mlm_loss=mlm["loss"], text_correct=mlm["correct"], text_count=mlm["count"],
                     length_loss=length[0], length_correct=length[1], length_count=length[2])

  def _none(self, params, codes, text, tlen, key):
    lay = self.layouts[seq.Task.T2I]
    k_pair, k_d = jax.random.split(key)
    text, tlen, matched = mismatch(k_pair, text, tlen, self.mismatch_prob)
    inputs = self._input(lay, codes, text)
    out = self._forward(params, inputs, seq.attention_mask(lay, tlen), lay, ("itm",), k_d)
    label = matched.astype(jnp.int32)
    itm = smoothed_ce(out["itm"], label, 0.0)
    correct = (jnp.argmax(out["itm"], axis=-1) == label).sum()
    return self._out(itm_loss=itm.mean(), itm_correct=correct, itm_count=float(label.shape[0]),
                     itm_matched=label.sum())

  # ---------------------------------------------------------------- entry point
  def loss_fn(self, params, tok_params, batch, rng, modality=None):  # pylint: disable=arguments-differ
    """(loss, metrics incl. 'modality'); modality None draws it (one lax.switch), a Python int
    (index into MODALITIES) traces only that branch."""
    self.trace_count += 1
    k_mod, k_rest = jax.random.split(rng)
    codes = self.image_codes(tok_params, batch)
    text = jnp.asarray(batch["text"], jnp.int32)
    tlen = jnp.asarray(batch["text_length"], jnp.int32)
    branches = [lambda p, k, f=f: f(p, codes, text, tlen, k) for f in (self._image, self._text, self._none)]
    if isinstance(modality, (int, np.integer)):
      metrics = branches[int(modality)](params, k_rest)
    else:
      if modality is None:
        modality = draw_modality(k_mod, self.weights)
      metrics = jax.lax.switch(jnp.asarray(modality, jnp.int32), branches, params, k_rest)
    metrics["modality"] = jnp.asarray(modality, jnp.float32)
    return metrics["loss"], metrics
