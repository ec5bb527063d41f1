"""MAGVLT configs: the whole system (transformer, image tokenizer, text, data, training,
decoding, mesh, evaluation) in one ConfigDict.

Variants:
  tiny:  CPU-sized, trains end to end on the built-in synthetic dataset in minutes.
  base:  24 layers x 1024 wide x 8 heads (371,533,056 params with the 49408 text vocab).
  large: 36 layers x 1280 wide x 10 heads.
  official_base / official_large: base / large exactly as the released kakaobrain/magvlt
    checkpoints (magvlt-it2it-{base,large}.ckpt) and their sampling yaml: the taming f16_16384
    VQGAN, CLIP's 49408-entry text vocabulary, 64 text slots / length classes, dropout 0.1, and
    the `sampling:` block (10 T2I steps, temperature 1.4 -> 0.6, gumbel 2.0 -> 0.2, 12 I2T steps,
    top-k 32, text temperature 0.1, 32 image / 64 text candidates). Load one with
    `python -m magvlt_jax.convert.magvlt_official`.

Usage:
  python -m magvlt_jax.main --config=configs/magvlt.py:tiny --workdir=/tmp/run
  ... --config.train.num_steps=100 --config.data.name=coco_captions_folder --config.data.path=DIR
"""
import ml_collections

from magvlt_jax import configs_util


def _tokenizer_config(name, variant):
  return configs_util.load_sibling(__file__, f"{name}.py", variant)


_SIZES = {  # num_layers, embed_dim, num_heads
    "tiny": (4, 128, 4),
    "base": (24, 1024, 8),
    "large": (36, 1280, 10),
}


_OFFICIAL = {"official_base": "base", "official_large": "large"}


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  if variant in _OFFICIAL:
    return _official(variant)
  if variant not in _SIZES:
    raise ValueError(f"configs/magvlt.py: unknown variant {variant!r}; expected one of "
                     f"{sorted(_SIZES) + sorted(_OFFICIAL)}")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.variant = variant
  c.seed = 0
  # The registry entries this system is made of (DESIGN.md, "Several systems, one codebase").
  c.objective = "magvlt"  # magvlt_jax/objectives/
  c.image_tokenizer = "vqgan"  # magvlt_jax/image_tokenizers/; its settings: config.vqgan

  # --- image tokenizer (VQ-GAN); its codebook and grid fix the image side of the sequence.
  c.vqgan = _tokenizer_config("vqgan", "tiny" if tiny else "f16_16384")
  # L-Verse AugVAE-SL, used with --config.image_tokenizer=augvae (then set sequence.image_tokens,
  # image_vocab_size and data.image_size to its grid; tiny: 8x8 x 256 codes, as the VQ-GAN's).
  c.augvae = _tokenizer_config("augvae", "tiny" if tiny else "sl")
  # X-LXMERT's grid features + k-means ids + SPADE generator, used with
  # --config.image_tokenizer=grid_kmeans (tiny: 8x8 x 256 clusters, as the VQ-GAN's grid and codes).
  c.grid_kmeans = _tokenizer_config("grid_kmeans", "tiny" if tiny else "base")

  # --- transformer
  layers, width, heads = _SIZES[variant]
  c.model = ml_collections.ConfigDict()
  c.model.num_layers = layers
  c.model.embed_dim = width
  c.model.num_heads = heads
  c.model.mlp_ratio = 4
  # Off for tiny: a CPU run sees each synthetic scene a few times, too few to overfit, and attention
  # dropout forces the explicit-softmax path (the tiny step is 23% faster without dropout).
  c.model.dropout_rate = 0.1 if not tiny else 0.0  # residual (attention output and MLP output)
  c.model.attention_dropout_rate = 0.1 if not tiny else 0.0
  c.model.embedding_dropout_rate = 0.0
  c.model.layer_norm_eps = 1e-5
  # N(0, init_std) for every weight and embedding table. The official 0.02 is 0.64 / sqrt(width) at
  # base's 1024; tiny (128 wide) keeps that scale (0.06): at 0.02 its I2T sat on a plateau where
  # colour words were never read from the image (benchmarks/RESULTS.md, "Why the quick start's
  # captions get colour and shape wrong").
  c.model.init_std = 0.02 if not tiny else 0.06
  c.model.dtype = "float32"  # compute dtype: "bfloat16" on accelerators
  c.model.param_dtype = "float32"
  c.model.causal = False  # True for the autoregressive baselines
  c.model.remat = False  # rematerialise each block (saves activation memory at scale)
  # One nn.scan over the blocks (params stacked on a "layers" axis): the compiled program holds one
  # block body instead of num_layers copies, so compile time stops growing with depth (the base
  # train step, 7 transformer passes, does not finish compiling for a v5p pod unrolled).
  # transformer.stack_layers / unstack_layers convert params between the two layouts.
  c.model.scan_layers = not tiny
  c.model.attention_impl = "xla"  # jax.nn.dot_product_attention implementation: xla | cudnn
  c.model.length_classes = ml_collections.FieldReference(64 if not tiny else 24)

  # --- sequence: [BOC, BOT, text, BOG, BOI, image] (T2I) or [BOC, BOI, image, BOG, BOT, text]
  c.sequence = ml_collections.ConfigDict()
  c.sequence.text_length = c.model.get_ref("length_classes")
  grid = c.vqgan.image_size // 2 ** (len(c.vqgan.channel_mult) - 1)
  c.sequence.image_tokens = grid * grid
  c.sequence.image_vocab_size = c.vqgan.get_ref("codebook_size")
  c.sequence.text_vocab_size = 49408 if not tiny else 128

  # --- text tokenizer (sentencepiece BPE trained on the training captions, or loaded)
  c.text = ml_collections.ConfigDict()
  c.text.kind = "sentencepiece"  # sentencepiece | clip_bpe (the official tokenizer, text_clip.py)
  c.text.clip_vocab = ""  # clip_bpe: clip-vocab.json or bpe_simple_vocab_16e6.txt.gz; empty: WORKDIR/text/
  c.text.clip_merges = ""  # clip_bpe: clip-merges.txt (with clip-vocab.json)
  c.text.spm_model = ""  # path to a .model file; empty: train one into WORKDIR/text/
  c.text.vocab_size = c.sequence.get_ref("text_vocab_size")
  # Training split only. Off for tiny: its 128-piece vocabulary is word-level, and dropout 0.1 splits
  # 85% of the synthetic captions into sub-word or character pieces (mean 8.5 -> 11.6 tokens, some
  # past text_length), a spelling task that left the tiny model's text accuracy at 0.21 after 1000
  # steps (0.51 without; benchmarks/RESULTS.md).
  c.text.bpe_dropout = 0.1 if not tiny else 0.0
  c.text.lowercase = True
  c.text.max_training_sentences = 2_000_000

  # --- data
  c.data = ml_collections.ConfigDict()
  c.data.name = "synthetic"  # synthetic | coco_captions_folder | image_text_list
  c.data.path = ""  # source folder (COCO layout) or JSONL/CSV file for the non-synthetic builders
  c.data.data_dir = ""  # where prepared TFDS datasets live; empty: WORKDIR/data
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = c.vqgan.get_ref("image_size")
  c.data.global_batch_size = 16 if tiny else 4096
  c.data.eval_batch_size = 32 if tiny else 256
  c.data.num_workers = 0
  c.data.shuffle_seed = 0
  # bad data (magvlt_jax/data/validate.py): converted where possible, else skipped and counted
  c.data.max_image_pixels = 100_000_000  # larger images are skipped (decompression bombs)
  c.data.max_image_side = 4096  # longer sides are downscaled when the dataset is prepared
  c.data.min_image_side = 16  # smaller images are kept (upscaled by the pipeline) and counted
  c.data.max_caption_chars = 1000  # longer captions are cut at a word boundary
  c.data.synthetic = ml_collections.ConfigDict()
  c.data.synthetic.num_train = 2000
  c.data.synthetic.num_eval = 200
  c.data.synthetic.image_size = c.data.get_ref("image_size")
  c.data.synthetic.captions_per_image = 3
  # 2: about half the scenes get a second object of another colour ("... and a ..."); the sample
  # scores then also measure binding (synthetic.binding_scores).
  c.data.synthetic.max_objects = 1
  c.data.synthetic.seed = 0

  # --- training objective and loop
  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 2400 if tiny else 40_000  # tiny: what fits the 15-minute CPU quick start
  # T2I : I2T : IT2IT. The paper's 8:1:1 for base/large. Tiny: at 8:1:1 its ~250 I2T batches teach
  # the caption grammar but not yet what the image shows. In 2400 steps (16-dim tokenizer codes),
  # 4:2:1 is the mix where most images and most captions match: colour, shape and place all right
  # for T2I 0.67 / I2T 0.56 of 128 eval prompts (4:1:1: 0.71 / 0.46; 2:1:1: 0.57 / 0.55;
  # benchmarks/RESULTS.md).
  c.train.task_weights = (8.0, 1.0, 1.0) if not tiny else (4.0, 2.0, 1.0)
  c.train.image_mask_schedule = "cosine"  # cosine | linear | uniform
  c.train.text_mask_schedule = "linear"
  c.train.label_smoothing = 0.1
  c.train.length_loss_weight = 0.01
  # Both on for base/large (the paper). Off for tiny: in a CPU-sized run they slow learning more
  # than they help (1000 steps with both: T2I colour right for 0.12 of prompts; without: 0.62 and
  # 1.7x the steps/s; benchmarks/RESULTS.md).
  c.train.use_unroll = not tiny
  c.train.use_mixsel = not tiny
  c.train.mixsel_weight = 0.5
  # UnrollMask, MixSel and length-probe passes use every k-th example of the batch (1: all; CPU
  # tiny: fewer FLOPs per step, more steps in the time budget).
  c.train.aux_batch_stride = 4 if tiny else 1
  # Encode the training images once instead of in every step where that is exact (images already
  # image_size square: the built-in synthetic data; data/code_cache.py). Tiny: the encoder is 13% of the step's FLOPs.
  c.train.cache_image_codes = "auto" if tiny else "off"
  # Pre-tokenized data (data/pretokenized.py): "" off; "auto" the table `tools/prepare_data
  # --tokenize` writes beside the prepared dataset; or a .npy path. K fixed augmented crops per
  # image replace the per-epoch crop (less augmentation), and the step skips the encoder. Takes
  # precedence over cache_image_codes. Off in every variant.
  c.train.pretokenized = ""
  c.train.pretokenized_crops = 8  # K crops per image: what prepare --tokenize writes and training expects
  c.train.log_every = 50 if tiny else 100
  c.train.sample_every = 500 if tiny else 5000
  c.train.checkpoint_every = 250 if tiny else 2000
  c.train.keep_checkpoints = 3
  c.train.max_nonfinite_in_row = 10
  c.train.num_sample_prompts = 16
  # Sample grids once more after the last step (scripted sweeps and tests can skip that compile).
  c.train.final_samples = True

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.peak_lr = 1e-3 if tiny else 1e-4
  c.optimizer.warmup_steps = 100 if tiny else 4000
  c.optimizer.end_lr_factor = 0.0
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.96
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.045
  c.optimizer.grad_clip_norm = 4.0

  # --- decoding (SPEC section 5)
  c.decoding = ml_collections.ConfigDict()
  c.decoding.kind = "masked"  # magvlt_jax/decoders.py: masked iterative decoding
  c.decoding.order = "maskgit"  # maskgit | mask_predict | random | raster
  c.decoding.t2i_steps = 10
  c.decoding.image_temperature = (1.4, 0.6)
  c.decoding.gumbel_scale = (2.0, 0.2)
  c.decoding.i2t_steps = 12
  c.decoding.text_temperature = 0.1
  c.decoding.text_top_k = 32
  c.decoding.guidance_scale = 0.0  # classifier-free guidance; 0 = off
  c.decoding.uncond_text_length = (8, 16)
  c.decoding.uncond_steps = 12  # unconditional image+text generation (one loop for both)
  # I2T length probe (text fully masked, length read at BOT): how many text slots the image rows
  # see. 0 = all text_length slots, the pass our trainer's length loss uses; the official sampler
  # shows 16 (official_*).
  c.decoding.length_probe_text_length = 0
  c.decoding.rerank_passes = 4  # likelihood reranking: masked passes per candidate
  c.decoding.num_image_candidates = 32 if not tiny else 4
  c.decoding.num_text_candidates = 64 if not tiny else 4
  c.decoding.rerank = "auto"  # auto (CLIP if weights given, else likelihood) | clip | likelihood | none
  c.decoding.clip_weights = ""  # user-supplied CLIP checkpoint

  # --- sampling job (--mode=sample)
  c.sample = ml_collections.ConfigDict()
  c.sample.prompts_file = ""
  c.sample.images_dir = ""
  c.sample.output_dir = ""  # empty: WORKDIR/samples
  c.sample.batch_size = 8
  c.sample.checkpoint_step = -1  # -1: latest

  # --- device mesh
  c.mesh = ml_collections.ConfigDict()
  c.mesh.strategy = "data"  # data | fsdp | fsdp_tensor
  c.mesh.data = -1  # -1 fills with the remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.num_slices = 1
  c.mesh.distributed = False  # call jax.distributed.initialize() (multi-host)

  # --- evaluation (--mode=evaluate)
  c.eval = ml_collections.ConfigDict()
  c.eval.checkpoint_step = -1
  c.eval.num_t2i = 64 if tiny else 30_000
  c.eval.num_i2t = 64 if tiny else 5_000
  c.eval.batch_size = 16 if tiny else 64
  c.eval.inception_weights = ""  # pytorch-fid pt_inception-2015-12-05 state dict or .npz
  c.eval.clip_weights = c.decoding.get_ref("clip_weights")
  c.eval.spice_corenlp_jar = ""
  c.eval.blur_fid_radius = 0.0  # >0: L-Verse's FID-k on blurred images
  c.eval.text_temperature = 0.5
  c.eval.compare = ""  # path of another report: print the differences
  c.eval.output_dir = ""  # empty: WORKDIR/eval
  c.eval.seed = 0  # PRNG seed of every sampler call in the job (same seed -> same report)
  c.eval.num_inpaint = 64 if tiny else 5_000
  c.eval.num_infill = 64 if tiny else 5_000
  c.eval.num_recon = 64 if tiny else 5_000  # tokenizer reconstruction metrics
  c.eval.inpaint_size = 4 if tiny else 8  # centre region of inpaint_size x inpaint_size codes
  c.eval.num_grid = 16  # examples per sample grid
  # Which data to evaluate on; empty: the trained config's data.name / data.path / data.eval_split
  # (e.g. zero-shot COCO: eval.data_name=coco_captions_folder eval.data_path=DIR).
  c.eval.data_name = ""
  c.eval.data_path = ""
  c.eval.split = ""
  return c


def _official(variant: str) -> ml_collections.ConfigDict:
  """The released checkpoints' settings (notes/official_magvlt.md sections 1, 2 and 6)."""
  c = get_config(_OFFICIAL[variant])
  c.variant = variant
  assert c.vqgan.variant == "f16_16384"  # the taming vqgan_imagenet_f16_16384 layers
  c.model.dropout_rate = 0.1  # resid_pdrop
  c.model.attention_dropout_rate = 0.1  # attn_pdrop
  c.model.embedding_dropout_rate = 0.0  # embd_pdrop
  c.model.layer_norm_eps = 1e-5
  c.model.init_std = 0.02
  c.model.mlp_ratio = 4
  c.model.length_classes = 64
  c.sequence.text_vocab_size = 49408  # CLIP's vocabulary (EOS = pad = 49407)
  c.text.kind = "clip_bpe"  # the official ClipBPE (magvlt_jax/text_clip.py)
  c.text.bpe_dropout = 0.1  # bpe_pdrop, training split only
  c.train.task_weights = (8.0, 1.0, 1.0)
  c.train.label_smoothing = 0.1
  c.train.length_loss_weight = 0.01
  c.train.use_unroll = True
  c.train.use_mixsel = True
  c.train.mixsel_weight = 0.5  # hnh_loss_coef
  d = c.decoding  # the `sampling:` block of configs/magvlt-it2it-*-sampling.yaml
  d.order = "maskgit"
  d.t2i_steps = 10  # img_num_steps
  d.image_temperature = (1.4, 0.6)  # img_temperature_start / end
  d.gumbel_scale = (2.0, 0.2)  # img_mult_temperature_start / end
  d.i2t_steps = 12  # txt_num_steps
  d.text_temperature = 0.1  # txt_temperature
  d.text_top_k = 32  # txt_top_k
  d.num_image_candidates = 32  # img_num_cand_samples
  d.num_text_candidates = 64  # txt_num_cand_samples
  d.guidance_scale = 0.0
  # sampling_i2t.py probes the length with a dummy txt_mask of 16 ones: text columns >= 16 hidden.
  d.length_probe_text_length = 16
  return c
