"""The evaluate job's tasks, run in one ordered pass over the validation split.

Per batch (valid rows only, until each task has its config.eval.num_* examples):
  t2i        generate from each image's first caption (candidates reranked per config.decoding);
             image metrics against the real validation images, CLIP score against the caption
  i2t        caption each image (length prediction + decoding.i2t_steps, eval.text_temperature);
             caption metrics against all reference captions
  inpaint    regenerate the centre eval.inpaint_size^2 codes given the rest and the first caption;
             image metrics against the originals
  infill     regenerate the middle half of the first caption given the image and the rest;
             caption metrics against all reference captions
  tokenizer  VQGAN reconstruction: PSNR, SSIM, codebook usage / perplexity, rFID / proxy
The PRNG key of task t, batch b is fold_in(fold_in(PRNGKey(eval.seed), t), b): reproducible and
independent of how many examples the other tasks take.
"""
import json
import logging
import os
import time
from typing import Any, Dict, List

import jax
import numpy as np

from magvlt_jax import decoding
from magvlt_jax.evaluation import image_eval
from magvlt_jax.evaluation import report as rep

TASKS = ("t2i", "i2t", "inpaint", "infill", "tokenizer")
_COUNT_KEYS = {"t2i": "num_t2i", "i2t": "num_i2t", "inpaint": "num_inpaint",
               "infill": "num_infill", "tokenizer": "num_recon"}


def task_counts(config) -> Dict[str, int]:
  return {t: int(config.eval.get(k, 0)) for t, k in _COUNT_KEYS.items()}


def task_key(seed: int, task: str, batch_index: int):
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), TASKS.index(task)),
                            batch_index)


def eval_batches(config, tokenizer, workdir: str):
  """Valid rows of the ordered eval split, as host-local numpy batches."""
  from magvlt_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  # Every process evaluates the whole split (metrics need all examples); process 0 writes.
  it = pipeline.create_eval_iterator(config, tokenizer, workdir=workdir, process_index=0,
                                     process_count=1, batch_size=int(config.eval.batch_size))
  for batch in it:
    valid = np.asarray(batch.get("valid", np.ones(len(batch["image"]), bool)))
    if not valid.any():
      return
    rows = np.flatnonzero(valid)
    yield {k: ([v[i] for i in rows] if isinstance(v, list) else np.asarray(v)[valid])
           for k, v in batch.items()}


def _take(batch, n: int):
  return {k: v[:n] for k, v in batch.items()}


def centre_region(n_img: int, size: int) -> np.ndarray:
  """bool [n_img]: the centre size x size square of the code grid (paper: 8x8 of 16x16)."""
  try:
    return decoding.centre_region(n_img, size)
  except ValueError as e:
    raise ValueError(f"config.eval.inpaint_size={size}: {e}") from e


class Accumulator:
  """Collects per-task outputs over batches, then turns them into metrics."""

  def __init__(self, config, bank: "image_eval.FeatureBank", num_grid: int):
    self.config, self.bank, self.num_grid = config, bank, num_grid
    self.counts = {t: 0 for t in TASKS}
    self.captions = {"i2t": ([], []), "infill": ([], [])}  # (references, candidates)
    self.grids: Dict[str, List[np.ndarray]] = {}
    self.samples: Dict[str, List[Dict[str, Any]]] = {"i2t": [], "infill": []}
    self.recon = {"psnr": [], "ssim": [], "codes": []}
    self.real_added: Dict[int, int] = {}

  def add_grid(self, name: str, images):
    kept = self.grids.setdefault(name, [])
    room = self.num_grid - sum(len(x) for x in kept)
    if room > 0:
      kept.append(np.asarray(images[:room]))

  def add_captions(self, task, batch, candidates, extra=None):
    refs, cands = self.captions[task]
    refs.extend([list(c) for c in batch["captions"]])
    cands.extend(candidates)
    room = self.num_grid - len(self.samples[task])
    for i in range(min(room, len(candidates))):
      row = {"image_id": int(batch["image_id"][i]), "candidate": candidates[i],
             "references": list(batch["captions"][i])}
      if extra is not None:
        row.update(extra[i])
      self.samples[task].append(row)
    self.counts[task] += len(candidates)


def run_batches(config, sampler, acc: Accumulator, batches, progress):
  """Feeds each batch to the tasks that still need examples."""
  need = task_counts(config)
  seed = int(config.eval.seed)
  region = centre_region(int(config.sequence.image_tokens), int(config.eval.inpaint_size))
  temperature = float(config.eval.text_temperature)
  for b, batch in enumerate(batches):
    _add_real(config, acc, batch)
    for task in TASKS:
      n = min(need[task] - acc.counts[task], len(batch["image"]))
      if n <= 0:
        continue
      part, key = _take(batch, n), task_key(seed, task, b)
      first = [c[0] for c in part["captions"]]
      if task == "t2i":
        images = _pixels(sampler.text_to_image(first, key=key))
        acc.bank.add("t2i", images, captions=first, blur=True)
        acc.add_grid("t2i", np.concatenate([part["image"], images], axis=2))
      elif task == "i2t":
        acc.add_captions("i2t", part, sampler.image_to_text(
            part["image"], key=key, text_temperature=temperature))
      elif task == "inpaint":
        images = _pixels(sampler.inpaint(part["image"], first, region=region, key=key))
        acc.bank.add("inpaint", images)
        acc.add_grid("inpaint", np.concatenate([part["image"], images], axis=2))
      elif task == "infill":
        filled = sampler.infill(part["image"], first, key=key, text_temperature=temperature)
        acc.add_captions("infill", part, filled, extra=[{"given": c} for c in first])
      else:
        _reconstruct(sampler, acc, part)
      if task not in ("i2t", "infill"):
        acc.counts[task] += n
      progress.update(n)
    if all(acc.counts[t] >= need[t] for t in TASKS):
      break


def real_counts(config) -> Dict[int, bool]:
  """{N: blurred copy needed} for the real-image sets "real_N" the image tasks compare against."""
  need = task_counts(config)
  out = {}
  for task in ("t2i", "inpaint", "tokenizer"):
    if need[task] > 0:
      out[need[task]] = out.get(need[task], False) or task == "t2i"
  return out


def _add_real(config, acc, batch):
  """Real set "real_N" = the first N validation images (one copy, shared by tasks with equal N)."""
  for n, blur in real_counts(config).items():
    k = min(n - acc.real_added.get(n, 0), len(batch["image"]))
    if k > 0:
      acc.bank.add_real(n, batch["image"][:k], blur=blur)
      acc.real_added[n] = acc.real_added.get(n, 0) + k


def _pixels(images) -> np.ndarray:
  return np.stack([np.asarray(im, np.uint8) for im in images])


def _reconstruct(sampler, acc, part):
  codes = sampler.encode_images(part["image"])
  recon = sampler.decode_codes(codes)
  acc.recon["psnr"].extend(image_eval.psnr(part["image"], recon))
  acc.recon["ssim"].extend(image_eval.ssim(part["image"], recon))
  acc.recon["codes"].append(np.asarray(codes).reshape(-1))
  acc.bank.add("recon", recon)
  acc.add_grid("tokenizer", np.concatenate([part["image"], recon], axis=2))


def caption_results(config, acc: Accumulator) -> Dict[str, Dict[str, Any]]:
  """Caption metrics of i2t and infill with one METEOR JVM; skipped entries say why."""
  from magvlt_jax.evaluation import caption_metrics  # pylint: disable=import-outside-toplevel
  out = {}
  todo = {t: acc.captions[t] for t in ("i2t", "infill") if acc.counts[t] > 0}
  for task in ("i2t", "infill"):
    if task not in todo:
      out[task] = {m: rep.skipped(f"config.eval.{_COUNT_KEYS[task]}=0 (or no validation data)")
                   for m in rep.CAPTION_METRICS}
  if not todo:
    return out
  try:
    scorer = caption_metrics.CaptionScorer(str(config.eval.spice_corenlp_jar))
  except caption_metrics.JavaNotFoundError as e:
    logging.warning("evaluate: caption metrics skipped: %s", e)
    out.update({t: {m: rep.skipped(str(e)) for m in rep.CAPTION_METRICS} for t in todo})
    return out
  with scorer:
    for task, (refs, cands) in todo.items():
      scores = scorer.score(refs, cands)
      scores.update({m: rep.skipped(r) for m, r in scorer.skipped.items()})
      out[task] = scores
  return out


def tokenizer_results(config, acc: Accumulator) -> Dict[str, Any]:
  if acc.counts["tokenizer"] == 0:
    return {m: rep.skipped("config.eval.num_recon=0 (or no validation data)")
            for m in rep.EXPECTED_METRICS["tokenizer"]}
  out = {"psnr": float(np.mean(acc.recon["psnr"])), "ssim": float(np.mean(acc.recon["ssim"]))}
  out.update(image_eval.codebook_stats(np.concatenate(acc.recon["codes"]),
                                       int(config.sequence.image_vocab_size)))
  pair = acc.bank.pair_metrics("recon", task_counts(config)["tokenizer"])
  out["rfid"] = pair["fid"]
  out["rfd_effnet_lite0"] = pair["fd_effnet_lite0"]
  return out


def image_results(config, acc: Accumulator) -> Dict[str, Dict[str, Any]]:
  out = {}
  for task in ("t2i", "inpaint"):
    if acc.counts[task] == 0:
      names = rep.EXPECTED_METRICS[task]
      out[task] = {m: rep.skipped(f"config.eval.{_COUNT_KEYS[task]}=0 (or no validation data)")
                   for m in names}
      continue
    out[task] = acc.bank.pair_metrics(task, task_counts(config)[task])
  if acc.counts["t2i"]:
    out["t2i"].update(acc.bank.blur_metrics("t2i", task_counts(config)["t2i"]))
    out["t2i"]["clip_score"] = acc.bank.clip_score("t2i")
  return out


def write_samples(grid_dir: str, acc: Accumulator) -> Dict[str, np.ndarray]:
  """PNG grids (rows: real | generated side by side) and captions.json; returns the grids."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  os.makedirs(grid_dir, exist_ok=True)
  grids = {}
  for name, parts in acc.grids.items():
    images = np.concatenate(parts)
    cols = max(1, int(np.ceil(np.sqrt(len(images) * images.shape[1] / images.shape[2]))))
    rows = -(-len(images) // cols)
    pad = np.zeros((rows * cols - len(images),) + images.shape[1:], np.uint8)
    tiles = np.concatenate([images, pad]).reshape(rows, cols, *images.shape[1:])
    grid = tiles.transpose(0, 2, 1, 3, 4).reshape(rows * images.shape[1], cols * images.shape[2], 3)
    Image.fromarray(grid).save(os.path.join(grid_dir, f"{name}.png"))
    grids[name] = grid
  with open(os.path.join(grid_dir, "captions.json"), "w") as f:
    json.dump(acc.samples, f, indent=2)
  return grids


def stats_cache(config, workdir: str):
  """(cache_dir, dataset, split) of real-image statistics: beside the prepared dataset."""
  from magvlt_jax.data import builders  # pylint: disable=import-outside-toplevel
  builder = builders.get_builder(config, builders.default_data_dir(config, workdir))
  return (os.path.join(os.fspath(builder.data_dir), "fid_stats"),
          f"{config.data.name}_s{int(config.data.image_size)}", str(config.data.eval_split))


def run_all(config, workdir: str, step: int, grid_dir: str, sampler=None) -> Dict[str, Any]:
  """Runs every task with `sampler` (default: loaded from the checkpoint at `step`) and returns
  metrics / counts / seeds / timing / grids / samples."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  from magvlt_jax import sampler as sampler_lib  # pylint: disable=import-outside-toplevel
  timing = {}
  start = time.time()
  if sampler is None:
    sampler = sampler_lib.Sampler.from_checkpoint(workdir, config=config, step=step)
  bank = image_eval.FeatureBank.from_config(config, cache=stats_cache(config, workdir))
  acc = Accumulator(config, bank, int(config.eval.num_grid))
  timing["load"] = round(time.time() - start, 3)
  start = time.time()
  need = task_counts(config)
  with tqdm(total=sum(need.values()), desc="evaluate", unit="example") as progress:
    run_batches(config, sampler, acc, eval_batches(config, sampler.tokenizer, workdir), progress)
  timing["generate"] = round(time.time() - start, 3)
  for task, n in need.items():
    if acc.counts[task] < n:
      logging.warning("evaluate: %s scored %d examples, config asked for %d (split too small)",
                      task, acc.counts[task], n)
  start = time.time()
  metrics = image_results(config, acc)
  timing["image_metrics"] = round(time.time() - start, 3)
  start = time.time()
  metrics.update(caption_results(config, acc))
  timing["caption_metrics"] = round(time.time() - start, 3)
  metrics["tokenizer"] = tokenizer_results(config, acc)
  grids = write_samples(grid_dir, acc) if jax.process_index() == 0 else {}
  seed = int(config.eval.seed)
  seeds = {"eval_seed": seed, **{t: f"fold_in(fold_in(PRNGKey({seed}), {i}), batch)"
                                 for i, t in enumerate(TASKS)}}
  return {"metrics": metrics, "counts": dict(acc.counts), "seeds": seeds, "timing_s": timing,
          "grids": grids, "samples": acc.samples}
