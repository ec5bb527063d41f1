"""Config loading (`path:variant`) and start-up validation errors that name the key."""
import ml_collections
import pytest

from magvlt_jax.configs_util import load_config, validate_config


@pytest.mark.parametrize("variant", ["tiny", "base", "large"])
def test_shipped_variants_are_valid(variant):
  config = validate_config(load_config(f"configs/magvlt.py:{variant}"))
  assert config.variant == variant
  assert config.sequence.text_length == config.model.length_classes


def test_load_config_from_other_cwd_and_errors(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert load_config("configs/magvlt.py:tiny").model.embed_dim == 128
  assert load_config("configs/vqgan.py:tiny").codebook_size == 256
  with pytest.raises(ValueError, match="not found"):
    load_config("configs/nope.py:tiny")
  with pytest.raises(ValueError, match="unknown variant"):
    load_config("configs/magvlt.py:huge")


def _set(config, key, value):
  """Sets config[key], first detaching its section from FieldReferences shared with others."""
  *parents, leaf = key.split(".")
  section = parents[0] if parents else None
  if section is not None:
    config[section] = ml_collections.ConfigDict(config[section].to_dict())
  node = config
  for p in parents:
    node = node[p]
  with node.ignore_type():
    setattr(node, leaf, value)


BAD_VALUES = [
    ("model.embed_dim", 130, "model.embed_dim"),  # not divisible by num_heads
    ("model.num_layers", 0, "model.num_layers"),
    ("model.dtype", "fp8", "model.dtype"),
    ("model.param_dtype", "half", "model.param_dtype"),
    ("model.attention_impl", "flash", "model.attention_impl"),
    ("model.dropout_rate", 1.5, "model.dropout_rate"),
    ("sequence.image_tokens", 63, "sequence.image_tokens"),
    ("sequence.image_vocab_size", 512, "sequence.image_vocab_size"),
    ("vqgan.image_size", 60, "vqgan.image_size"),
    ("vqgan.dtype", "int8", "vqgan.dtype"),
    ("vqgan.norm_type", "batch", "vqgan.norm_type"),
    ("train.task_weights", (8.0, 1.0), "train.task_weights"),
    ("train.task_weights", (8.0, -1.0, 1.0), "train.task_weights"),
    ("train.task_weights", (0.0, 0.0, 0.0), "train.task_weights"),
    ("train.image_mask_schedule", "cubic", "train.image_mask_schedule"),
    ("train.cache_image_codes", "sometimes", "train.cache_image_codes"),
    ("train.pretokenized", "yes", "train.pretokenized"),
    ("train.pretokenized_crops", 0, "train.pretokenized_crops"),
    ("train.text_mask_schedule", "sqrt", "train.text_mask_schedule"),
    ("train.label_smoothing", 1.0, "train.label_smoothing"),
    ("decoding.order", "spiral", "decoding.order"),
    ("decoding.image_temperature", (1.0,), "decoding.image_temperature"),
    ("decoding.length_probe_text_length", 25, "decoding.length_probe_text_length"),
    ("mesh.strategy", "pipeline", "mesh.strategy"),
    ("mesh.data", 0, "mesh.data"),
    ("mesh.fsdp", -2, "mesh.fsdp"),
    ("mesh.tensor", 2, "mesh.tensor"),  # strategy 'data' puts nothing on 'tensor'
    ("data.global_batch_size", 0, "data.global_batch_size"),
    ("data.name", "imagenet", "data.name"),
    ("data.name", "coco_captions_folder", "data.path"),  # needs a path
    ("optimizer.peak_lr", -1e-3, "optimizer.peak_lr"),
    ("model.init_std", 0.0, "model.init_std"),
]


@pytest.mark.parametrize("key,value,named", BAD_VALUES)
def test_bad_value_names_the_key(key, value, named):
  config = load_config("configs/magvlt.py:tiny")
  _set(config, key, value)
  with pytest.raises(ValueError, match=r"config\." + named.replace(".", r"\.")):
    validate_config(config)


def test_text_length_must_match_length_classes():
  config = load_config("configs/magvlt.py:tiny")
  _set(config, "sequence.text_length", 32)  # detached from model.length_classes (24)
  with pytest.raises(ValueError, match=r"config\.sequence\.text_length=32 .*model\.length_classes=24"):
    validate_config(config)


def test_error_suggests_the_fix():
  config = load_config("configs/magvlt.py:tiny")
  config.sequence.image_tokens = 100
  with pytest.raises(ValueError, match="set it to 64"):
    validate_config(config)


def test_validation_names_agree_with_the_implementations():
  from magvlt_jax import configs_util, decoding_image, parallel
  assert set(configs_util.DECODING_ORDERS) == set(decoding_image.ORDERS)
  assert set(configs_util.MESH_STRATEGIES) == set(parallel.STRATEGIES)


def test_apply_override_parses_literals_and_keeps_strings():
  from magvlt_jax.configs_util import apply_override
  config = load_config("configs/magvlt.py:tiny")
  apply_override(config, "decoding.image_temperature=(1.0, 0.3)")
  apply_override(config, "vqgan.norm_type=group")
  apply_override(config, "train.num_steps=7")
  assert config.decoding.image_temperature == (1.0, 0.3)
  assert config.vqgan.norm_type == "group" and config.train.num_steps == 7
  with pytest.raises(SystemExit, match="expected key=value"):
    apply_override(config, "train.num_steps")
