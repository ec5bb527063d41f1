"""L-Verse AugVAE image tokenizer configs (magvlt_jax/models/augvae.py).

Variants:
  ml:   AugVAE-ML at paper size: 256 px, latents 64/32/16/8, 256 channels, one 8192-code codebook.
  sl:   AugVAE-SL at paper size: the 32x32 level only (1024 tokens), fine-tuned from ml.
  tiny: CPU-sized SL tokenizer: 64 px -> 8x8 codes (the MAGVLT tiny grid), 256 codes; trained as
        ML (latents 16/8/4/2) for train.ml_steps, then fine-tuned as SL for train.sl_steps. Its
        recipe (16-wide, 16-dim cosine-lookup codes, restart at 0.1, cosine lr, 10% of the budget on
        ML) was measured at the tiny VQ-GAN's training FLOPs: benchmarks/RESULTS.md, "AugVAE vs
        VQ-GAN at tiny size, equal training FLOPs".

Usage: nested as config.augvae with config.image_tokenizer = "augvae" (see configs/magvlt.py), or
--config=configs/augvae.py:tiny for the model alone.
"""
import ml_collections


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in ("ml", "sl", "tiny"):
    raise ValueError(f"configs/augvae.py: unknown variant {variant!r}; expected 'ml', 'sl' or 'tiny'")
  paper = variant != "tiny"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.checkpoint = ""  # SL params (.npz or a tokenizer dir); empty: train one into WORKDIR/tokenizer
  c.stage = "ml" if variant == "ml" else "sl"  # the architecture this config builds / encodes with
  c.dtype = "float32"  # the paper runs AugVAE in fp32 (the VQ underflows in fp16)
  c.param_dtype = "float32"
  c.image_size = 256 if paper else 64
  # tiny: 16-dim codes (configs/vqgan.py:tiny's embed_dim) and 16 wide: a step costs 2.8 GFLOP
  # instead of 10.6 at 32/32, so the tiny VQ-GAN's budget buys ~2650 steps instead of ~690, and SL
  # needs them (alone, 16 wide: 24 dB on its training batches after 1350 steps, 28.5 after 2658).
  c.latent_channels = 256 if paper else 16  # = codebook vector size
  c.hidden_channels = 256 if paper else 16  # width inside E / G (our choice; see the model docstring)
  c.num_res_blocks = 2 if paper else 1
  c.norm_groups = 32 if paper else 8
  c.norm_type = "group" if paper else "layer"  # tiny: local codes, as configs/vqgan.py:tiny
  c.codebook_size = 8192 if paper else 256

  c.quantizer = ml_collections.ConfigDict()
  c.quantizer.beta = 0.25  # commitment weight
  c.quantizer.use_ema = True  # the paper's EMA codebook; False: a codebook loss trains it (VQ-GAN's)
  c.quantizer.ema_decay = 0.99
  # Cosine lookup (configs/vqgan.py's option: unit latents and codes, still the EMA codebook); on for
  # tiny as for the tiny VQ-GAN (not ablated for AugVAE). The paper's lookup is Euclidean.
  c.quantizer.l2_normalize = not paper
  # Restart codes unused for a while with this batch's latents (models/vqgan.restart_dead_codes).
  # On for tiny: AugVAE-ML reconstructs from its 16x16 level 0 and leaves levels 1-3 on a handful
  # of codes within 50 steps; SL, which keeps only level 1, then stays at 8 codes and draws no
  # object (0% read back, 17.5 dB). The price: background codes spread over the whole codebook
  # (6.9-7.1 bits of code entropy instead of 4.2; see configs/vqgan.py on why that is noise for the
  # transformer). Threshold 0.1 (a code unused for ~30 steps) instead of 1.0: 23.7 vs 22.1 dB with
  # half the budget on ML (RESULTS.md).
  c.quantizer.dead_code_restart = not paper
  c.quantizer.dead_code_threshold = 1.0 if paper else 0.1  # EMA usage below which a code restarts
  c.quantizer.usage_decay = 0.9

  c.loss = ml_collections.ConfigDict()
  c.loss.reconstruction = "l1" if paper else "l2"
  c.loss.reconstruction_weight = 1.0
  c.loss.perceptual_weight = 1.0
  c.loss.vgg_weights = ""  # LPIPS weights (as config.vqgan.loss.vgg_weights); off when empty

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 2e-4 if paper else 2e-3
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.warmup_steps = 0 if paper else 100  # per stage: ML and SL each start the schedule anew
  c.optimizer.schedule = "constant" if paper else "cosine"  # constant | cosine (to 10%), as configs/vqgan.py

  c.train = ml_collections.ConfigDict()
  # tiny: the tiny VQ-GAN's 1200 x 8 steps in FLOPs (benchmarks/bench_tokenizer_flops.py), 10% on
  # ML. What ML teaches level 1 is not worth its compute at this size: SL at 28.9 dB / 83% of
  # scenes read back with ml_steps=0, 28.1 / 77% with 10% on ML, 23.7 / 16% with half (RESULTS.md).
  c.train.ml_steps = 300000 if paper else 257  # AugVAE-ML training
  c.train.sl_steps = 100000 if paper else 2392  # AugVAE-SL fine-tuning from the ML params
  c.train.batch_size = 64 if paper else 8
  c.train.log_every = 100 if paper else 50
  c.train.checkpoint_every = 5000 if paper else 400  # orbax, per stage (train/augvae_trainer.py)
  c.train.keep_checkpoints = 3
  return c
