"""TFDS builders of image-caption datasets (array_record; buildable and readable without TF).

Every builder stores the same features: `image` (encoded PNG/JPEG bytes in a scalar object Tensor,
so no TF image codec is needed), `captions` (one or more strings), `image_id` (int64).

  synthetic             procedurally drawn scenes (data/synthetic.py); config.data.synthetic
  coco_captions_folder  COCO layout: DIR/annotations/captions_<split>.json + DIR/<split>/ images
  image_text_list       a JSONL or CSV file of {image path, caption} rows

`get_builder(config, data_dir)` returns the builder for config.data; `prepare(config, data_dir)`
builds it if needed and returns the counts of converted/skipped records. Datasets live in
`data_dir/<name>/<config name>/<version>/`; the config name encodes what the data depends on
(synthetic sizes and seed, or the source path), so a changed config never reads stale data.
"""
import dataclasses
import inspect
import json
import logging
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
import tqdm

from magvlt_jax.data import synthetic as synthetic_lib
from magvlt_jax.data import transforms
from magvlt_jax.data import validate

VERSION = "1.3.0"  # 1.1.0: synthetic objects drawn larger (synthetic.OBJECT_RADIUS); 1.2.0: larger squares;
# 1.3.0: two-object scenes get distinct colours and captions in both object orders
STATS_FILE = "prepare_stats.json"
SHOW_PROGRESS = None  # None: progress bars on terminals only; tools/prepare_data sets True


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(), dtype=np.object_),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "image_id": np.int64,
  })


class ImageCaptionBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared parts: features, array_record, counting of converted/skipped records."""
  VERSION = tfds.core.Version(VERSION)

  def __init__(self, *, limits: validate.Limits | None = None, **kwargs):
    self.limits = limits or validate.Limits()
    self.counter = validate.Counter()
    kwargs.setdefault("file_format", "array_record")
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds' default probes importlib_resources (absent on some machines); our file is the answer.
    return epath.Path(inspect.getfile(cls))

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=features(),
                                 description=(self.__doc__ or "").strip())

  def _record(self, key, image_bytes, captions, image_id, where):
    """-> (key, example) or None (skipped and counted)."""
    caps = validate.clean_captions(captions, self.limits, self.counter, where)
    if not caps:
      self.counter.add("no_caption", where)
      return None
    data = validate.check_image(image_bytes, self.limits, self.counter, where)
    if data is None:
      return None
    self.counter.add("kept")
    return key, {"image": data, "captions": caps, "image_id": int(image_id)}


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
  num_train: int = 2000
  num_eval: int = 200
  image_size: int = 64
  captions_per_image: int = 3
  max_objects: int = 1
  seed: int = 0


class Synthetic(ImageCaptionBuilder, skip_registration=True):
  """Coloured shapes in named places with matching captions (the tiny configs' default)."""
  name = "synthetic"
  BUILDER_CONFIGS = [SyntheticConfig(name="default")]

  def _split_generators(self, dl_manager):
    del dl_manager
    c = self.builder_config
    return {"train": self._generate_examples(c.num_train, split_seed(c, "train")),
            "validation": self._generate_examples(c.num_eval, split_seed(c, "validation"))}

  def _generate_examples(self, num, seed):
    c = self.builder_config
    examples = synthetic_lib.examples(num, seed, c.image_size, c.captions_per_image,
                                      c.max_objects)
    for i, image, caps, _ in progress_bar(examples, num, "synthetic: drawing scenes"):
      self.counter.add("kept")
      yield i, {"image": transforms.encode_png(image), "captions": caps, "image_id": i}


def split_seed(c: SyntheticConfig, split: str) -> int:
  return c.seed if split == "train" else c.seed + 1_000_003  # disjoint scene streams


def synthetic_config(config) -> SyntheticConfig:
  s = config.data.synthetic
  kw = dict(num_train=int(s.num_train), num_eval=int(s.num_eval), image_size=int(s.image_size),
            captions_per_image=int(s.captions_per_image),
            max_objects=int(s.get("max_objects", 1)), seed=int(s.get("seed", 0)))
  for k, v in kw.items():
    if v < (0 if k in ("seed", "num_eval") else 1):
      raise ValueError(f"config.data.synthetic.{k}={v} must be positive")
  name = ("n{num_train}_{num_eval}_s{image_size}_c{captions_per_image}_o{max_objects}"
          "_seed{seed}").format(**kw)
  return SyntheticConfig(name=name, **kw)


def default_data_dir(config, workdir: str | None = None) -> str:
  if config.data.data_dir:
    return os.path.expanduser(config.data.data_dir)
  if workdir:
    return os.path.join(workdir, "data")
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))


def get_builder(config, data_dir: str) -> ImageCaptionBuilder:
  """The (not necessarily prepared) builder for config.data.name."""
  name = config.data.name
  limits = validate.limits_from_config(config)
  if name == "synthetic":
    return Synthetic(config=synthetic_config(config), data_dir=data_dir, limits=limits)
  if name in ("coco_captions_folder", "image_text_list"):
    from magvlt_jax.data import folders  # pylint: disable=import-outside-toplevel
    cls = folders.CocoCaptionsFolder if name == "coco_captions_folder" else folders.ImageTextList
    return cls(config=cls.config_for(config.data.path), data_dir=data_dir, limits=limits)
  raise ValueError(f"config.data.name={name!r}: expected one of 'synthetic', "
                   "'coco_captions_folder', 'image_text_list'")


def prepare(config, data_dir: str, builder: ImageCaptionBuilder | None = None) -> dict:
  """Builds the dataset unless it exists; -> {'counts': {...}, 'splits': {split: n}, 'path'}."""
  builder = builder or get_builder(config, data_dir)
  stats_path = os.path.join(builder.data_dir, STATS_FILE)
  if not builder.is_prepared():
    logging.info("preparing %s into %s", config.data.name, builder.data_dir)
    try:
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP))
    except AssertionError as e:  # tfds: "No examples were yielded" for a split
      builder.counter.log(f"prepare {config.data.name}: converted/skipped records")
      raise ValueError(f"preparing {config.data.name} from {config.data.get('path', '')!r}: {e} "
                       f"(every record of the split was skipped? counts: "
                       f"{builder.counter.as_dict()})") from e
    counts, examples = builder.counter.as_dict(), dict(builder.counter.examples)
    builder.counter.log(f"prepare {config.data.name}: converted/skipped records")
    with open(stats_path, "w") as f:
      json.dump({"counts": counts, "examples": examples}, f, indent=1)
  elif os.path.exists(stats_path):
    with open(stats_path) as f:
      stored = json.load(f)
    counts, examples = stored["counts"], stored.get("examples", {})
  else:
    counts, examples = {}, {}
  splits = {k: v.num_examples for k, v in builder.info.splits.items()}
  return {"counts": counts, "examples": examples, "splits": splits,
          "path": os.fspath(builder.data_dir)}


def progress_bar(iterable, total: int, desc: str):
  """tqdm over source records: shown on terminals, or always when SHOW_PROGRESS is True."""
  return tqdm.tqdm(iterable, total=total, unit="img", desc=desc,
                   disable=None if SHOW_PROGRESS is None else not SHOW_PROGRESS)
