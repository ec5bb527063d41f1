"""--mode=sample: batch sampling from a trained checkpoint, and the sample writers the trainer
reuses for its periodic samples.

Inputs: config.sample.prompts_file (one prompt per line) and/or config.sample.images_dir (image
files). Without either: a few scenes of the synthetic dataset (config.data.name == 'synthetic'),
else unconditional image+caption pairs serve as prompts and images.
Outputs in config.sample.output_dir (default WORKDIR/samples/final):
  t2i/NNNNNN.png + t2i.jsonl   {"prompt", "image"}       generated image per prompt
  i2t/NNNNNN.png + i2t.jsonl   {"image", "caption"}      the (resized) input and its caption
  t2i_grid.png, i2t_grid.png   viewing grids with the text under each image
  captions.txt                 "file<TAB>caption" per input image
Paths in the manifests are relative to the manifest's directory. The model comes from
WORKDIR/config.json; decoding.*, sample.* and mesh.* come from the command line.
"""
import json
import logging
import os
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


def write_sample_grid(path, images, captions=None, columns=8, cell=None, text_lines=4):
  """Saves a grid PNG of uint8 images [N, H, W, 3] (or PIL), with each caption wrapped under its
  image when given. Returns the path."""
  images = [np.asarray(im.convert("RGB") if isinstance(im, Image.Image) else im, np.uint8)
            for im in images]
  if not images:
    raise ValueError("write_sample_grid: no images")
  size = int(cell or max(images[0].shape[0], 96))
  font = ImageFont.load_default()
  chars = max(size // 6, 8)
  text_h = 11 * text_lines if captions is not None else 0
  cols = min(columns, len(images))
  rows = -(-len(images) // cols)
  grid = Image.new("RGB", (cols * size, rows * (size + text_h)), (255, 255, 255))
  draw = ImageDraw.Draw(grid)
  for i, im in enumerate(images):
    x, y = (i % cols) * size, (i // cols) * (size + text_h)
    grid.paste(Image.fromarray(im).resize((size, size), Image.NEAREST), (x, y))
    if captions is not None:
      lines = textwrap.wrap(str(captions[i]), chars)[:text_lines]
      draw.multiline_text((x + 2, y + size + 1), "\n".join(lines), fill=(0, 0, 0), font=font,
                          spacing=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  grid.save(path)
  return path


def _batches(items, size):
  for i in range(0, len(items), size):
    yield i, items[i:i + size]


def _progress(total, desc, enabled):
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  return tqdm(total=total, desc=desc, disable=not enabled, unit="sample")


def write_samples(sampler, out_dir, prompts=(), images=(), *, image_names=None, seed=0,
                  batch_size=8, progress=True):
  """T2I for every prompt and I2T for every image (uint8 arrays or PIL), written to out_dir as
  described in the module docstring. Returns {"t2i": [rows], "i2t": [rows]}."""
  os.makedirs(out_dir, exist_ok=True)
  result = {"t2i": [], "i2t": []}
  if len(prompts):
    os.makedirs(os.path.join(out_dir, "t2i"), exist_ok=True)
    generated = []
    with _progress(len(prompts), "text->image", progress) as bar:
      for start, part in _batches(list(prompts), batch_size):
        for j, im in enumerate(sampler.text_to_image(part, seed=seed + start)):
          rel = f"t2i/{start + j:06d}.png"
          im.save(os.path.join(out_dir, rel))
          generated.append(np.asarray(im))
          result["t2i"].append({"prompt": part[j], "image": rel})
        bar.update(len(part))
    _write_jsonl(os.path.join(out_dir, "t2i.jsonl"), result["t2i"])
    write_sample_grid(os.path.join(out_dir, "t2i_grid.png"), generated, list(prompts))
  if len(images):
    os.makedirs(os.path.join(out_dir, "i2t"), exist_ok=True)
    prepared = sampler.prepare_images(images)
    names = list(image_names) if image_names is not None else [f"{i:06d}" for i in range(len(prepared))]
    with _progress(len(prepared), "image->text", progress) as bar:
      for start, part in _batches(prepared, batch_size):
        for j, caption in enumerate(sampler.image_to_text(part, seed=seed + start)):
          rel = f"i2t/{start + j:06d}.png"
          Image.fromarray(part[j]).save(os.path.join(out_dir, rel))
          result["i2t"].append({"image": rel, "caption": caption, "source": names[start + j]})
        bar.update(len(part))
    _write_jsonl(os.path.join(out_dir, "i2t.jsonl"), result["i2t"])
    with open(os.path.join(out_dir, "captions.txt"), "w", encoding="utf-8") as f:
      f.writelines(f"{r['source']}\t{r['caption']}\n" for r in result["i2t"])
    write_sample_grid(os.path.join(out_dir, "i2t_grid.png"), prepared,
                      [r["caption"] for r in result["i2t"]])
  return result


def _write_jsonl(path, rows):
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


def read_prompts(path):
  """Non-empty lines of a prompts file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.sample.prompts_file={path!r} does not exist")
  with open(path, encoding="utf-8") as f:
    prompts = [line.strip() for line in f if line.strip()]
  if not prompts:
    raise ValueError(f"config.sample.prompts_file={path!r} holds no prompts (only blank lines); "
                     "write one prompt per line, or leave the key empty for the default prompts")
  return prompts


def read_images(directory):
  """(names, list of uint8 RGB arrays) of the image files in a folder, sorted by name."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"config.sample.images_dir={directory!r} is not a directory")
  names = sorted(n for n in os.listdir(directory) if n.lower().endswith(IMAGE_EXTENSIONS))
  if not names:
    raise ValueError(f"config.sample.images_dir={directory!r} holds no {IMAGE_EXTENSIONS} files")
  images = []
  for n in names:
    path = os.path.join(directory, n)
    try:
      with Image.open(path) as im:
        images.append(np.asarray(im.convert("RGB"), np.uint8))
    except (OSError, ValueError) as e:  # PIL: UnidentifiedImageError, truncated file, ...
      raise ValueError(f"config.sample.images_dir: {path} is not a readable image "
                       f"({type(e).__name__}: {e}); remove or replace it") from e
  return names, images


def default_inputs(config, sampler, num=8, seed=0):
  """(prompts, images) when the config names none: synthetic scenes, else unconditional pairs."""
  if config.data.name == "synthetic":
    from magvlt_jax.data import synthetic  # pylint: disable=import-outside-toplevel
    rows = list(synthetic.examples(num, seed=10_000 + seed, size=int(config.vqgan.image_size)))
    return [r[2][0] for r in rows], [r[1] for r in rows]
  pairs = sampler.generate(num, seed=seed)
  return [c for _, c in pairs], [np.asarray(im) for im, _ in pairs]


COMMAND_LINE_SECTIONS = ("decoding", "sample", "mesh")


def merge_config(cli_config, workdir):
  """The trained config (WORKDIR/config.json) with decoding/sample/mesh (and the seed) from the
  command line, so --config.decoding.x / --config.sample.x overrides apply to the trained model."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from magvlt_jax import checkpoints  # pylint: disable=import-outside-toplevel
  if not os.path.exists(os.path.join(workdir, "config.json")):
    logging.warning("sample: no %s/config.json; using the command-line config as is", workdir)
    return cli_config
  merged = checkpoints.load_config(workdir)
  with merged.unlocked():
    for section in COMMAND_LINE_SECTIONS:
      if section in cli_config:
        merged[section] = ml_collections.ConfigDict(cli_config[section].to_dict())
    merged.seed = cli_config.get("seed", merged.get("seed", 0))
  return merged


def run(config, workdir):
  """The --mode=sample job; returns the output directory."""
  from magvlt_jax import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  config = merge_config(config, workdir)
  s = config.sample
  out_dir = s.output_dir or os.path.join(workdir, "samples", "final")
  # Inputs first: a bad prompt file or image fails before the model loads or anything is written.
  prompts = read_prompts(s.prompts_file) if s.prompts_file else []
  names, images = read_images(s.images_dir) if s.images_dir else (None, [])
  sampler = sampler_lib.Sampler.from_checkpoint(workdir, config=config)  # on every process:
  # orbax's restore may synchronize the processes. Sampling is process-local and deterministic,
  # so on a multi-process run process 0 alone samples and writes (each output once).
  import jax  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    logging.info("sample: process %d of %d: process 0 writes the samples to %s",
                 jax.process_index(), jax.process_count(), out_dir)
    return out_dir
  if not prompts and not images:
    prompts, images = default_inputs(config, sampler, int(config.train.get("num_sample_prompts", 8)),
                                     int(config.seed))
  result = write_samples(sampler, out_dir, prompts, images, image_names=names,
                         seed=int(config.seed), batch_size=int(s.batch_size))
  logging.info("sample: %d images, %d captions written to %s", len(result["t2i"]),
               len(result["i2t"]), out_dir)
  return out_dir
