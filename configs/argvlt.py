"""ARGVLT configs: MAGVLT's autoregressive twin (MAGVLT paper; SPEC section 6).

The same transformer sizes, image tokenizer, text, data, mesh and evaluation as configs/magvlt.py
(built from it), with causal attention, the "ar" objective (next-token NLL, weight 0.9 on the
generated modality and 0.1 on the condition, label smoothing 0.1; objectives/ar.py) and the "ar"
KV-cache decoder (decoders.py). Layouts: sequence.py (T2I [BOC,BOT,text,BOG,BOI,image], I2T
[BOC,BOI,image,BOG,BOT,text]), read one slot early (slot i predicts slot i + 1).

Variants: tiny | base | large (configs/magvlt.py's sizes).
  python -m magvlt_jax.main --config=configs/argvlt.py:tiny --workdir=/tmp/ar
"""
import ml_collections

from magvlt_jax import configs_util


def _magvlt_config(variant):
  return configs_util.load_sibling(__file__, "magvlt.py", variant)


def get_config(variant: str = "tiny"):
  try:
    c = _magvlt_config(variant)
  except ValueError as e:
    raise ValueError(f"configs/argvlt.py: {e}") from None
  c.objective = "ar"
  c.model.causal = True
  t = c.train
  t.task_weights = (1.0, 1.0)  # T2I : I2T, one task per batch; (1, 0) or (0, 1) for one direction
  t.alternate_tasks = False  # True: T2I on even steps, I2T on odd ones (BiART, configs/lverse.py)
  t.generated_loss_weight = 0.9  # paper appendix: 0.9 on the generated modality ...
  t.condition_loss_weight = 0.1  # ... and 0.1 on the condition
  t.label_smoothing = 0.1
  # MAGVLT-only losses off (the AR objective does not read them; kept False to say so).
  t.use_unroll = t.use_mixsel = False
  t.aux_batch_stride = 1

  # The "ar" decoder's own settings (the masked decoder's keys stay for the shared validation).
  c.decoding.kind = "ar"  # decoders.py: KV-cache autoregressive decoding
  c.decoding.ar = ml_collections.ConfigDict()
  # Tiny: sharper image sampling. Raster sampling from the full softmax drifts off the prompt; at
  # 0.5 / top-16 the tiny ARGVLT's T2I images are right in colour, shape and place for 0.77 of 128
  # prompts instead of 0.14 (BiART 0.52 vs 0.27; benchmarks/RESULTS.md, "ARGVLT and BiART against
  # MAGVLT"). base / large: the full softmax (the paper states no setting).
  c.decoding.ar.image_temperature = 0.5 if variant == "tiny" else 1.0
  c.decoding.ar.image_top_k = 16 if variant == "tiny" else 0  # 0: the full codebook
  # Tiny: greedy captions (0 = argmax): I2T triple F1 0.80 vs 0.69 at 0.5 on two-object scenes,
  # 0.94 vs 0.93 on one-object ones (benchmarks/RESULTS.md, "Two objects: ARGVLT binds").
  c.decoding.ar.text_temperature = 0.0 if variant == "tiny" else 0.5
  c.decoding.ar.text_top_k = 8 if variant == "tiny" else 32
  return c
