"""Periodic sample grids during training: T2I images for a few eval prompts and I2T captions for
a few eval images, through the one decoding implementation (magvlt_jax.decoding), written to
WORKDIR/samples/step_N/ (t2i.png + t2i.txt, i2t_images.png + i2t.txt) and to TensorBoard.
"""
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from magvlt_jax import decoders


def sample_fns(setup):
  """Jitted (params, tokenizer_params, ..., key) -> outputs through the config's decoder and
  image tokenizer; built once per Setup."""
  fns = getattr(setup, "_sample_fns", None)
  if fns is not None:
    return fns
  tok, image_tok = setup.text_tokenizer, setup.image_tokenizer
  decoder = decoders.create(setup.config, setup.model, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
  _, t2i_fn = decoder.task_fn("t2i")
  _, i2t_fn = decoder.task_fn("i2t")
  no_guidance = jnp.float32(0.0)

  @jax.jit
  def t2i(params, tok_params, text, text_length, key):
    out = t2i_fn(params, key, no_guidance, text, text_length)
    return image_tok.decode(tok_params, out.image_codes)

  @jax.jit
  def i2t(params, tok_params, images, key):
    codes = image_tok.encode(tok_params, images)
    out = i2t_fn(params, key, no_guidance, codes)
    return out.text_ids, image_tok.decode(tok_params, codes)

  setup._sample_fns = (t2i, i2t)  # pylint: disable=protected-access
  return setup._sample_fns  # pylint: disable=protected-access


def _prompt_batch(config, workdir, tokenizer, n):
  """The first n eval examples (fixed, so grids are comparable across steps)."""
  from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  cache = os.path.join(workdir, "samples", "prompts.npz")
  if os.path.exists(cache):
    with np.load(cache) as f:
      return {k: f[k] for k in f.files}
  it = pipeline.create_eval_iterator(config, tokenizer, workdir=workdir, batch_size=n)
  batch = next(iter(it))
  out = {"image": batch["image"], "text": batch["text"], "text_length": batch["text_length"]}
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    np.savez(cache, **out)
  return out


def image_grid(images, columns: int = 4, pad: int = 2) -> np.ndarray:
  """uint8 [N, H, W, 3] -> one uint8 grid image (white padding)."""
  images = np.asarray(images)
  n, h, w, c = images.shape
  rows = -(-n // columns)
  grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = img
  return grid


def _save_png(path, image):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  Image.fromarray(np.asarray(image, np.uint8)).save(path)


def write_samples(config, workdir, setup, params, tokenizer, step: int, writer, final: bool = False):
  """Generates and writes the step's sample grids; returns {'prompts', 'captions', 'references'}."""
  n = int(config.train.num_sample_prompts)
  batch = _prompt_batch(config, workdir, tokenizer, n)
  t2i, i2t = sample_fns(setup)
  key = jax.random.key(int(config.seed) + 7)
  k1, k2 = jax.random.split(key)
  images = np.asarray(jax.device_get(t2i(params, setup.tokenizer_params, jnp.asarray(batch["text"]),
                                          jnp.asarray(batch["text_length"]), k1)))
  text_ids, recon = jax.device_get(i2t(params, setup.tokenizer_params, jnp.asarray(batch["image"]), k2))
  prompts = tokenizer.decode(batch["text"])
  captions = tokenizer.decode(np.asarray(text_ids))
  result = {"prompts": prompts, "captions": captions, "images": images}
  if config.data.name == "synthetic":
    result["scores"] = synthetic_scores(prompts, captions, images, np.asarray(recon))
  if jax.process_index() != 0:
    return result
  out_dir = os.path.join(workdir, "samples", f"step_{step}")
  os.makedirs(out_dir, exist_ok=True)
  _save_png(os.path.join(out_dir, "t2i.png"), image_grid(images))
  _save_png(os.path.join(out_dir, "i2t_images.png"), image_grid(batch["image"]))
  with open(os.path.join(out_dir, "t2i.txt"), "w") as f:
    f.write("".join(f"{i}: {p}\n" for i, p in enumerate(prompts)))
  with open(os.path.join(out_dir, "i2t.txt"), "w") as f:
    f.write("".join(f"{i}: {c}\n" for i, c in enumerate(captions)))
  writer.write_images(step, {"samples/t2i": image_grid(images),
                             "samples/i2t_inputs": image_grid(batch["image"]),
                             "samples/i2t_inputs_vq": image_grid(recon)})
  writer.write_texts(step, {
      "samples/t2i_prompts": " | ".join(f"{i}: {p}" for i, p in enumerate(prompts)),
      "samples/i2t_captions": " | ".join(f"{i}: {c}" for i, c in enumerate(captions))})
  if "scores" in result:
    scores = result["scores"]
    writer.write_scalars(step, {f"samples/{k}": v for k, v in scores.items()})
    with open(os.path.join(out_dir, "scores.txt"), "w") as f:
      f.write("".join(f"{k}: {v:.3f}\n" for k, v in sorted(scores.items())))
    rates = " | ".join(f"{label} " + " ".join(f"{k} {scores[f'{name}_{k}']:.2f}"
                                              for k in ("color", "shape", "place", "all"))
                       for name, label in (("t2i", "T2I"), ("i2t", "I2T"), ("tokenizer", "tokenizer")))
    logging.info("samples at step %d match their prompts/images (synthetic data, %d each): %s",
                 step, n, rates)
    logging.info("samples at step %d, attributes on the right object: %s", step,
                 binding_summary(scores))
  logging.info("%ssamples at step %d written to %s", "final " if final else "", step, out_dir)
  return result


def synthetic_scores(prompts, captions, images, recon) -> dict:
  """Fraction of samples whose colour / shape / place (and all three) match, on the built-in
  synthetic data: T2I images are read back with synthetic.read_scene and compared with the
  prompt; I2T captions are parsed and compared with the image's reference caption (the prompt of
  the same eval example). `tokenizer_*` scores the VQ-GAN reconstructions of the I2T inputs the same
  way as T2I images: the ceiling T2I can reach with this tokenizer. The `*_obj_*` / `*_triple_*`
  keys score every object of a scene (synthetic.binding_scores): right colours on swapped objects
  count as wrong."""
  from magvlt_jax.data import synthetic  # pylint: disable=import-outside-toplevel
  expected = [synthetic.parse_caption(p) for p in prompts]
  found = {"t2i": [synthetic.read_scene(img) for img in images],
           "i2t": [(synthetic.parse_caption(c) or [None])[0] for c in captions],
           "tokenizer": [synthetic.read_scene(img) for img in recon]}
  out = {f"{name}_{k}": v for name, objs in found.items()
         for k, v in synthetic.match_rates(expected, objs).items()}
  if not any(expected):  # no prompt names a whole object (e.g. cut by text_length): no binding
    return out
  # Binding (several objects per scene): every object read back, attributes checked per object.
  found_all = {"t2i": [synthetic.read_objects(img) for img in images],
               "i2t": [synthetic.parse_caption(c) for c in captions],
               "tokenizer": [synthetic.read_objects(img) for img in recon]}
  for name, objs in found_all.items():
    out.update({f"{name}_{k}": v for k, v in synthetic.binding_scores(expected, objs).items()})
  return out


def binding_summary(scores: dict) -> str:
  """One log line of the binding scores (per-object colour in place, triple F1)."""
  parts = []
  for name, label in (("t2i", "T2I"), ("i2t", "I2T"), ("tokenizer", "tokenizer")):
    keys = [("obj colour-in-place", "obj_color_place"), ("triple F1", "triple_f1"),
            ("2-obj colour-in-place", "obj_color_place_2obj"), ("2-obj triple F1", "triple_f1_2obj")]
    parts.append(f"{label} " + " ".join(f"{text} {scores[f'{name}_{k}']:.2f}"
                                        for text, k in keys if f"{name}_{k}" in scores))
  return " | ".join(parts)
