"""Pre-tokenized training data (data/pretokenized.py, prepare_data --tokenize,
config.train.pretokenized): K crops per record equal to the encoder on those crops, the batches
carry the codes of the crop they show, resume keeps the crop choice, mismatched tables are refused,
the loss from table codes equals the loss that encodes the same crop in the step, and the table
is the same when its encoder batch is sharded over 8 devices."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import app
from PIL import Image

from magvlt_jax import checkpoints
from magvlt_jax import image_tokenizers
from magvlt_jax import objectives
from magvlt_jax import sequence as seq
from magvlt_jax import text
from magvlt_jax.configs_util import load_config, validate_config
from magvlt_jax.data import builders
from magvlt_jax.data import code_cache
from magvlt_jax.data import pipeline
from magvlt_jax.data import pretokenized
from magvlt_jax.data import transforms
from magvlt_jax.models import transformer
from magvlt_jax.models import vqgan
from magvlt_jax.tools import prepare_data
from magvlt_jax.train import trainer

_HERE = os.path.dirname(os.path.abspath(__file__))
NUM, K = 12, 3
_WORDS = ("a red dog", "a blue cat", "two green birds", "a small boat", "an old man")
_PLACES = ("on a table", "in a park", "near the water", "in the snow")


def small_config(root, data_dir):
  """16x16 crops of 40x30 photos-ish images -> 8x8 codes through a small 1-downsample VQ-GAN."""
  c = load_config("configs/magvlt.py:tiny")
  c.vqgan.image_size, c.vqgan.channel_mult, c.vqgan.base_channels = 16, (1, 2), 8
  c.vqgan.z_channels, c.vqgan.embed_dim = 16, 8
  c.model.num_layers, c.model.embed_dim, c.model.num_heads = 1, 32, 2
  c.data.name, c.data.path, c.data.data_dir = "coco_captions_folder", root, data_dir
  c.data.global_batch_size, c.data.num_workers = 4, 1
  c.train.pretokenized, c.train.pretokenized_crops = "auto", K
  return c


def _coco(root):
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "train2014"))
  os.makedirs(os.path.join(root, "annotations"))
  images, anns = [], []
  for i in range(NUM):  # smooth random content at 40x30: every crop shows something else
    small = rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)
    name = f"{i:04d}.jpg"
    Image.fromarray(small).resize((40, 30), Image.BICUBIC).save(
        os.path.join(root, "train2014", name), quality=95)
    images.append({"id": i, "file_name": name})
    anns += [{"image_id": i, "caption": f"{_WORDS[(i + k) % 5]} {_PLACES[(i * k) % 4]}"}
             for k in range(2)]
  with open(os.path.join(root, "annotations", "captions_train2014.json"), "w") as f:
    json.dump({"images": images, "annotations": anns}, f)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  base = tmp_path_factory.mktemp("pretok")
  root, data_dir, workdir = (str(base / d) for d in ("coco", "data", "work"))
  _coco(root)
  config = small_config(root, data_dir)
  validate_config(config)
  tok = image_tokenizers.get(config)
  params = tok.init_params(jax.random.key(0))
  vqgan.save_params_npz(os.path.join(workdir, "tokenizer", vqgan.PARAMS_FILE), params)
  prepare_data.prepare(config, workdir=workdir, tokenize_crops=K, tokenize_batch=8)
  txt = text.TextTokenizer.train([f"{w} {p}" for w in _WORDS for p in _PLACES] * 4, 64)
  return config, workdir, tok, params, txt


def _table(env, config=None):
  c, workdir, tok, params, _ = env
  return pretokenized.for_training(config or c, tok, params, workdir=workdir)


def _iterator(env, table):
  config, workdir, _, _, txt = env
  return pipeline.create_train_iterator(config, txt, workdir=workdir, pretokenized_table=table)


def test_tokenize_writes_k_crops_equal_to_the_encoder_on_those_crops(env, capsys):
  config, workdir, tok, params, _ = env
  table = _table(env)
  assert table.codes.shape == (NUM, K, tok.num_tokens) and table.codes.dtype == np.uint16
  source, _ = pipeline.open_source(config, "train", workdir=workdir)
  reader = pipeline.Reader(config, source, None, train=True, seed=0)
  assert reader.load_image(0).size == (40, 30)  # not square: the crop is a real augmentation
  crops = np.stack([np.asarray(transforms.dalle_crop(reader.load_image(i), 16,
                                                     pretokenized.crop_rng(config.seed, i, c)))
                    for i in range(NUM) for c in range(K)])
  want = np.asarray(jax.jit(tok.encode)(params, crops)).reshape(NUM, K, -1)
  np.testing.assert_array_equal(np.asarray(table.codes, np.int32), want)
  assert len({c.tobytes() for c in crops}) > 2 * NUM  # crops of one record mostly differ ...
  assert (want[:, 0] != want[:, 1]).any()  # ... and so do their codes
  # The command prints what it wrote and how to train with it.
  prepare_data.prepare(config, workdir=workdir, tokenize_crops=K, tokenize_batch=8)
  out = capsys.readouterr().out
  assert f"pre-tokenized: {table.path} ({NUM} records x {K} crops x 64 codes" in out
  assert "--config.train.pretokenized=auto --config.train.pretokenized_crops=3" in out


def test_batches_carry_the_codes_of_the_crop_they_show(env):
  config, workdir, tok, params, _ = env
  table = _table(env)
  it = _iterator(env, table)
  encode = jax.jit(tok.encode)
  seen = set()
  for k in range(3):
    batch = next(it)
    np.testing.assert_array_equal(batch["image_codes"], encode(params, batch["image"]))
    reader = it._reader  # pylint: disable=protected-access
    _, indices = pipeline.train_records(k, 4, 0, 1, NUM, reader.permutation)
    for i, codes in zip(indices, batch["image_codes"]):
      match = [c for c in range(K) if np.array_equal(table.codes[i, c], codes)]
      assert match, (i, codes)  # one of the record's K crops
      seen.add(match[0])
  assert len(seen) > 1  # the crop is drawn per example, not fixed
  # MixSel's halves are squeezed from the same crop.
  np.testing.assert_array_equal(batch["image_lr"],
                                np.stack([transforms.squeeze(Image.fromarray(x), "lr")
                                          for x in batch["image"]]))


def test_resume_gives_the_same_crops(env):
  table = _table(env)
  it = _iterator(env, table)
  next(it), next(it)
  state = it.get_state()
  assert state["pretokenized"].startswith(f"k{K}-")
  third = next(it)
  again = _iterator(env, table)
  again.set_state(state)
  resumed = next(again)
  for key in third:
    np.testing.assert_array_equal(third[key], resumed[key])


def test_a_table_for_another_run_is_refused_naming_the_file(env):
  config, workdir, tok, _, _ = env
  path = pretokenized.table_path(config, os.path.join(workdir, "x"))
  other_params = tok.init_params(jax.random.key(1))
  with pytest.raises(ValueError, match=r"pretokenized/train\.npy was built for another run "
                     r"\(tokenizer\.params_sha256: table '[0-9a-f]+', this run '[0-9a-f]+'\)"):
    pretokenized.for_training(config, tok, other_params, workdir=workdir)
  assert path.endswith(os.path.join("pretokenized", "train.npy"))
  four = config.copy_and_resolve_references()
  four.train.pretokenized_crops = 4
  with pytest.raises(ValueError, match="crops: table 3, this run 4"):
    _table(env, four)
  bigger = config.copy_and_resolve_references()
  bigger.vqgan.image_size = bigger.data.image_size = 32  # same params shapes, another size
  with pytest.raises(ValueError, match=r"dataset\.image_size: table 16, this run 32"):
    _table(env, bigger)
  missing = config.copy_and_resolve_references()
  missing.train.pretokenized = os.path.join(workdir, "none.npy")
  with pytest.raises(FileNotFoundError, match="no table at .*none.npy; rebuild it with"):
    _table(env, missing)


def test_tokenize_without_a_tokenizer_names_the_checkpoint_key(env, tmp_path):
  config = env[0]
  with pytest.raises(app.UsageError, match=r"config\.vqgan\.checkpoint is empty and .*tokenizer "
                     "has none"):
    prepare_data.prepare(config, workdir=str(tmp_path), tokenize_crops=K)


def test_table_takes_precedence_over_the_code_cache(env):
  config, workdir, _, params, _ = env
  both = config.copy_and_resolve_references()
  both.train.cache_image_codes = "on"  # would raise on these non-square images if it were used
  codes_for = trainer._image_codes  # pylint: disable=protected-access
  image_codes, table = codes_for(both, params, workdir)
  assert image_codes is None and table.crops == K
  both.train.pretokenized = ""
  with pytest.raises(ValueError, match="is 40x30, not config.data.image_size 16 square"):
    codes_for(both, params, workdir)
  assert code_cache.mode_of(both) == "on"


@pytest.mark.parametrize("task", [seq.Task.T2I, seq.Task.I2T])
def test_loss_from_the_table_equals_encoding_the_crop_in_the_step(env, task):
  config, _, tok, params, txt = env
  c = config.copy_and_resolve_references()
  c.train.use_mixsel, c.train.use_unroll, c.train.aux_batch_stride = True, True, 1  # MixSel in-step
  batch = {k: jax.numpy.asarray(v) for k, v in next(_iterator(env, _table(env))).items()}
  model = transformer.from_config(c)
  weights = transformer.init_params(c, jax.random.key(0))
  in_step = objectives.create(c, model, tok, txt)
  from_table = objectives.create(c, model, tok, txt).read_cached_codes()
  assert "image_codes" in from_table.batch_keys and "image" not in from_table.batch_keys

  def loss(obj):
    b = {k: batch[k] for k in obj.batch_keys}
    return float(jax.jit(lambda p, b: obj.loss_fn(p, params, b, jax.random.key(3), int(task))[0])(
        weights, b))
  np.testing.assert_allclose(loss(from_table), loss(in_step), rtol=1e-6)


def test_sharded_over_8_devices_the_table_is_the_same(env, tmp_path):
  config, workdir, _, _, _ = env
  c = config.copy_and_resolve_references()
  c.train.pretokenized = str(tmp_path / "eight.npy")
  checkpoints.save_config(str(tmp_path), c)
  proc = subprocess.run([sys.executable, os.path.join(_HERE, "pretokenize_worker.py"),
                         str(tmp_path), workdir], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8 and report["shards"] == 8
  eight = np.load(str(tmp_path / "eight.npy"))
  np.testing.assert_array_equal(eight, np.asarray(_table(env).codes))


def test_on_square_data_the_table_gives_the_code_cache_batches(env, tmp_path):
  _, workdir, tok, params, txt = env
  c = small_config("", str(tmp_path / "data"))
  c.data.name, c.data.synthetic.num_train, c.data.synthetic.num_eval = "synthetic", 16, 4
  c.train.pretokenized_crops = 2
  prepare_data.prepare(c, workdir=workdir, tokenize_crops=2, tokenize_batch=8)
  table = _table(env, c)
  np.testing.assert_array_equal(table.codes[:, 0], table.codes[:, 1])  # the crop is the identity
  c.train.cache_image_codes = "on"
  cache = code_cache.build(c, tok.encode, params, workdir=workdir)
  a = pipeline.create_train_iterator(c, txt, workdir=workdir, pretokenized_table=table)
  b = pipeline.create_train_iterator(c, txt, workdir=workdir, image_codes=cache)
  for _ in range(2):
    x, y = next(a), next(b)
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key])


def test_trainer_reads_the_table_and_never_runs_the_encoder(env, tmp_path, monkeypatch):
  config, workdir, _, _, _ = env
  c = config.copy_and_resolve_references()
  c.vqgan.checkpoint = os.path.join(workdir, "tokenizer")  # the table's tokenizer
  c.train.num_steps, c.train.log_every, c.train.checkpoint_every = 2, 1, 100
  c.train.final_samples, c.train.use_mixsel = False, False  # MixSel would encode its halves

  def no_encoder(*args):
    raise AssertionError("the train step ran the image encoder")
  monkeypatch.setattr(type(image_tokenizers.get(c)), "encode", no_encoder)
  last = trainer.train_and_evaluate(c, str(tmp_path))
  assert np.isfinite(last["loss"])
