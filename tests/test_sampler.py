"""Sampler API, --mode=sample job and the Colab notebook against a tiny random checkpoint."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from magvlt_jax import checkpoints, configs_util, rerank, sample_job, sampler as sampler_lib
from magvlt_jax import text as text_lib
from magvlt_jax.models import transformer, vqgan

CAPTIONS = [f"a {c} {s} in the {p}" for c in ("red", "green", "blue") for s in ("circle", "square")
            for p in ("center", "top left")]


def tiny_config():
  config = configs_util.load_config("configs/magvlt.py:tiny")
  config.model.num_layers = 1
  config.model.embed_dim = 32
  config.model.num_heads = 2
  config.decoding.t2i_steps = 3
  config.decoding.i2t_steps = 3
  config.decoding.uncond_steps = 3
  config.decoding.num_image_candidates = 2
  config.decoding.num_text_candidates = 2
  config.sample.batch_size = 2
  config.train.num_sample_prompts = 2
  # A smaller image tokenizer (32x32 -> 8x8 codes) keeps compile times down.
  v = config.vqgan
  v.image_size, v.channel_mult, v.base_channels, v.norm_groups = 32, (1, 1, 1), 8, 4
  v.z_channels = v.embed_dim = 8
  return config


def random_params(abstract, seed):
  """N(0, 0.02) params of the given shapes: no init program to compile."""
  leaves, treedef = jax.tree.flatten(abstract)
  r = np.random.RandomState(seed)
  return treedef.unflatten([jnp.asarray(r.randn(*l.shape) * 0.02, l.dtype) for l in leaves])


def make_tiny_workdir(workdir):
  """A workdir as the trainer writes it, from random params: config.json, checkpoints/,
  tokenizer/params.npz, text/spm.model."""
  config = tiny_config()
  checkpoints.save_config(workdir, config)
  params = random_params(transformer.param_shapes(config), 0)
  store = checkpoints.CheckpointStore(os.path.join(workdir, "checkpoints"), async_save=False)
  store.save(1, {"params": params, "step": jnp.asarray(1)})
  store.close()
  vqgan.save_params_npz(os.path.join(workdir, "tokenizer", vqgan.PARAMS_FILE),
                        random_params(vqgan.abstract_params(config.vqgan), 1))
  text_lib.TextTokenizer.train(CAPTIONS * 10, 60, os.path.join(workdir, "text", "spm.model"))
  return config


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tiny_run"))
  make_tiny_workdir(path)
  return path


@pytest.fixture(scope="module")
def sampler(workdir):
  return sampler_lib.Sampler.from_checkpoint(workdir)


def test_text_to_image_reranks_and_never_retraces(sampler):
  images = sampler.text_to_image(["a red circle in the center", "a blue square"], seed=0)
  assert [im.size for im in images] == [(32, 32)] * 2 and images[0].mode == "RGB"
  counts = dict(sampler.trace_counts)
  both = sampler.text_to_image(["a green circle", "a red square"], seed=1, return_all=True)
  assert dict(sampler.trace_counts) == counts, "second call with the same shapes retraced"
  assert [len(c) for c in both] == [2, 2]
  # The best candidate is the first of return_all and what text_to_image returns.
  best = sampler.text_to_image(["a green circle", "a red square"], seed=1)
  np.testing.assert_array_equal(np.asarray(best[0]), np.asarray(both[0][0]))


class _CompileCounter:
  """Counts jax's backend compiles (every jit of every shape, the sampler's and jax's own)."""

  def __init__(self):
    self.count = 0

  def __call__(self, event, duration, **kwargs):
    del duration, kwargs
    if event == "/jax/core/compile/backend_compile_duration":
      self.count += 1

  def __enter__(self):
    jax.monitoring.register_event_duration_secs_listener(self)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self)


def test_varying_batch_sizes_never_recompile_after_warm_up(sampler):
  """1..5 prompts (max_batch 2: chunks of 1 or 2 rows) and 1..3 images reuse the chunk programs:
  after one round, a second round with other sizes and seeds neither traces nor compiles."""
  prompts = ["a red circle", "a blue square", "a green circle", "a red square", "a blue circle"]
  calls = lambda seed: [
      *(sampler.text_to_image(prompts[:n], n=1, seed=seed + n) for n in (1, 2, 3)),
      *(sampler.image_to_text(np.zeros((n, 32, 32, 3), np.uint8), n=1, seed=seed) for n in (1, 3))]
  calls(0)
  counts = dict(sampler.trace_counts)
  with _CompileCounter() as compiles:
    images, *_, captions = calls(10)
    more = sampler.text_to_image(prompts, n=1, seed=3)
  assert compiles.count == 0, f"{compiles.count} compiles after warm-up"
  assert dict(sampler.trace_counts) == counts
  assert len(images) == 1 and len(captions) == 3 and len(more) == 5


def test_likelihood_rerank_picks_the_training_like_candidate(sampler):
  ids, lengths = sampler.encode_text(["a red circle"] * 2)
  codes = np.stack([np.zeros(64, np.int32), np.arange(64, dtype=np.int32)])
  fn = sampler._fn("image_loglik")  # pylint: disable=protected-access
  scores = np.asarray(fn(sampler.params, codes, ids, lengths))
  assert scores.shape == (2,) and np.all(scores < 0)
  assert rerank.best_of(scores, 2).tolist() == [int(np.argmax(scores))]


def test_prompt_truncation_warns(sampler):
  with pytest.warns(UserWarning, match="truncated"):
    ids, lengths = sampler.encode_text(["red circle " * 40])
  assert lengths[0] == sampler.n_txt and ids.shape == (1, sampler.n_txt)


def test_image_to_text_accepts_any_size_and_mode(sampler):
  gray = Image.fromarray(np.random.RandomState(0).randint(0, 255, (90, 70), np.uint8))
  rgba = np.random.RandomState(1).randint(0, 255, (64, 100, 4)).astype(np.uint8)
  captions = sampler.image_to_text([gray, rgba], seed=0, n=1)
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
  assert sampler.prepare_images([gray]).shape == (1, 32, 32, 3)


def test_inpaint_and_infill_keep_context(sampler):
  image = np.random.RandomState(2).randint(0, 255, (32, 32, 3)).astype(np.uint8)
  out = sampler.inpaint(image, "a red circle", n=1)
  assert len(out) == 1 and out[0].size == (32, 32)
  # eval's argument order (images, region, prompts) works too
  region = np.zeros(sampler.n_img, bool)
  region[:4] = True
  assert len(sampler.inpaint(image[None], region, ["a red circle"], n=1)) == 1
  filled = sampler.infill(image, "a red [circle] in the center", n=1)
  assert filled[0].startswith("a red") and filled[0].endswith("in the center"), filled
  words, span = sampler_lib.sampler_tasks.parse_span("a [big red] circle")
  assert words == ["a", "big", "red", "circle"] and span == (1, 3)


def test_generate_pairs(sampler):
  pairs = sampler.generate(2, seed=3)
  assert len(pairs) == 2 and pairs[0][0].size == (32, 32) and isinstance(pairs[0][1], str)


def test_sample_job_writes_manifests(workdir, tmp_path):
  # The command-line config's model (4 layers) differs from the trained one (1 layer): the job
  # takes the model from WORKDIR/config.json and only decoding/sample/mesh from the command line.
  config = configs_util.load_config("configs/magvlt.py:tiny")
  config.decoding = tiny_config().decoding
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle in the center\n\na blue square\n")
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.full((80, 60, 3), 200, np.uint8)).save(images / "a.png")
  config.sample.prompts_file = str(prompts)
  config.sample.images_dir = str(images)
  config.sample.output_dir = str(tmp_path / "out")
  out = sample_job.run(config, workdir)
  t2i = [json.loads(l) for l in open(os.path.join(out, "t2i.jsonl"))]
  i2t = [json.loads(l) for l in open(os.path.join(out, "i2t.jsonl"))]
  assert [r["prompt"] for r in t2i] == ["a red circle in the center", "a blue square"]
  assert len(i2t) == 1 and i2t[0]["source"] == "a.png" and isinstance(i2t[0]["caption"], str)
  for r in t2i + i2t:
    assert Image.open(os.path.join(out, r["image"])).size == (32, 32)
  assert os.path.exists(os.path.join(out, "t2i_grid.png")) and os.path.exists(os.path.join(out, "i2t_grid.png"))


def test_colab_notebook_cells_run(workdir, monkeypatch, tmp_path):
  nb = json.load(open(os.path.join(os.path.dirname(__file__), "..", "notebooks", "sample_colab.ipynb")))
  monkeypatch.setenv("MAGVLT_WORKDIR", workdir)
  monkeypatch.chdir(tmp_path)
  namespace = {"display": lambda *a: None}
  for cell in nb["cells"]:
    if cell["cell_type"] != "code":
      continue
    src = "".join(line for line in cell["source"] if not line.lstrip().startswith(("!", "%")))
    exec(compile(src, "sample_colab.ipynb", "exec"), namespace)  # pylint: disable=exec-used
    if "display" in src and "import" in src:
      namespace["display"] = lambda *a: None  # no notebook front end in tests
  assert len(namespace["captions"]) == 2 and len(namespace["pairs"]) == 2
  assert os.path.exists("/tmp/t2i_grid.png")


def test_clip_rerank_keeps_the_best_scored_candidate(workdir, monkeypatch):
  config = checkpoints.load_config(workdir)
  config.decoding.rerank = "clip"
  with pytest.raises(ValueError, match="clip_weights"):
    sampler_lib.Sampler.from_checkpoint(workdir, config=config)
  config.decoding.clip_weights = "/nonexistent/ViT-B-32.pt"  # never read: scorer stubbed below
  s = sampler_lib.Sampler.from_checkpoint(workdir, config=config)
  s._clip_scorer = lambda images, caps: np.asarray(images, np.float32).mean(axis=(1, 2, 3))
  every = s.text_to_image(["a red circle"], n=2, seed=4, return_all=True)[0]
  bright = [np.asarray(im, np.float32).mean() for im in every]
  assert bright[0] >= bright[1]
  best = s.text_to_image(["a red circle"], n=2, seed=4)[0]
  np.testing.assert_array_equal(np.asarray(best), np.asarray(every[0]))


def test_sampling_path_imports_without_tensorflow():
  code = ("import sys; import magvlt_jax.sampler, magvlt_jax.sample_job, magvlt_jax.rerank; "
          "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
          "assert not bad, bad")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={**os.environ, "JAX_PLATFORMS": "cpu"})
