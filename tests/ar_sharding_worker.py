"""Runs in a subprocess with 2 fake CPU devices for tests/test_ar_sharding.py: one ARGVLT / BiART
train step on 2-device meshes vs the plain single-device step; prints one JSON line.

  python tests/ar_sharding_worker.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests import sharding_worker as sw  # noqa: E402  (it sets 8 devices; we want 2, set below)

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"  # before jax's backend starts
os.environ["JAX_PLATFORMS"] = "cpu"

import json  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

import jax  # noqa: E402

from magvlt_jax import configs_util, parallel  # noqa: E402
from magvlt_jax.models import vqgan  # noqa: E402
from magvlt_jax.tools import aot_compile  # noqa: E402

# (system config, strategy, (data, fsdp, tensor)) on the 2 devices.
# (Pure data parallelism is the plain batch split test_parallel.py already checks for MAGVLT's
# step; the AR-specific paths are the causal mask and the segment table under fsdp / tensor.)
CASES = (("argvlt", "fsdp_tensor", (1, 1, 2)), ("lverse", "fsdp", (1, 2, 1)))


def ar_config(system: str):
  """sharding_worker's shrunk tiny (1 layer x 64, 4x4 codes, no warm-up, no dropout) with the AR
  system's objective, causal attention, loss weights, segments and decoder settings."""
  c = sw.small_config()
  ar = configs_util.load_config(f"configs/{system}.py:tiny")
  c.objective, c.model.causal = ar.objective, True
  c.model.num_segments = ar.model.get("num_segments", 0)
  for key in ("task_weights", "generated_loss_weight", "condition_loss_weight",
              "label_smoothing", "alternate_tasks"):
    c.train[key] = ar.train[key]
  c.decoding.kind = ar.decoding.kind
  with c.unlocked():
    c.decoding.ar = ar.decoding.ar
  return c


def main():
  out = {"devices": jax.device_count()}
  for system, strategy, sizes in CASES:
    config = ar_config(system)
    batch = sw.make_batch(config, 8)
    key = jax.random.key(42)
    vq_params = vqgan.init_params(config.vqgan, jax.random.key(1))
    init_state, train_step, metrics0, _ = aot_compile.train_parts(config)
    ref_state = jax.jit(lambda r, f=init_state: parallel.nn.meta.unbox(f(r)))(jax.random.key(0))
    ref_new, ref_metrics = jax.jit(train_step)(ref_state, batch, vq_params, key, metrics0)
    state, new, metrics, _, _, _ = sw.sharded_run(config, strategy, sizes, batch, vq_params, key)
    out[f"{system}/{strategy}"] = {
        "objective": config.objective,
        "ref_loss": sw.loss_of(ref_metrics), "loss": sw.loss_of(metrics),
        "lr": float(config.optimizer.peak_lr),
        "ref_update": sw.max_diff(ref_new.params, ref_state.params)[0],
        "init_params_diff": sw.max_diff(state.params, ref_state.params)[0],
        "params_diff": sw.max_diff(new.params, ref_new.params),
        "opt_diff": sw.max_diff(new.opt_state, ref_new.opt_state)[0],
        "step": int(new.step),
        "fc1": sw.spec_str(new.params["block_0"]["mlp"]["fc1"]["kernel"]),
        "fc1_devices": len(new.params["block_0"]["mlp"]["fc1"]["kernel"].sharding.device_set),
    }
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
