"""Convert a taming-transformers VQGAN checkpoint (e.g. `vqgan_imagenet_f16_16384`) into our params.

Inputs: a PyTorch `.ckpt`/`.pth` (Lightning `state_dict` or a bare state dict; read by the torch-free
`convert/torch_pickle.py`, so no pickle code runs), a `.safetensors` file (needs the optional
`safetensors` package) or an `.npz` with taming key names. MAGVLT's own checkpoints store the VQGAN
under `model_vqvae.`; that prefix is detected and the transformer keys are ignored. Keys starting
with `loss.` (LPIPS + discriminator of the training loss) are ignored.

Renaming is mechanical: `encoder.down.0.block.1.conv2.weight` -> `encoder/down_0/block_1/conv2/kernel`
(a numeric part joins its predecessor), conv weights OIHW -> HWIO, GroupNorm weight -> scale,
`quantize.embedding.weight` -> `quantize/embedding`. Every checkpoint key must be used and every
param filled with the right shape; otherwise a ValueError lists the offending keys.

CLI: python -m magvlt_jax.convert.taming_vqgan --input vqgan.ckpt --output vqgan_f16_16384.npz \
       --config f16_16384
"""
import argparse
import os
from typing import Dict, Mapping

import numpy as np

from magvlt_jax.models import vqgan

IGNORED_PREFIXES = ("loss.",)
MAGVLT_PREFIX = "model_vqvae."


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """name -> numpy array from .npz / .safetensors / torch .ckpt/.pth/.pt/.bin."""
  if not os.path.exists(path):
    raise FileNotFoundError(f"taming checkpoint not found: {path}")
  if path.endswith(".npz"):
    with np.load(path) as f:
      return {k: f[k] for k in f.files}
  if path.endswith(".safetensors"):
    try:
      from safetensors.numpy import load_file
    except ImportError as e:
      raise ImportError(f"{path}: reading .safetensors needs `pip install safetensors`; or pass the .ckpt") from e
    return dict(load_file(path))
  from magvlt_jax.convert import torch_pickle
  return dict(torch_pickle.load_state_dict(path))


def flax_path(key: str):
  """'encoder.down.0.block.1.conv2.weight' -> ('encoder', 'down_0', 'block_1', 'conv2'), 'weight'."""
  parts = key.split(".")
  out = []
  for p in parts[:-1]:
    if p.isdigit() and out:
      out[-1] = f"{out[-1]}_{p}"
    else:
      out.append(p)
  return tuple(out), parts[-1]


def _select(sd: Mapping[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Drops loss.* keys; unwraps MAGVLT's model_vqvae. prefix (ignoring its transformer keys)."""
  if any(k.startswith(MAGVLT_PREFIX) for k in sd):
    sd = {k[len(MAGVLT_PREFIX):]: v for k, v in sd.items() if k.startswith(MAGVLT_PREFIX)}
  return {k: np.asarray(v) for k, v in sd.items() if not k.startswith(IGNORED_PREFIXES)}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], vq_config, source: str = "checkpoint"):
  """taming state dict -> our nested params (numpy, float32 unless the source is float64->float32)."""
  layers = (vq_config.get("norm_type", "group"), bool(vq_config.get("mid_attention", True)))
  if layers != ("group", True):
    raise ValueError(f"{source}: a taming checkpoint needs taming's layers, but config.vqgan has "
                     f"norm_type={layers[0]!r}, mid_attention={layers[1]} (variant "
                     f"{vq_config.get('variant', '?')!r}); set vqgan.norm_type='group' and "
                     f"vqgan.mid_attention=True")
  want = vqgan.flatten_params_shapes(vqgan.abstract_params(vq_config))
  flat, errors, used = {}, [], set()
  for key, value in _select(state_dict).items():
    path, leaf = flax_path(key)
    shape = tuple(value.shape)
    base = "/".join(path)
    if leaf == "weight" and base + "/kernel" in want and value.ndim == 4:
      name, value = base + "/kernel", np.transpose(value, (2, 3, 1, 0))  # OIHW -> HWIO
    elif leaf == "weight" and base + "/scale" in want:
      name = base + "/scale"
    elif leaf == "weight" and base in want:  # quantize.embedding.weight
      name = base
    elif leaf == "bias" and base + "/bias" in want:
      name = base + "/bias"
    else:
      errors.append(f"  unexpected key {key} {value.shape} (no matching param)")
      continue
    used.add(name)
    if tuple(value.shape) != tuple(want[name].shape):
      errors.append(f"  {key}: shape {shape} does not fit {name} (expects {tuple(want[name].shape)} in our "
                    "layout; conv weights are converted OIHW -> HWIO)")
      continue
    flat[name] = value.astype(np.float32) if value.dtype != np.float32 else value
  errors += [f"  missing key for {name} {tuple(want[name].shape)}" for name in sorted(set(want) - used)]
  if errors:
    raise ValueError(f"{source}: taming checkpoint does not match config.vqgan (variant "
                     f"{vq_config.variant!r}):\n" + "\n".join(errors[:40])
                     + (f"\n  ... {len(errors) - 40} more" if len(errors) > 40 else ""))
  return vqgan.unflatten_params(flat)


def to_taming_state_dict(params) -> Dict[str, np.ndarray]:
  """Inverse mapping (our params -> taming names, OIHW), e.g. to export or to build test fixtures."""
  out = {}
  for name, value in vqgan.flatten_params(params).items():
    *path, leaf = name.split("/")
    parts = []
    for p in path + ([leaf] if leaf == "embedding" else []):
      head, _, idx = p.rpartition("_")
      # ModuleList entries (down.0, block.1) vs taming's literal mid.block_1 / mid.attn_1 attributes.
      listed = idx.isdigit() and head in ("down", "up", "block", "attn") and parts[-1:] != ["mid"]
      parts.extend([head, idx] if listed else [p])
    key = ".".join(parts)
    if leaf == "kernel":
      out[key + ".weight"] = np.transpose(value, (3, 2, 0, 1))
    elif leaf == "scale" or leaf == "embedding":
      out[key + ".weight"] = value
    else:
      out[key + "." + leaf] = value
  return out


def convert_file(path: str, vq_config):
  return convert_state_dict(read_state_dict(path), vq_config, source=path)


def _vq_config(spec: str):
  from magvlt_jax import configs_util
  if ":" in spec or spec.endswith(".py"):
    cfg = configs_util.load_config(spec)
    return cfg.vqgan if "vqgan" in cfg else cfg
  return configs_util.load_config(f"configs/vqgan.py:{spec}")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--input", required=True, help="taming .ckpt/.pth, .safetensors or .npz")
  ap.add_argument("--output", required=True, help="output .npz (load with vqgan.load_params)")
  ap.add_argument("--config", default="f16_16384",
                  help="configs/vqgan.py variant (f16_16384 | tiny) or a config spec path.py:variant")
  args = ap.parse_args(argv)
  cfg = _vq_config(args.config)
  params = convert_file(args.input, cfg)
  vqgan.save_params_npz(args.output, params)
  n = sum(int(np.prod(np.shape(v))) for v in vqgan.flatten_params(params).values())
  print(f"wrote {args.output}: {len(vqgan.flatten_params(params))} arrays, {n:,} parameters")


if __name__ == "__main__":
  main()
