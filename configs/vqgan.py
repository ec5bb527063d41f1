"""VQ-GAN image tokenizer configs.

Variants:
  f16_16384: the taming-transformers `vqgan_imagenet_f16_16384` layout MAGVLT uses
             (256x256 -> 16x16 codes, 16384 x 256 codebook).
  tiny:      CPU-sized: 64x64 images -> 8x8 codes, 256-entry codebook.

Usage: --config=configs/vqgan.py:tiny (or nested inside configs/magvlt.py as `config.vqgan`).
"""
import ml_collections


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  # Path to tokenizer params: a directory written by our tokenizer trainer, or a converted
  # taming checkpoint (see magvlt_jax/convert/taming_vqgan.py). Empty: train one (tiny only).
  c.checkpoint = ""
  c.dtype = "float32"  # compute dtype; bfloat16 on accelerators
  c.param_dtype = "float32"

  if variant == "f16_16384":
    c.image_size = 256
    c.base_channels = 128
    c.channel_mult = (1, 1, 2, 2, 4)  # downsampling factor 2**(len-1) = 16
    c.num_res_blocks = 2
    c.attn_resolutions = (16,)
    c.z_channels = 256
    c.embed_dim = 256  # codebook vector size
    c.codebook_size = 16384
    c.norm_groups = 32
  elif variant == "tiny":
    c.image_size = 64
    c.base_channels = 16  # sized for ~4 min of 2-core CPU training (see README, tokenizer)
    c.channel_mult = (1, 1, 2, 2)  # factor 8: 64x64 -> 8x8 codes
    c.num_res_blocks = 1
    c.attn_resolutions = ()
    c.z_channels = 64
    # Low-dimensional lookup (ViT-VQGAN's factorised codes): 16-dim codes use ~3x the codes of
    # 64-dim ones and keep 94% of shapes instead of 70%; the tiny transformer draws and names shapes
    # better with them (benchmarks/RESULTS.md, "Codebook vector size").
    c.embed_dim = 16
    c.codebook_size = 256
    c.norm_groups = 8
  else:
    raise ValueError(f"configs/vqgan.py: unknown variant {variant!r}; expected 'f16_16384' or 'tiny'")

  c.dropout_rate = 0.0
  # taming: GroupNorm and a global self-attention in the encoder/decoder middle. For tiny, both off
  # ("layer": per-position LayerNorm; no mid attention): with image-wide statistics every code of a
  # synthetic scene shifts with the object's colour and place (an object changed 29 of 64 codes on
  # average), so the transformer has to model the whole background; local codes change only near
  # the object (benchmarks/RESULTS.md, tokenizer section).
  c.norm_type = "group" if variant != "tiny" else "layer"  # group | layer
  c.mid_attention = variant != "tiny"

  c.quantizer = ml_collections.ConfigDict()
  c.quantizer.beta = 0.25  # commitment weight
  c.quantizer.use_ema = False  # L-Verse AugVAE style EMA codebook updates
  c.quantizer.ema_decay = 0.99
  # Off for tiny: on the synthetic scenes, restarting every unused code spreads the flat background
  # over all 256 codes (code entropy 7.7 bits instead of 4.7), noise the transformer then has to
  # predict; measured in benchmarks/RESULTS.md (tokenizer section).
  c.quantizer.dead_code_restart = False
  c.quantizer.dead_code_threshold = 1.0  # EMA usage count below which a code is restarted
  # Cosine-similarity lookup (ViT-VQGAN; unit-norm codes and latents): prevents the codebook collapse
  # a short CPU run otherwise shows. False = taming (and required for converted taming checkpoints).
  c.quantizer.l2_normalize = variant == "tiny"
  c.quantizer.usage_decay = 0.9  # EMA decay of the per-step usage counts that dead-code restart reads

  c.discriminator = ml_collections.ConfigDict()
  c.discriminator.base_channels = 64 if variant != "tiny" else 32
  c.discriminator.num_layers = 3 if variant != "tiny" else 2

  c.loss = ml_collections.ConfigDict()
  # l2 for tiny: with l1 (median-seeking) the small coloured objects of the synthetic scenes come
  # back as grey blobs after a CPU-sized run; l2 keeps their colour (benchmarks/RESULTS.md).
  c.loss.reconstruction = "l1" if variant != "tiny" else "l2"
  c.loss.reconstruction_weight = 1.0
  c.loss.perceptual_weight = 1.0
  c.loss.vgg_weights = ""  # user-supplied VGG16/LPIPS weights; perceptual loss is off when empty
  c.loss.codebook_weight = 1.0
  c.loss.disc_weight = 0.8
  c.loss.disc_start = 250001 if variant != "tiny" else 10**9  # tiny default: no GAN
  c.loss.adaptive_weight_max = 1e4

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 4.5e-6 * 8 if variant != "tiny" else 2e-3
  c.optimizer.b1 = 0.5
  c.optimizer.b2 = 0.9
  c.optimizer.warmup_steps = 0 if variant != "tiny" else 100
  c.optimizer.schedule = "constant" if variant != "tiny" else "cosine"  # constant | cosine (to 10%)

  c.train = ml_collections.ConfigDict()
  # tiny: 1200 steps of 8 beat 600 of 16 at the same compute (shapes kept 79% vs 50%).
  c.train.num_steps = 300000 if variant != "tiny" else 1200
  c.train.batch_size = 64 if variant != "tiny" else 8
  c.train.log_every = 100 if variant != "tiny" else 50
  c.train.image_every = 5000 if variant != "tiny" else 400
  c.train.checkpoint_every = 5000 if variant != "tiny" else 400
  c.train.keep_checkpoints = 3
  return c
