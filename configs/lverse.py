"""L-Verse BiART configs (SPEC section 6): one GPT-style causal transformer generating both
directions, told by a learned [REF]/[GEN] segment embedding (sequence.segment_ids) which slots
are the conditional reference and which the generation target.

Built from configs/argvlt.py (same sizes, layouts, causal model, KV-cache "ar" decoder) with:
  objective "biart" (objectives/ar.py): two NLL terms, condition ([REF]) and target ([GEN]),
  equal weights and no label smoothing (the paper states neither); text->image and image->text
  alternated per step as the paper (train.alternate_tasks; False draws them with task_weights);
  model.num_segments = 2; 64 text tokens for base/large (the paper's BPE length; tiny keeps 24);
  64 candidates per prompt, reranked (CLIP when decoding.clip_weights is given).
The paper's tokenizer is AugVAE-SL (1024 codes of 8192): --config.image_tokenizer=augvae with
matching sequence.image_tokens / image_vocab_size; by default this uses the VQ-GAN of
configs/magvlt.py (the tiny AugVAE recipe does not reconstruct better yet; benchmarks/RESULTS.md).

Variants: tiny | base | large.
  python -m magvlt_jax.main --config=configs/lverse.py:tiny --workdir=/tmp/lverse
"""
from magvlt_jax import configs_util


def _argvlt_config(variant):
  return configs_util.load_sibling(__file__, "argvlt.py", variant)


def get_config(variant: str = "tiny"):
  try:
    c = _argvlt_config(variant)
  except ValueError as e:
    raise ValueError(str(e).replace("configs/argvlt.py", "configs/lverse.py")) from None
  tiny = variant == "tiny"
  c.objective = "biart"
  c.model.num_segments = 2  # [REF], [GEN]
  if not tiny:
    c.model.length_classes = 64  # sequence.text_length follows (a FieldReference)
  t = c.train
  t.task_weights = (1.0, 1.0)  # text->image : image->text (used when alternate_tasks=False)
  t.alternate_tasks = True  # the paper alternates the directions per iteration: even T2I, odd I2T
  t.generated_loss_weight = 1.0  # [GEN] NLL
  t.condition_loss_weight = 1.0  # [REF] NLL
  t.label_smoothing = 0.0

  d = c.decoding
  d.num_image_candidates = 4 if tiny else 64  # the paper reranks 64 samples per prompt
  d.num_text_candidates = 4 if tiny else 64
  d.ar.image_top_k = 0 if tiny else 256  # ours: the paper's text gives no value
  d.ar.text_top_k = 8 if tiny else 32
  return c
