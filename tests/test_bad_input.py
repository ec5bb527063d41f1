"""Bad input at every door (README "Bad input"): each error names the problem, and nothing already
saved (checkpoints, earlier samples) is lost. Fast: no model is compiled, no subprocess."""
import json
import os
import resource
import signal

import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from magvlt_jax import checkpoints
from magvlt_jax import configs_util
from magvlt_jax import sample_job
from magvlt_jax import sampler as sampler_lib
from magvlt_jax import text as text_lib
from magvlt_jax.data import folders
from magvlt_jax.data import validate


@pytest.fixture()
def sampled_workdir(tmp_path):
  """A workdir holding config.json and the outputs of an earlier sample job (no checkpoint)."""
  config = configs_util.load_config("configs/magvlt.py:tiny")
  workdir = str(tmp_path / "run")
  checkpoints.save_config(workdir, config)
  earlier = os.path.join(workdir, "samples", "final", "t2i.jsonl")
  os.makedirs(os.path.dirname(earlier))
  with open(earlier, "w") as f:
    f.write('{"prompt": "a red circle", "image": "t2i/000000.png"}\n')
  return config, workdir, earlier


def _untouched(earlier):
  with open(earlier) as f:
    assert json.loads(f.read())["prompt"] == "a red circle"


def test_sample_job_unreadable_image_names_the_file(sampled_workdir, tmp_path):
  config, workdir, earlier = sampled_workdir
  images = tmp_path / "images"
  images.mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(images / "a.png")
  (images / "b.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  config.sample.images_dir = str(images)
  with pytest.raises(ValueError, match=r"config\.sample\.images_dir: .*b\.jpg is not a readable image"):
    sample_job.run(config, workdir)  # fails before the model loads: no checkpoint needed
  _untouched(earlier)


def test_sample_job_empty_prompts_file_is_an_error(sampled_workdir, tmp_path):
  config, workdir, earlier = sampled_workdir
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n   \n\n")
  config.sample.prompts_file = str(prompts)
  with pytest.raises(ValueError, match=r"config\.sample\.prompts_file=.*holds no prompts"):
    sample_job.run(config, workdir)  # not the default prompts in its place
  _untouched(earlier)


def test_sample_job_workdir_without_checkpoint(sampled_workdir):
  config, workdir, earlier = sampled_workdir
  with pytest.raises(FileNotFoundError, match=r"no checkpoints in .*run"):
    sample_job.run(config, workdir)
  _untouched(earlier)


def test_sampler_empty_prompt_and_image_lists(tmp_path):
  config = configs_util.load_config("configs/magvlt.py:tiny")
  words = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")]
  tok = text_lib.TextTokenizer.train(words * 10, 60, str(tmp_path / "spm.model"))
  sampler = sampler_lib.Sampler(config, params=None, tokenizer_params=None, text_tokenizer=tok)
  with pytest.raises(ValueError, match="no prompts given"):
    sampler.text_to_image([])
  with pytest.raises(ValueError, match="no images given"):
    sampler.image_to_text([])
  with pytest.warns(UserWarning, match=r"tokens with EOS > text_length .*truncated"):
    ids, lengths = sampler.encode_text(["red circle " * 40])  # over-long: cut, said so
  assert lengths[0] == ids.shape[1] == config.sequence.text_length


def test_typod_config_key_names_it():
  fv = flags.FlagValues()  # main's --config flag, parsed as main parses it
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True)
  with pytest.raises(flags.UnrecognizedFlagError, match="config.train.num_stpes"):
    fv(["main", "--config=configs/magvlt.py:tiny", "--config.train.num_stpes=3"])
  config = configs_util.load_config("configs/magvlt.py:tiny")  # the benchmark scripts' overrides
  with pytest.raises(SystemExit, match=r"config\.train has no key 'num_stpes'; did you mean num_steps"):
    configs_util.apply_override(config, "train.num_stpes=3")
  with pytest.raises(SystemExit, match=r"config has no key 'trian'; did you mean train"):
    configs_util.apply_override(config, "trian.num_steps=3")
  assert "num_stpes" not in config.train


def test_coco_json_with_missing_fields(tmp_path):
  path = tmp_path / "captions_train2014.json"
  path.write_text(json.dumps({"images": [{"id": 1, "file_name": "a.jpg"}]}))
  with pytest.raises(ValueError, match=r"captions_train2014\.json: no 'annotations' list"):
    folders.read_coco_captions(str(path), validate.Counter())
  path.write_text("{not json")
  with pytest.raises(ValueError, match=r"captions_train2014\.json: not a COCO captions JSON"):
    folders.read_coco_captions(str(path), validate.Counter())
  # Entries without their fields are skipped and counted, the rest is kept.
  path.write_text(json.dumps({
      "images": [{"id": 1, "file_name": "a.jpg"}, {"id": 2}, {"file_name": "c.jpg"}],
      "annotations": [{"image_id": 1, "caption": "a cat"}, {"caption": "orphan"},
                      {"image_id": 1}]}))
  counter = validate.Counter()
  files, captions = folders.read_coco_captions(str(path), counter)
  assert files == {1: "a.jpg"} and captions == {1: ["a cat", ""]}
  assert counter.as_dict() == {"bad_entry": 3}
  assert any("needs id, file_name" in e for e in counter.examples["bad_entry"])


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_during_save_keeps_the_previous_checkpoint(tmp_path, async_save):
  """Writes past 64 KiB fail (RLIMIT_FSIZE: the kernel refuses them, as on a full disk) while
  step 2 is saved; the error names the failed write, step 1 survives (keep=1 deletes nothing)
  and is what a restart restores."""
  directory = str(tmp_path / "checkpoints")
  store = checkpoints.CheckpointStore(directory, keep=1, async_save=async_save)
  small = {"w": jnp.ones((4,))}
  store.save(1, small, {"next_batch": 1}, force=True)
  store.wait()
  big = {"w": jnp.asarray(np.random.default_rng(0).random(200_000), jnp.float32)}  # ~800 KB
  previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
  try:
    with pytest.raises(checkpoints.CheckpointWriteError) as info:
      store.save(2, big, {"next_batch": 2}, force=True)
      store.wait()  # an async save's error surfaces here
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)
  message = str(info.value)
  assert "checkpoint write failed in" in message and "File too large" in message, message
  assert "the complete checkpoints are kept: steps [1]" in message
  assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["1"]
  again = checkpoints.CheckpointStore(directory, keep=1)
  state, data = again.restore_latest(small)
  assert data == {"next_batch": 1} and np.array_equal(np.asarray(state["w"]), np.ones(4))
  again.close()
