"""X-LXMERT configs (X-LXMERT paper; SPEC section 6), built from configs/magvlt.py.

The registry entries: objective "xlxmert" (CCC + MLM + ITM, one masked modality per step drawn
from [image, text, none]; objectives/xlxmert.py), the masked decoder with order "mask_predict"
and 4 steps (Mask-Predict-4; "random" / "raster" with decoding.t2i_steps=64 are the paper's
one-cell-per-step orders), the transformer with grid-box image embeddings and the ITM head, and
config.model.arch "single_stream" (X-UNITER) or "two_stream" (LXMERT: language / object-relation /
cross-modality layers; models/two_stream.py). The image side is an 8x8 grid (64 tokens).

Image tokenizer: "grid_kmeans" (config.grid_kmeans, configs/grid_kmeans.py): the k-means cluster
ids of an 8x8 grid of EfficientNet-Lite0 features (tiny: 256 clusters at 64 px; base: the paper's
10,000 at 256 px), painted back by the SPADE generator; --mode=train fits both first when
WORKDIR/tokenizer has none. Any other 8x8 tokenizer plugs in the same way, e.g. the tiny VQ-GAN:
--config.image_tokenizer=vqgan --config.sequence.image_vocab_size=256.

Variants:
  tiny          CPU-sized single stream (magvlt tiny's 4 x 128 x 4).
  tiny_lxmert   CPU-sized two stream: 2 language, 2 relation, 2 cross layers, 128 wide.
  base          LXMERT: 9 language, 5 relation, 5 cross layers, 768 wide, 12 heads, MLP 3072.
  base_uniter   X-UNITER: 12 single-stream layers, 768 wide, 12 heads.
Text: MAGVLT's tokenizer and text slots (LXMERT used BERT's WordPiece; not offline here).

  python -m magvlt_jax.main --config=configs/xlxmert.py:tiny --workdir=/tmp/xlx
"""
import ml_collections

from magvlt_jax import configs_util

_VARIANTS = {  # variant -> (magvlt base variant, arch, layers or (lang, rel, cross), width, heads)
    "tiny": ("tiny", "single_stream", 4, 128, 4),
    "tiny_lxmert": ("tiny", "two_stream", (2, 2, 2), 128, 4),
    "base": ("base", "two_stream", (9, 5, 5), 768, 12),
    "base_uniter": ("base", "single_stream", 12, 768, 12),
}


def _magvlt_config(variant):
  return configs_util.load_sibling(__file__, "magvlt.py", variant)


def get_config(variant: str = "tiny"):
  if variant not in _VARIANTS:
    raise ValueError(f"configs/xlxmert.py: unknown variant {variant!r}; expected one of "
                     f"{sorted(_VARIANTS)}")
  base_variant, arch, depth, width, heads = _VARIANTS[variant]
  tiny = base_variant == "tiny"
  c = _magvlt_config(base_variant)
  c.variant = variant
  c.objective = "xlxmert"

  # --- image side: the 8x8 grid of k-means cluster ids (data.image_size already equals
  # grid_kmeans.image_size in both sizes: 64 / 256).
  c.image_tokenizer = "grid_kmeans"
  c.sequence.image_tokens = c.grid_kmeans.grid * c.grid_kmeans.grid
  del c.sequence.image_vocab_size  # drop magvlt's link to vqgan.codebook_size, then follow k
  c.sequence.image_vocab_size = c.grid_kmeans.get_ref("num_clusters")

  # --- transformer
  m = c.model
  m.arch = arch
  m.embed_dim, m.num_heads = width, heads
  m.box_embedding = True  # LXMERT object embedder on the grid cells' boxes
  m.itm_head = True
  if arch == "two_stream":
    m.two_stream = ml_collections.ConfigDict()
    m.two_stream.language_layers, m.two_stream.relation_layers, m.two_stream.cross_layers = depth
    m.num_layers = sum(depth)  # informational; the two-stream encoder reads model.two_stream
    m.scan_layers = False  # the two-stream encoder is unrolled
  else:
    m.num_layers = depth
  if not tiny:
    m.dropout_rate = m.attention_dropout_rate = 0.1  # BERT / LXMERT
    m.init_std = 0.02

  # --- objective (objectives/xlxmert.py)
  t = c.train
  t.modality_weights = (1.0, 1.0, 1.0)  # image : text : none, the paper's uniform draw
  # Paper/LXMERT: BERT's 0.15 on the text side. Tiny: uniform ratios, so the model also learns
  # to write whole captions from a fully masked text (image -> caption by masked decoding).
  t.text_masking = "uniform" if tiny else "fixed"
  t.text_mask_ratio = 0.15
  t.itm_mismatch_prob = 0.5  # paper: replace the caption with a random one with p = 0.5
  t.itm_weight = 1.0
  t.label_smoothing = 0.0
  t.length_loss_weight = 0.01
  # MAGVLT-only settings (the xlxmert objective does not read them).
  t.use_unroll = t.use_mixsel = False
  t.aux_batch_stride = 1
  if not tiny:  # paper: AdamW (0.9, 0.999), lr 1e-5, 5% linear warmup, grad clip 1
    o = c.optimizer
    o.peak_lr, o.b1, o.b2, o.grad_clip_norm, o.weight_decay = 1e-5, 0.9, 0.999, 1.0, 0.01
    o.warmup_steps = t.num_steps // 20

  # --- decoding: Mask-Predict-4 for text -> grid; MAGVLT's I2T for image -> caption
  d = c.decoding
  d.kind = "masked"
  d.order = "mask_predict"
  d.t2i_steps = 4
  d.image_temperature = (1.0, 0.6)  # ours; the paper samples from the predicted distribution
  d.guidance_scale = 0.0
  return c
