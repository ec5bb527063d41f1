"""FLOPs per example of the frozen VQ-GAN encode inside the train step vs the transformer's own
train FLOPs, for a config variant (default base: the taming f16 encoder at 256x256).

  python benchmarks/bench_encoder_flops.py [--variant=base]

The encoder count is XLA's cost analysis of the lowered `image_tokenizer.encode` at batch 1
(abstract params: nothing is initialised or run); the transformer count is
`aot_compile.analytic_train_flops` (forward + backward). The MAGVLT step encodes every image once,
and the I2T / IT2IT MixSel branches encode a second, pixel-mixed image: 1 or 2 encodes per example.
This is the compute that pre-tokenized data (issue 18, item 3) would save. Prints one JSON line.
"""
import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from magvlt_jax import configs_util  # noqa: E402
from magvlt_jax import image_tokenizers  # noqa: E402
from magvlt_jax.tools import aot_compile  # noqa: E402


def encoder_flops(config, batch: int = 1) -> float:
  tok = image_tokenizers.get(config)
  params = jax.eval_shape(tok.init_params, jax.random.key(0))
  s = tok.image_size
  images = jax.ShapeDtypeStruct((batch, s, s, 3), jnp.uint8)
  cost = jax.jit(tok.encode).lower(params, images).cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  flops = float((cost or {}).get("flops", float("nan")))
  return flops / batch


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variant", default="base")
  args = p.parse_args(argv)
  config = configs_util.load_config(f"configs/magvlt.py:{args.variant}")
  enc = encoder_flops(config)
  train = aot_compile.analytic_train_flops(config, 1)
  print(json.dumps({
      "variant": args.variant, "image_tokenizer": image_tokenizers.kind_of(config),
      "image_size": int(config.data.image_size),
      "encoder_gflop_per_image": round(enc / 1e9, 1),
      "transformer_train_gflop_per_example": round(train / 1e9, 1),
      "transformer_forward_gflop_per_example": round(train / 3 / 1e9, 1),
      "encoder_over_train_step_1_encode": round(enc / train, 3),
      "encoder_over_train_step_2_encodes": round(2 * enc / train, 3)}))


if __name__ == "__main__":
  main()
