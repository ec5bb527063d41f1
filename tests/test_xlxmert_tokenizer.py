"""X-LXMERT's image side: mini-batch k-means (objective falls, nearest-centroid assignment, exact
resume), the SPADE generator / discriminator (SPADE formula, spectral norm, output range, one GAN
step lowers both losses) and the "grid_kmeans" tokenizer through the registry (round trip, saved
params, config errors, precomputed npz features)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from magvlt_jax import configs_util
from magvlt_jax import image_tokenizers
from magvlt_jax import kmeans
from magvlt_jax.image_tokenizers import grid_kmeans
from magvlt_jax.models import grid_features
from magvlt_jax.models import spade
from magvlt_jax.models import vqgan
from magvlt_jax.train import generator_trainer


def _blobs(n=240, seed=0):
  rng = np.random.default_rng(seed)
  centres = np.array([[0, 0, 0, 0], [6, 0, 0, 0], [0, 6, 0, 6]], np.float32)
  return (centres[rng.integers(0, 3, n)] + rng.normal(0, 0.5, (n, 4))).astype(np.float32)


def _batches(data, size=40):
  return lambda start: iter(data[(i % (len(data) // size)) * size:][:size] for i in range(start, 10**6))


def test_kmeans_objective_falls_and_assignment_is_the_nearest_centroid():
  x = _blobs()
  state = kmeans.init_state(x[:40], 3, jax.random.PRNGKey(0))  # fit's seeding
  before = float(kmeans.inertia(jnp.asarray(x), state["centroids"]))
  state, history = kmeans.fit(_batches(x), 3, 12, log_every=1)
  after = float(kmeans.inertia(jnp.asarray(x), state["centroids"]))
  assert after < before and history[-1][1] < history[0][1]
  assert after < 0.5 * 4 * 1.5  # near the blobs' own variance (4 dims x 0.25), far below a merged pair
  c = np.asarray(state["centroids"])
  brute = np.argmin(((x[:, None, :] - c[None]) ** 2).sum(-1), -1)
  np.testing.assert_array_equal(np.asarray(kmeans.assign(jnp.asarray(x), state["centroids"])), brute)
  assert kmeans.assign(jnp.asarray(x).reshape(6, 40, 4), state["centroids"]).shape == (6, 40)
  assert int(state["counts"].sum()) == 12 * 40
  with pytest.raises(ValueError, match="samples for k=300"):
    kmeans.init_state(x, 300, jax.random.PRNGKey(0))


def test_kmeans_resume_gives_the_uninterrupted_centroids(tmp_path):
  x = _blobs(seed=3)
  full, _ = kmeans.fit(_batches(x), 3, 8, state_path=str(tmp_path / "full.npz"))
  part = str(tmp_path / "part.npz")
  kmeans.fit(_batches(x), 3, 5, state_path=part)  # "interrupted" after 5 of 8 steps
  state, _ = kmeans.load(part)
  assert int(state["step"]) == 5
  resumed, _ = kmeans.fit(_batches(x), 3, 8, state_path=part)
  np.testing.assert_array_equal(np.asarray(resumed["centroids"]), np.asarray(full["centroids"]))
  np.testing.assert_array_equal(np.asarray(resumed["counts"]), np.asarray(full["counts"]))
  with pytest.raises(ValueError, match="k=4"):
    kmeans.fit(_batches(x), 4, 8, state_path=part)


def test_spade_normalisation_equals_its_formula():
  x = np.array([1.0, 2.0, 3.0, 4.0], np.float32).reshape(1, 2, 2, 1)  # mean 2.5, var 1.25
  want = (x - 2.5) / np.sqrt(1.25 + 1e-5) * (1 + 1.0) + 0.5
  np.testing.assert_allclose(spade.spade_modulate(jnp.asarray(x), 1.0, 0.5), want, rtol=1e-5)
  # The module: zero gamma / beta kernels leave their biases as the modulation.
  seg = jnp.ones((1, 1, 1, 3))
  mod = spade.SPADE(hidden=4)
  params, spectral = spade.init(mod, jax.random.PRNGKey(0), jnp.asarray(x), seg)
  for name, bias in (("gamma", 1.0), ("beta", 0.5)):
    params[name] = dict(kernel=jnp.zeros_like(params[name]["kernel"]), bias=jnp.full((1,), bias))
  out = mod.apply({"params": params, "spectral": spectral}, jnp.asarray(x), seg)
  np.testing.assert_allclose(out, want, rtol=1e-5)


def test_spectral_norm_makes_the_largest_singular_value_one():
  conv = spade.SNConv(8, 3)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 5, 5, 6))
  params, spectral = spade.init(conv, jax.random.PRNGKey(1), x)
  for scale in (1.0, 25.0):  # the normalised kernel does not depend on the kernel's scale
    p = dict(params, kernel=params["kernel"] * scale)
    s = spade.spectral_update(p, spectral, 30)
    w = np.asarray(p["kernel"] / spade.sigma_of(p["kernel"], s["u"]))
    top = np.linalg.svd(w.reshape(-1, 8), compute_uv=False)[0]
    assert abs(top - 1.0) < 1e-3, top
  # conv(x) is linear in the kernel: doubling the raw kernel leaves the output unchanged.
  y1 = conv.apply({"params": params, "spectral": spectral}, x)
  p2 = dict(params, kernel=params["kernel"] * 2.0, bias=params["bias"])
  np.testing.assert_allclose(conv.apply({"params": p2, "spectral": spectral}, x), y1, rtol=1e-4, atol=1e-5)


def test_generator_output_shape_range_and_noise():
  gen = spade.SpadeGenerator(num_blocks=2, channels=8, seg_channels=8, spade_hidden=8)
  grid = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 5)) * 3.0
  params, spectral = spade.init(gen, jax.random.PRNGKey(1), grid)
  v = {"params": params, "spectral": spectral}
  out = gen.apply(v, grid)
  assert out.shape == (2, 16, 16, 3) and out.dtype == jnp.float32
  assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0 and float(out.std()) > 0
  np.testing.assert_array_equal(gen.apply(v, grid), out)  # deterministic decoding
  noisy = gen.apply(v, grid, deterministic=False, rngs={"noise": jax.random.PRNGKey(2)})
  assert float(jnp.abs(noisy - out).max()) > 0
  disc = spade.SpadeDiscriminator(num_blocks=2, num_classes=7, channels=8)
  dp, ds = spade.init(disc, jax.random.PRNGKey(3), out)
  d = disc.apply({"params": dp, "spectral": ds}, out)
  assert d["adv"].shape == (2,) and d["cls"].shape == (2, 4, 4, 7)
  assert [f.shape for f in d["features"]] == [(2, 8, 8, 8), (2, 4, 4, 8)]


def _tiny_tok_cfg():
  """16 px images on a 4x4 grid of 24-d 'block2' features, 8 clusters, random backbones."""
  c = configs_util.load_config("configs/grid_kmeans.py:tiny")
  c.image_size, c.grid, c.num_clusters, c.feature_layer = 16, 4, 8, "block2"
  c.backbone_weights = c.loss.perceptual_weights = "random"
  c.generator.channels = c.generator.seg_channels = c.generator.spade_hidden = 8
  c.discriminator.channels = 8
  c.loss.pixel = 1.0  # every generator term on (the tiny default uses it; base does not)
  return c


def test_one_gan_step_lowers_generator_and_discriminator_losses():
  cfg = _tiny_tok_cfg()
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)), jnp.uint8)
  backbone = grid_features.load_backbone("random", (cfg.feature_layer,))
  feats = grid_features.grid_features(backbone, images, cfg)
  centroids = kmeans.init_state(np.asarray(feats), 8, jax.random.PRNGKey(0))["centroids"]
  frozen = generator_trainer.frozen_params(cfg, centroids, backbone)
  g_tx, d_tx = generator_trainer.make_optimizers(cfg)
  state = generator_trainer.init_state(cfg, jax.random.PRNGKey(0), g_tx, d_tx)
  batch = generator_trainer.inputs(frozen, images, cfg)
  assert batch[1].shape == (4, 4, 4) and batch[2].shape == (4, 4, 4, 24)
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.seed), 0)  # the step's noise key at step 0
  # One compile gives both the loss and the fake images (an eager call here took ~30 s).
  g_eval = jax.jit(lambda gp: generator_trainer.generator_loss(gp, state, frozen, batch, rng, cfg))
  g_loss = lambda gp: g_eval(gp)[0]
  fake0 = g_eval(state["g_params"])[1][0]
  d_loss = jax.jit(lambda dp: generator_trainer.discriminator_loss(dp, state, batch, fake0, cfg)[0])
  step = jax.jit(functools.partial(generator_trainer.train_step, cfg=cfg, g_tx=g_tx, d_tx=d_tx))
  new, metrics = step(state, frozen, images)
  assert np.isclose(float(metrics["g_loss"]), float(g_loss(state["g_params"])), rtol=1e-4)
  assert float(g_loss(new["g_params"])) < float(g_loss(state["g_params"]))
  assert float(d_loss(new["d_params"])) < float(d_loss(state["d_params"]))
  assert int(new["step"]) == 1 and float(metrics["perceptual"]) > 0 and float(metrics["feature_matching"]) > 0
  terms = (cfg.loss.adversarial * metrics["g_adv"] + cfg.loss.acgan * metrics["g_acgan"]
           + cfg.loss.feature_matching * metrics["feature_matching"]
           + cfg.loss.perceptual * metrics["perceptual"] + cfg.loss.pixel * metrics["pixel_l1"])
  assert float(metrics["pixel_l1"]) > 0 and np.isclose(float(terms), float(metrics["g_loss"]), rtol=1e-5)


def _system_config():
  c = configs_util.load_config("configs/magvlt.py:tiny")
  c.image_tokenizer = "grid_kmeans"
  g = c.grid_kmeans
  g.backbone_weights = g.loss.perceptual_weights = "random"
  g.generator.channels = g.generator.seg_channels = g.generator.spade_hidden = 8
  return c


def test_grid_kmeans_tokenizer_round_trip_and_saved_params(tmp_path):
  c = _system_config()
  configs_util.validate_config(c)
  tok = image_tokenizers.get(c)
  assert isinstance(tok, grid_kmeans.GridKMeansTokenizer)
  assert tok.grid == (8, 8) and tok.num_tokens == 64 and tok.vocab_size == 256 == c.sequence.image_vocab_size
  params = tok.init_params(jax.random.PRNGKey(0))
  images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 64, 64, 3)), jnp.uint8)
  codes = jax.jit(tok.encode)(params, images)
  assert codes.shape == (2, 64) and codes.dtype == jnp.int32
  feats = np.asarray(tok.features(params, images)).reshape(2, 64, -1)
  c_np = np.asarray(params["centroids"])
  brute = np.argmin(((feats[:, :, None] - c_np[None, None]) ** 2).sum(-1), -1)
  assert np.mean(np.asarray(codes) == brute) > 0.99  # float ties aside, the nearest centroid
  pixels = jax.jit(tok.decode)(params, codes)
  assert pixels.shape == (2, 64, 64, 3) and pixels.dtype == jnp.uint8
  vqgan.save_params_npz(str(tmp_path / "tokenizer" / grid_kmeans.PARAMS_FILE), params)
  assert tok.has_params(str(tmp_path))
  loaded = tok.load_params(str(tmp_path))
  np.testing.assert_array_equal(np.asarray(jax.jit(tok.decode)(loaded, codes)), np.asarray(pixels))
  c.grid_kmeans.num_clusters = 128
  with pytest.raises(ValueError, match="128 clusters"):
    image_tokenizers.get(c).load_params(str(tmp_path))


def test_grid_kmeans_config_errors_name_the_key():
  c = _system_config()
  c.grid_kmeans.feature_layer = "block7"
  with pytest.raises(ValueError, match="grid_kmeans.feature_layer"):
    configs_util.validate_config(c)
  c = _system_config()
  c.grid_kmeans.num_clusters = 100
  with pytest.raises(ValueError, match="sequence.image_vocab_size"):
    configs_util.validate_config(c)
  c = _system_config()
  c.grid_kmeans.image_size = 96
  with pytest.raises(ValueError, match="grid_kmeans.image_size"):
    configs_util.validate_config(c)
  c = _system_config()
  c.grid_kmeans.feature_source = "npz"
  with pytest.raises(ValueError, match="features_npz is empty"):
    configs_util.validate_config(c)


def test_precomputed_npz_features(tmp_path):
  feats = np.random.default_rng(0).normal(size=(5, 4, 2)).astype(np.float32)  # [N, g*g, D], g=2
  path = str(tmp_path / "fc6.npz")
  np.savez(path, features=feats, ids=np.array([10, 11, 12, 13, 14]))
  src = grid_features.NpzFeatures(path, grid=2)
  assert len(src) == 5 and src.dim == 2
  np.testing.assert_array_equal(src.by_id([12, 10]), feats[[2, 0]].reshape(2, 2, 2, 2))
  np.testing.assert_array_equal(src.by_index([4]), feats[[4]].reshape(1, 2, 2, 2))
  with pytest.raises(KeyError, match="99"):
    src.by_id([99])
  a = list(zip(range(4), src.batches(2)))
  b = list(zip(range(2), src.batches(2, start_batch=2)))
  np.testing.assert_array_equal(a[2][1], b[0][1])  # resumable order
  np.savez(path, features=feats.reshape(5, 2, 4))
  with pytest.raises(ValueError, match="expected"):
    grid_features.NpzFeatures(path, grid=2)
  c = _system_config()
  c.grid_kmeans.feature_source = "npz"
  with pytest.raises(ValueError, match="encode_features"):
    image_tokenizers.get(c).encode({}, jnp.zeros((1, 64, 64, 3), jnp.uint8))


@pytest.mark.slow
def test_tokenizer_train_writes_params_the_registry_loads(tmp_path):
  c = _system_config()
  g = c.grid_kmeans
  g.num_clusters, c.sequence.image_vocab_size = 16, 16
  g.feature_layer = "block2"  # 32 px input: cheap on CPU
  g.kmeans.batch_size, g.kmeans.num_steps, g.kmeans.log_every = 4, 3, 1
  g.train.batch_size, g.train.num_steps, g.train.log_every, g.train.image_every = 2, 2, 1, 2
  c.data.synthetic.num_train, c.data.synthetic.num_eval = 16, 4
  workdir = str(tmp_path)
  result = image_tokenizers.get(c).train(c, workdir)
  tok = image_tokenizers.get(c)
  assert tok.has_params(workdir) and np.isfinite(result["psnr"]) and result["num_images"] == 4
  state, _ = kmeans.load(str(tmp_path / "tokenizer" / "kmeans.npz"))
  assert int(state["step"]) == 3
  params = tok.load_params(workdir)
  np.testing.assert_array_equal(np.asarray(params["centroids"]), np.asarray(state["centroids"]))


class _FakeTextTokenizer:
  eos_id, sep_id, vocab_size = 1, 2, 128


@pytest.mark.slow
def test_transformer_trainer_step_on_grid_kmeans_tokens(tmp_path):
  from magvlt_jax.train import steps as steps_lib  # pylint: disable=import-outside-toplevel
  from magvlt_jax.train import trainer  # pylint: disable=import-outside-toplevel
  c = _system_config()
  c.model.num_layers, c.model.embed_dim, c.model.num_heads = 1, 32, 2
  c.data.global_batch_size = 4
  c.train.num_steps, c.train.use_unroll, c.train.use_mixsel = 1, False, False
  configs_util.validate_config(c)
  tok = image_tokenizers.get(c)
  setup = trainer.Setup(c, str(tmp_path), _FakeTextTokenizer(), tok.init_params(jax.random.PRNGKey(0)))
  rng = np.random.default_rng(0)
  image = rng.integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
  text = np.ones((4, c.sequence.text_length), np.int32)
  text[:, :4] = rng.integers(3, 100, (4, 4))
  batch = {"image": image, "image_lr": image[:, :, ::2], "image_tb": image[:, ::2], "text": text,
           "text_length": np.full((4,), 5, np.int32)}
  new, metrics = setup.step_fn(setup.init_state(0), setup.global_batch(batch), setup.tokenizer_params,
                               setup.base_rng(0), setup.empty_metrics())
  m = steps_lib.compute_metrics(metrics)
  assert int(new.step) == 1 and np.isfinite(m["loss"]) and m["loss"] > 0


_SHARDED_KMEANS = r"""
import os, sys, json
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, sys.argv[1])
import jax, jax.numpy as jnp, ml_collections, numpy as np
from magvlt_jax import kmeans, parallel
mesh_cfg = ml_collections.ConfigDict(dict(strategy="data", data=-1, fsdp=1, tensor=1, num_slices=1))
mesh = parallel.make_mesh(mesh_cfg)
x = np.random.default_rng(0).normal(size=(4, 64, 5)).astype(np.float32)
state = kmeans.init_state(x[0], 6, jax.random.PRNGKey(0))
sharded, single = kmeans.update_fn(mesh, parallel.logical_rules("data")), kmeans.update
a = b = state
for batch in x:
  a, _ = sharded(a, jnp.asarray(batch))
  b, _ = single(b, jnp.asarray(batch))
print(json.dumps(dict(devices=mesh.size, diff=float(jnp.abs(a["centroids"] - b["centroids"]).max()),
                      spec=str(sharded.lower(state, jnp.asarray(x[0])).compile().input_shardings[0][1]))))
"""


@pytest.mark.slow
def test_kmeans_step_sharded_over_8_devices_equals_one_device():
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", _SHARDED_KMEANS, root], capture_output=True, text=True,
                        timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out["devices"] == 8 and out["diff"] < 1e-5 and "data" in out["spec"]
