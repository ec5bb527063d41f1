"""Metric writer without TensorFlow: absl logging + WORKDIR/metrics.jsonl + TensorBoard events.

`clu.metric_writers` imports TensorFlow at import time (not installed on the GPU image), so this
writes TensorBoard event files through tensorboard's own (numpy-only) event writer: scalars,
images (PNG via PIL) and text. When tensorboard is missing, only logging + JSONL are written.
Only process 0 writes (multi-host runs call it everywhere).
"""
import io
import json
import logging
import os
import time
from typing import Dict, Mapping, Optional, Sequence

import jax
import numpy as np

try:  # tensorboard is a plain dependency, but keep the writer usable without it.
  from tensorboard.compat.proto import event_pb2, summary_pb2
  from tensorboard.plugins.text import metadata as text_metadata
  from tensorboard.summary.writer import event_file_writer
  from tensorboard.util import tensor_util
  _HAVE_TB = True
except ImportError:  # pragma: no cover - depends on the environment
  _HAVE_TB = False


def _png(image: np.ndarray) -> bytes:
  from PIL import Image
  buf = io.BytesIO()
  Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


class MetricWriter:
  """write_scalars / write_images / write_texts; `flush()` and `close()`.

  workdir: metrics.jsonl goes to workdir, TensorBoard events to workdir/tb (or `tb_dir`).
  """

  def __init__(self, workdir: str, tb_dir: Optional[str] = None, enabled: Optional[bool] = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = None
    self._jsonl = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    if _HAVE_TB:
      self._tb = event_file_writer.EventFileWriter(tb_dir or os.path.join(workdir, "tb"), flush_secs=30)

  def _event(self, step: int, values: Sequence) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step))
    event.summary.value.extend(values)
    self._tb.add_event(event)

  def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    logging.info("[%d] %s", step, ", ".join(f"{k}={v:.5g}" for k, v in sorted(scalars.items())))
    self._jsonl.write(json.dumps({"step": int(step), **scalars}) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      self._event(step, [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()])

  def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
    """images: name -> uint8 [H, W, 3] or [N, H, W, 3] (each becomes `name/i`)."""
    if not self.enabled or self._tb is None:
      return
    values = []
    for name, arr in images.items():
      arr = np.asarray(arr)
      arr = arr[None] if arr.ndim == 3 else arr
      for i, img in enumerate(arr):
        image = summary_pb2.Summary.Image(height=img.shape[0], width=img.shape[1], colorspace=3,
                                          encoded_image_string=_png(img))
        values.append(summary_pb2.Summary.Value(tag=f"{name}/{i}" if len(arr) > 1 else name, image=image))
    self._event(step, values)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    if not self.enabled:
      return
    for k, v in texts.items():
      logging.info("[%d] %s: %s", step, k, v)
    if self._tb is None:
      return
    meta = text_metadata.create_summary_metadata(display_name=None, description=None)
    self._event(step, [summary_pb2.Summary.Value(tag=k, metadata=meta,
                                                 tensor=tensor_util.make_tensor_proto([v]))
                       for k, v in texts.items()])

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self._jsonl is not None:
      self._jsonl.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None


def create(workdir: str) -> MetricWriter:
  """The project's writer for `workdir` (process 0 writes, others no-op)."""
  return MetricWriter(workdir)


def read_metrics(workdir: str) -> list:
  """All rows of WORKDIR/metrics.jsonl (for tests and notebooks)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def last_values(rows: Sequence[Dict], key: str) -> list:
  return [r[key] for r in rows if key in r]
