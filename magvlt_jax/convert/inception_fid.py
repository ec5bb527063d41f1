"""pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` state dict -> FIDInceptionV3 params.

Accepted files (config.eval.inception_weights):
  * the pytorch-fid `.pth` (read with convert/torch_pickle, no torch, no pickle code executed);
  * an `.npz` holding the same keys in the same (PyTorch) layout, e.g. written by `export_npz`.
Every key of the file must be used (BatchNorm `num_batches_tracked` counters are the only keys
ignored) and every shape must match, otherwise a ValueError lists the offending keys.

Layout map: `X.conv.weight` [O, I, kh, kw] -> X.kernel [kh, kw, I, O]; `X.bn.{weight, bias,
running_mean, running_var}` -> X.{scale, bias, mean, var}; `fc.weight` [1008, 2048] -> fc.kernel
(transposed), `fc.bias` -> fc.bias.
"""
from typing import Dict, Mapping

import jax
import numpy as np

from magvlt_jax.convert import torch_layout
from magvlt_jax.models import inception

CONFIG_KEY = "config.eval.inception_weights"
_BN = {"scale": "bn.weight", "bias": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _torch_key(names) -> str:
  names = [getattr(n, "key", n) for n in names]
  *module, leaf = names
  prefix = ".".join(module)
  if module == ["fc"]:
    return f"fc.{'weight' if leaf == 'kernel' else 'bias'}"
  return f"{prefix}.{'conv.weight' if leaf == 'kernel' else _BN[leaf]}"


def expected_torch_shapes() -> Dict[str, tuple]:
  """torch key -> torch shape of every tensor the FID Inception needs (1008-way fc included)."""
  flat = jax.tree_util.tree_flatten_with_path(inception.abstract_params())[0]
  return {_torch_key(p): torch_layout.torch_shape(p[-1].key, x.shape) for p, x in flat}


def convert_state_dict(state_dict: Mapping[str, np.ndarray], source: str = "state dict"):
  """Maps a pytorch-fid state dict (torch layout) to the params tree, checking keys and shapes."""
  return torch_layout.assign(inception.abstract_params(), state_dict, _torch_key,
                             f"the pytorch-fid FID Inception-v3 ({CONFIG_KEY})", source)


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """Reads the torch keys from a pytorch-fid `.pth` or an `.npz` with the same keys."""
  what = ("FID/IS need the FID Inception-v3 weights (pytorch-fid's pt_inception-2015-12-05-"
          "6726825d.pth or an .npz of the same keys; they cannot be downloaded here; the offline "
          "proxy fd_effnet_lite0/is_effnet_lite0 needs none)")
  return torch_layout.read_weights(torch_layout.check_path(path, CONFIG_KEY, what))


def load_params(path: str):
  """The FIDInceptionV3 params tree from a user-supplied weights file (see module doc)."""
  return convert_state_dict(read_state_dict(path), source=path)


def export_npz(state_dict_path: str, npz_path: str) -> None:
  """Converts the `.pth` once into an `.npz` of the same keys (checked first)."""
  sd = read_state_dict(state_dict_path)
  convert_state_dict(sd, source=state_dict_path)
  np.savez(npz_path, **{k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")})


if __name__ == "__main__":  # python -m magvlt_jax.convert.inception_fid IN.pth OUT.npz
  import sys
  if len(sys.argv) != 3:
    sys.exit("usage: python -m magvlt_jax.convert.inception_fid pt_inception-2015-12-05.pth out.npz")
  export_npz(sys.argv[1], sys.argv[2])
  print(f"wrote {sys.argv[2]}")
