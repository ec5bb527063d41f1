"""Shared PyTorch -> Flax parameter mapping for the converters (FID Inception, EfficientNet, CLIP).

A converter supplies the abstract Flax params tree (jax.eval_shape of init) and a function from a
Flax param path to its PyTorch state-dict key; `assign` fills the tree, transposing kernels
(Conv [O, I, kh, kw] -> [kh, kw, I, O]; Linear [out, in] -> [in, out]), and insists that every
key of the file is used and every shape matches (BatchNorm `num_batches_tracked` counters are
the only keys ignored).
"""
import os
from typing import Callable, Dict, Mapping, Sequence

import jax
import numpy as np

from magvlt_jax.convert import torch_pickle


def read_weights(path: str) -> Dict[str, np.ndarray]:
  """name -> array from a torch checkpoint (zip/legacy, no pickle code run) or an .npz."""
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as z:
      return {k: z[k] for k in z.files}
  return torch_pickle.load_state_dict(path)


def check_path(path: str, config_key: str, what: str) -> str:
  """Clear errors for an unset or missing weights file, naming the config key."""
  if not path:
    raise ValueError(f"{what}: set {config_key} (a user-supplied weights file)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{config_key}={path!r}: file not found")
  return path


def torch_shape(leaf_name: str, shape: Sequence[int]) -> tuple:
  """The PyTorch shape of a Flax param (kernels are stored transposed)."""
  if leaf_name == "kernel" and len(shape) == 4:
    kh, kw, i, o = shape
    return (o, i, kh, kw)
  if leaf_name == "kernel":
    return tuple(reversed(shape))
  return tuple(shape)


def assign(abstract_params, state_dict: Mapping[str, np.ndarray],
           key_fn: Callable[[Sequence[str]], str], what: str, source: str = "state dict"):
  """Params tree (float32 numpy) for `abstract_params` from a torch-layout state dict."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
  used = {k for k in state_dict if k.endswith("num_batches_tracked")}
  missing, bad_shape, leaves = [], [], []
  for path, abstract in flat:
    names = [p.key for p in path]
    key, want = key_fn(names), torch_shape(names[-1], abstract.shape)
    if key not in state_dict:
      missing.append(key)
      leaves.append(None)
      continue
    used.add(key)
    value = np.asarray(state_dict[key], np.float32)
    if value.shape != want:
      bad_shape.append(f"{key}: file {value.shape}, expected {want}")
      leaves.append(None)
      continue
    if names[-1] == "kernel":
      value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    leaves.append(np.array(value, order="C"))  # (ascontiguousarray would make 0-d arrays 1-d)
  unused = sorted(set(state_dict) - used)
  if missing or bad_shape or unused:
    raise ValueError(
        f"{source} does not match {what}: {len(missing)} missing {missing[:5]}, "
        f"{len(bad_shape)} wrong shapes {bad_shape[:5]}, {len(unused)} unused {unused[:5]}")
  return jax.tree_util.tree_unflatten(treedef, leaves)
