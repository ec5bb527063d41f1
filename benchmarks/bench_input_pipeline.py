"""Images/s of the real training input pipeline (prepared COCO-format dataset -> grain -> JPEG
decode with PIL draft mode -> DALL-E crop + resize -> MixSel halves -> BPE with dropout -> batch)
for several reader-thread counts, beside what one pod host must deliver for `base`.

  python benchmarks/bench_input_pipeline.py --workdir=/tmp/bench_pipe --images=300 \
      --threads=1,2 --batches=8 --batch=32

Builds WORKDIR/coco (640x480 JPEGs of natural content: random crops, flips, scales and colour
shifts of the scikit-image sample photos, which ship offline; procedural textures without
scikit-image), prepares the TFDS dataset once, trains a small BPE model on the captions and times
`pipeline.create_train_iterator` batches after one warm-up batch. The requirement per host is
global batch / hosts x steps/s, with steps/s from the analytic train FLOPs of base
(`aot_compile.analytic_train_flops`, which leaves out the VQ-GAN encode and the extra
UnrollMask/MixSel passes, so it overstates steps/s: a safe requirement) at --mfu of peak.
Prints one JSON line.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from magvlt_jax import configs_util  # noqa: E402
from magvlt_jax import text as text_lib  # noqa: E402
from magvlt_jax.data import builders  # noqa: E402
from magvlt_jax.data import pipeline  # noqa: E402
from magvlt_jax.tools import aot_compile  # noqa: E402

_PODS = ("v4-32", "v5p-128", "v5e-256")
_CHIPS_PER_HOST = 4  # v4, v5p and multi-host v5e slices: 4 chips per TPU VM host
_WORDS = ("a dog", "a cat", "a man", "a woman", "two people", "a red bus", "a plate of food",
          "a cup of coffee", "a rocket", "a horse", "a bird", "a boat")
_PLACES = ("on a table", "in a park", "near the water", "on a street", "in a kitchen",
           "under a blue sky", "next to a building", "in the snow")


def _sources(rng):
  try:
    from skimage import data  # pylint: disable=import-outside-toplevel
    names = ("astronaut", "coffee", "chelsea", "rocket", "cat", "hubble_deep_field",
             "immunohistochemistry", "motorcycle_left", "retina", "colorwheel")
    out = []
    for n in names:
      try:
        img = np.asarray(getattr(data, n)())
      except Exception:  # pylint: disable=broad-except  (a sample missing from this version)
        continue
      if img.ndim == 2:
        img = np.stack([img] * 3, -1)
      out.append(Image.fromarray(img[..., :3].astype(np.uint8)))
    if out:
      return out, "skimage sample photos"
  except ImportError:
    pass
  # Procedural: smooth random fields at several scales (JPEG-compresses like photos, unlike noise).
  out = []
  for _ in range(8):
    field = sum(np.asarray(Image.fromarray(rng.integers(0, 255, (s, s, 3), dtype=np.uint8))
                           .resize((640, 640), Image.BICUBIC), np.float32) / (2 ** k)
                for k, s in enumerate((4, 16, 64, 256)))
    out.append(Image.fromarray(np.clip(field / 1.9, 0, 255).astype(np.uint8)))
  return out, "procedural textures"


def make_coco_folder(root: str, num_images: int, seed: int = 0) -> str:
  """root/train2014/*.jpg (640x480) + root/annotations/captions_train2014.json; -> content kind."""
  rng = np.random.default_rng(seed)
  sources, kind = _sources(rng)
  os.makedirs(os.path.join(root, "train2014"), exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  images, annotations = [], []
  for i in range(num_images):
    src = sources[i % len(sources)]
    scale = rng.uniform(1.3, 2.5)  # upscale then crop: every image differs
    big = src.resize((int(640 * scale), int(640 * scale * src.height / src.width) + 480))
    x, y = rng.integers(0, big.width - 640 + 1), rng.integers(0, big.height - 480 + 1)
    img = np.asarray(big.crop((x, y, x + 640, y + 480)), np.float32)
    img = img * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20, 3)
    if rng.random() < 0.5:
      img = img[:, ::-1]
    name = f"COCO_train2014_{i:012d}.jpg"
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        os.path.join(root, "train2014", name), quality=90)
    images.append({"id": i, "file_name": name, "height": 480, "width": 640})
    for k in range(5):
      caption = f"{_WORDS[rng.integers(len(_WORDS))]} {_PLACES[rng.integers(len(_PLACES))]}"
      annotations.append({"id": 5 * i + k, "image_id": i, "caption": caption})
  with open(os.path.join(root, "annotations", "captions_train2014.json"), "w") as f:
    json.dump({"images": images, "annotations": annotations}, f)
  return kind


def host_requirements(config, mfu: float) -> dict:
  """{pod: {hosts, steps_per_sec, images_per_sec_per_host}} for config's global batch."""
  batch = int(config.data.global_batch_size)
  flops = aot_compile.analytic_train_flops(config, batch)
  out = {}
  for pod in _PODS:
    topo, _, _, peak_tflops = aot_compile.resolve_topology(pod)
    chips = math.prod(int(x) for x in topo.split(":")[1].split("x"))
    hosts = max(1, chips // _CHIPS_PER_HOST)
    steps_per_sec = chips * peak_tflops * 1e12 * mfu / flops
    out[pod] = {"chips": chips, "hosts": hosts, "steps_per_sec": round(steps_per_sec, 3),
                "images_per_sec_per_host": round(batch / hosts * steps_per_sec, 1)}
  return out


def time_pipeline(config, tokenizer, data_dir: str, threads: int, batches: int) -> float:
  config.data.num_workers = threads
  it = pipeline.create_train_iterator(config, tokenizer, data_dir=data_dir, process_index=0,
                                      process_count=1)
  first = next(it)  # warm-up: thread pool, file handles
  assert first["image"].shape[0] == int(config.data.global_batch_size)
  t0 = time.perf_counter()
  for _ in range(batches):
    next(it)
  return batches * int(config.data.global_batch_size) / (time.perf_counter() - t0)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--workdir", default="/tmp/bench_input_pipeline")
  p.add_argument("--images", type=int, default=300)
  p.add_argument("--threads", default="1,2", help="comma-separated reader-thread counts")
  p.add_argument("--batches", type=int, default=8, help="timed batches per setting")
  p.add_argument("--batch", type=int, default=32, help="host batch size of the timed pipeline")
  p.add_argument("--variant", default="base", help="configs/magvlt.py variant (image size, BPE)")
  p.add_argument("--mfu", type=float, default=0.5)
  args = p.parse_args(argv)
  config = configs_util.load_config(f"configs/magvlt.py:{args.variant}")
  need = host_requirements(config, args.mfu)
  root = os.path.join(args.workdir, "coco")
  kind = "existing folder"
  if not os.path.exists(os.path.join(root, "annotations", "captions_train2014.json")):
    kind = make_coco_folder(root, args.images)
  config.data.name, config.data.path = "coco_captions_folder", root
  config.data.global_batch_size = args.batch
  data_dir = os.path.join(args.workdir, "data")
  builders.prepare(config, data_dir)
  spm = os.path.join(args.workdir, "spm.model")
  captions = [f"{w} {pl}" for w in _WORDS for pl in _PLACES]
  tokenizer = (text_lib.TextTokenizer.load(spm) if os.path.exists(spm) else
               text_lib.TextTokenizer.train(captions * 20, vocab_size=200, model_path=spm))
  rates = {int(n): round(time_pipeline(config, tokenizer, data_dir, int(n), args.batches), 1)
           for n in args.threads.split(",")}
  print(json.dumps({"images_per_sec_by_threads": rates, "cpu_count": os.cpu_count(),
                    "content": kind, "image_size": int(config.data.image_size),
                    "bpe_dropout": float(config.text.bpe_dropout), "host_batch": args.batch,
                    "per_host_requirement_at_mfu": args.mfu, "requirement": need,
                    "cores_needed_per_host_at_1_thread_rate": {
                        pod: math.ceil(v["images_per_sec_per_host"] / max(rates[min(rates)], 1e-9))
                        for pod, v in need.items()}}))


if __name__ == "__main__":
  main()
