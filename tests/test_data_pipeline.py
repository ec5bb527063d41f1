"""Input pipeline: crops and shapes, determinism, resume equality, per-host sharding, eval pass,
read-time bad records."""
import hashlib
import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from magvlt_jax import text
from magvlt_jax.configs_util import load_config
from magvlt_jax.data import builders
from magvlt_jax.data import pipeline
from magvlt_jax.data import transforms

NUM_TRAIN, NUM_EVAL = 48, 10


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  config = load_config("configs/magvlt.py:tiny")
  config.data.synthetic.num_train, config.data.synthetic.num_eval = NUM_TRAIN, NUM_EVAL
  config.data.global_batch_size = 8
  config.data.eval_batch_size = 4
  config.data.num_workers = 2
  data_dir = str(tmp_path_factory.mktemp("data"))
  builders.prepare(config, data_dir)
  tok = text.TextTokenizer.train(pipeline.caption_iterator(config, data_dir=data_dir), 128)
  source = builders.get_builder(config, data_dir).as_data_source("train")
  by_hash = {}  # stored image -> its captions (the synthetic crop at 64x64 is the identity)
  for i in range(len(source)):
    img = np.asarray(transforms.decode_image(source[i]["image"]))
    by_hash[_h(img)] = [c.decode() for c in source[i]["captions"]]
  return config, data_dir, tok, by_hash


def _h(img):
  return hashlib.sha1(np.ascontiguousarray(img).tobytes()).hexdigest()


def _train(env, **kw):
  config, data_dir, tok, _ = env
  return pipeline.create_train_iterator(config, kw.pop("tok", tok), data_dir=data_dir, **kw)


def _equal(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_train_batch_shapes_ranges_and_text(env):
  config, _, tok, by_hash = env
  batch = next(_train(env))
  s, n_txt = config.data.image_size, config.sequence.text_length
  assert batch["image"].shape == (8, s, s, 3) and batch["image"].dtype == np.uint8
  assert batch["image_lr"].shape == (8, s, s // 2, 3) and batch["image_tb"].shape == (8, s // 2, s, 3)
  assert batch["text"].shape == (8, n_txt) and batch["text"].dtype == np.int32
  assert batch["text_length"].dtype == np.int32
  assert np.array_equal(batch["image_lr"][:, :, 3], ((batch["image"][:, :, 6].astype(int)
                                                      + batch["image"][:, :, 7] + 1) // 2))
  for img, ids, length in zip(batch["image"], batch["text"], batch["text_length"]):
    assert 1 <= length <= n_txt and np.all(ids[length - 1:] == tok.eos_id) or length == n_txt
    assert tok.decode(ids)[0] in by_hash[_h(img)]  # one of this image's own captions


def test_images_only_iterator(env):
  batch = next(_train(env, tok=None))
  assert set(batch) == {"image", "image_lr", "image_tb"}


def test_deterministic_and_seeded(env):
  a, b = _train(env), _train(env)
  for _ in range(3):
    assert _equal(next(a), next(b))
  c = _train(env, seed=1)
  assert not np.array_equal(next(_train(env))["image"], next(c)["image"])
  config, data_dir, tok, _ = env
  one_thread = config.copy_and_resolve_references()
  one_thread.data.num_workers = 1  # batches do not depend on the number of reader threads
  d = pipeline.create_train_iterator(one_thread, tok, data_dir=data_dir)
  e = _train(env)
  for _ in range(3):
    assert _equal(next(d), next(e))


def test_resume_equals_uninterrupted(env, caplog):
  full = _train(env)
  ref = [next(full) for _ in range(11)]  # 6 batches per epoch: crosses an epoch boundary
  first = _train(env)
  for _ in range(4):
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # JSON-able
  resumed = _train(env)
  resumed.set_state(state)
  for k in range(4, 11):
    assert _equal(next(resumed), ref[k]), k
  other = _train(env, seed=5)
  with caplog.at_level(logging.WARNING):
    other.set_state(state)  # saved with seed 0: continues, but says the batches will differ
  assert "seed=0" in caplog.text


def test_epochs_reshuffle_and_redraw_captions(env):
  it, by_hash = _train(env), env[3]
  epochs = [[next(it) for _ in range(6)] for _ in range(3)]
  orders = [[_h(im) for b in ep for im in b["image"]] for ep in epochs]
  for order in orders:
    assert sorted(order) == sorted(by_hash)  # every image exactly once per epoch
  assert orders[0] != orders[1] != orders[2]
  caps = {}
  for ep in epochs:
    for b in ep:
      for im, ids in zip(b["image"], b["text"]):
        caps.setdefault(_h(im), set()).add(env[2].decode(ids)[0])
  assert sum(len(v) > 1 for v in caps.values()) > NUM_TRAIN // 3  # a fresh caption per epoch


def test_per_host_split_covers_every_example_once(env):
  config, _, _, by_hash = env
  hosts = 4  # local batch 2: each host reads 12 records per epoch
  seen, per_host = [], []
  for pi in range(hosts):
    it = _train(env, process_index=pi, process_count=hosts)
    per_host.append([next(it) for _ in range(NUM_TRAIN // config.data.global_batch_size + 1)])
    seen += [_h(im) for b in per_host[-1][:-1] for im in b["image"]]
  assert sorted(seen) == sorted(by_hash)
  # The hosts' blocks, stacked in process order, are the single-process global batches bit for
  # bit (a resume with another number of processes continues the same stream), also past an epoch.
  one = _train(env, process_index=0, process_count=1)
  for k in range(len(per_host[0])):
    glob = next(one)
    for key in glob:
      np.testing.assert_array_equal(np.concatenate([h[k][key] for h in per_host]), glob[key])
  assert one.get_state() == _train(env, process_index=3, process_count=4).get_state() | {
      "next_batch": one.get_state()["next_batch"]}
  # n not divisible by the hosts: still every record once per epoch, disjoint between hosts
  perm = np.random.default_rng(0).permutation(50)
  shards = [pipeline.train_records(k, 15, pi, 3, 50, lambda e: perm)[1]
            for k in range(4) for pi in range(3)][:10]  # 10 host blocks of 5 = one epoch
  flat = sum(shards, [])
  assert len(flat) == len(set(flat)) == 50
  with pytest.raises(ValueError, match="not divisible"):
    _train(env, process_index=0, process_count=3)  # global batch 8 over 3 hosts


def test_eval_iterator_one_ordered_pass(env):
  config, data_dir, tok, _ = env
  it = pipeline.create_eval_iterator(config, tok, data_dir=data_dir)
  batches = list(it)
  assert len(batches) == len(it) == 3  # 10 records, batch 4: last batch padded
  valid = np.concatenate([b["valid"] for b in batches])
  ids = np.concatenate([b["image_id"] for b in batches])[valid]
  assert valid.sum() == NUM_EVAL and sorted(ids.tolist()) == list(range(NUM_EVAL))
  b = batches[0]
  assert len(b["captions"]) == 4 and all(len(c) == 3 for c in b["captions"])
  want, _ = tok.encode([c[0] for c in b["captions"]], config.sequence.text_length)
  assert np.array_equal(b["text"], want)  # first caption, no BPE-dropout
  again = list(pipeline.create_eval_iterator(config, tok, data_dir=data_dir))
  assert all(_equal({k: v for k, v in x.items() if k != "captions"},
                    {k: v for k, v in y.items() if k != "captions"}) for x, y in zip(batches, again))
  seen = []
  for pi in range(3):
    for bb in pipeline.create_eval_iterator(config, None, data_dir=data_dir, process_index=pi,
                                            process_count=3):
      seen += bb["image_id"][bb["valid"]].tolist()
  assert sorted(seen) == list(range(NUM_EVAL))


def test_dalle_crop_and_center_crop():
  w, h, s = 120, 80, 32
  xs = np.broadcast_to(np.linspace(0, 255, w).astype(np.uint8)[None, :, None], (h, w, 3))
  img = Image.fromarray(np.ascontiguousarray(xs))
  ts = set()
  for seed in range(40):
    rng = np.random.default_rng(seed)
    out = np.asarray(transforms.dalle_crop(img, s, rng))
    assert out.shape == (s, s, 3) and out.dtype == np.uint8
    # the square (side 80) starts in [3/8, 5/8) of the 40-pixel excess: columns 15..105
    assert out[:, :, 0].min() >= int(255 * 14 / (w - 1)) and out[:, :, 0].max() <= int(255 * 106 / (w - 1))
    rng = np.random.default_rng(seed)
    rng.uniform(), rng.uniform()
    ts.add(int(rng.integers(s, max(min(80, round(9 / 8 * s)), s) + 1)))
  assert ts == set(range(32, 37))  # t ~ U{S .. 9/8 S}
  small = Image.fromarray(np.zeros((10, 14, 3), np.uint8))
  assert np.asarray(transforms.dalle_crop(small, s, np.random.default_rng(0))).shape == (s, s, 3)
  cc = np.asarray(transforms.center_crop(img, s))
  assert cc.shape == (s, s, 3) and abs(int(cc[:, :, 0].mean()) - 127) < 6  # centred


class _FakeSource:
  """A data source with chosen raw records (to test read-time failures)."""

  def __init__(self, images):
    self.records = [{"image": b, "captions": [f"caption {i}".encode()], "image_id": i}
                    for i, b in enumerate(images)]

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def _png(arr):
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format="PNG")
  return buf.getvalue()


def test_read_time_bad_records_are_replaced_and_counted(env):
  config, _, tok, _ = env
  good = [_png(np.full((70, 90, 3), 10 * i, np.uint8)) for i in range(4)]
  tiny = _png(np.full((3, 5, 3), 200, np.uint8))
  src = _FakeSource([good[0], b"garbage", good[2], tiny, b""])
  reader = pipeline.Reader(config, src, tok, train=True, seed=0)
  rngs = [np.random.default_rng(i) for i in range(5)]
  batch = reader.batch(range(5), rngs)
  assert batch["image"].shape == (5, 64, 64, 3)
  assert np.all(batch["image"][1] == 20)  # corrupt record 1 -> next record (2)
  assert np.all(batch["image"][3] == 200)  # tiny image upscaled
  assert np.all(batch["image"][4] == 0)  # empty bytes -> wraps to record 0
  assert reader.counter.as_dict() == {"read_corrupt": 2}
  bomb = pipeline.Reader(config, _FakeSource([good[0], good[1]]), None, train=False, seed=0)
  bomb.max_pixels = 1000  # every image is "too large" now
  with pytest.raises(RuntimeError, match="unreadable"):
    bomb.batch([0], [None])
  assert bomb.counter.as_dict()["read_too_large"] >= 2


def test_image_code_cache_gives_the_step_encoders_codes(env, monkeypatch):
  import jax  # pylint: disable=import-outside-toplevel
  from magvlt_jax import image_tokenizers  # pylint: disable=import-outside-toplevel
  from magvlt_jax.data import code_cache  # pylint: disable=import-outside-toplevel
  config, data_dir, tok, _ = env
  config = config.copy_and_resolve_references()
  tokenizer = image_tokenizers.get(config)
  params = tokenizer.init_params(jax.random.key(0))
  config.train.cache_image_codes = "auto"
  table = code_cache.build(config, tokenizer.encode, params, data_dir=data_dir)
  assert table.shape == (NUM_TRAIN, tokenizer.num_tokens) and table.dtype == np.int32
  it = pipeline.create_train_iterator(config, tok, data_dir=data_dir, image_codes=table)
  batch = next(iter(it))
  np.testing.assert_array_equal(batch["image_codes"],
                                jax.jit(tokenizer.encode)(params, batch["image"]))
  with pytest.raises(ValueError, match="rows for 48 training records"):
    pipeline.create_train_iterator(config, tok, data_dir=data_dir, image_codes=table[:5])
  # Not square at image_size: the random crop changes the codes, so no cache ("on": an error).
  fake = _FakeSource([_png(np.full((64, 64, 3), 9, np.uint8)), _png(np.zeros((70, 90, 3), np.uint8))])
  monkeypatch.setattr(pipeline, "open_source", lambda *a, **k: (fake, {}))
  assert code_cache.build(config, tokenizer.encode, params) is None
  config.train.cache_image_codes = "on"
  with pytest.raises(ValueError, match="training record 1 is 90x70"):
    code_cache.build(config, tokenizer.encode, params)
  config.train.cache_image_codes = "off"
  assert code_cache.build(config, tokenizer.encode, params) is None
