"""`--mode=describe`: the configured transformer's parameter overview (clu), nothing allocated.

The last line is always `total params: N` (the transformer, the model MAGVLT counts; the image
tokenizer is listed separately above it).
"""
import jax
import numpy as np
from clu import parameter_overview

from magvlt_jax.models import transformer
from magvlt_jax.models import vqgan


def _count(tree) -> int:
  return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree)))


def describe(config, max_lines: int = 200) -> str:
  params = transformer.param_shapes(config)
  lines = [f"transformer ({config.model.num_layers} layers x {config.model.embed_dim} wide x "
           f"{config.model.num_heads} heads, image vocab {config.sequence.image_vocab_size}, "
           f"text vocab {config.sequence.text_vocab_size}, sequence "
           f"{4 + config.sequence.text_length + config.sequence.image_tokens})",
           parameter_overview.get_parameter_overview(params, include_stats=False, max_lines=max_lines)]
  try:
    vq = vqgan.abstract_params(config.vqgan)
    lines.append(f"image tokenizer (frozen, not counted below): {_count(vq):,} params")
  except Exception as e:  # pylint: disable=broad-except
    lines.append(f"image tokenizer: not described ({type(e).__name__}: {e})")
  lines.append(f"total params: {_count(params)}")
  return "\n".join(lines)
