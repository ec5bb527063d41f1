"""Runs in a subprocess with 8 fake CPU devices (XLA_FLAGS set before jax starts) for
tests/test_parallel.py; prints one JSON object of measurements that the test asserts on.

  python tests/sharding_worker.py CHECKPOINT_DIR
"""
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import json  # pylint: disable=g-import-not-at-top,wrong-import-position

import jax
import ml_collections
import numpy as np

from magvlt_jax import checkpoints, configs_util, parallel
from magvlt_jax.models import vqgan
from magvlt_jax.tools import aot_compile

MESHES = {"data": (8, 1, 1), "fsdp": (2, 4, 1), "fsdp_tensor": (2, 2, 2)}


def small_config():
  """tiny, shrunk until 4 compiles of the full train step stay affordable: 1 layer, 8x8 images
  -> 4x4 codes through a 1-level VQ-GAN, UnrollMask and MixSel off (extra passes of the same
  sharded ops; they double the compile time), the length probe on the whole batch.
  Dropout off; no LR warm-up (the first update must move the params); Adam eps 1e-6 so that
  float-rounding noise on ~0 gradients is not amplified to +-lr by Adam's g/|g| first step."""
  c = configs_util.load_config("configs/magvlt.py:tiny")
  c.model.num_layers, c.model.embed_dim, c.model.num_heads = 1, 64, 2
  c.model.dropout_rate = c.model.attention_dropout_rate = 0.0
  c.vqgan.image_size, c.vqgan.channel_mult, c.vqgan.base_channels = 8, (1, 2), 16
  c.sequence.image_tokens = 16
  c.sequence.text_length = c.model.length_classes = 8
  c.train.use_unroll = c.train.use_mixsel = False
  # Batch 8 over up to 8 shards: the auxiliary subset must stay whole per shard
  # (parallel.check_aux_batch); stride 4 with 2 examples over 4 shards gave a different
  # fsdp_tensor gradient before that check existed.
  c.train.aux_batch_stride = 1
  c.optimizer.warmup_steps = 0
  c.optimizer.eps = 1e-6
  return c


def mesh_config(sizes, strategy):
  d, f, t = sizes
  return ml_collections.ConfigDict(dict(strategy=strategy, data=d, fsdp=f, tensor=t, num_slices=1))


def make_batch(config, batch, seed=0):
  rng = np.random.default_rng(seed)
  s, n = config.vqgan.image_size, config.sequence.text_length
  return {"image": rng.integers(0, 256, (batch, s, s, 3), np.uint8),
          "image_lr": rng.integers(0, 256, (batch, s, s // 2, 3), np.uint8),
          "image_tb": rng.integers(0, 256, (batch, s // 2, s, 3), np.uint8),
          "text": rng.integers(0, config.sequence.text_vocab_size, (batch, n)).astype(np.int32),
          "text_length": rng.integers(2, n + 1, (batch,)).astype(np.int32)}


def spec_str(x):
  return str(tuple(x.sharding.spec))


def max_diff(a, b):
  """(largest |a - b| over all leaves, its leaf path)."""
  flat = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float64) -
                                                    np.asarray(y, np.float64)))), a, b))[0]
  path, value = max(flat, key=lambda kv: kv[1])
  return value, jax.tree_util.keystr(path)


def sharded_run(config, strategy, sizes, batch, vq_params, key):
  """One sharded train step; returns (initial state, new state, metrics, shardings)."""
  mesh = parallel.make_mesh(mesh_config(sizes, strategy))
  rules = parallel.logical_rules(strategy)
  init_state, train_step, metrics0, _ = aot_compile.train_parts(config)
  abstract = parallel.abstract_state(init_state, jax.random.key(0), rules=rules)
  shardings = parallel.state_shardings(abstract, mesh, rules)
  state = parallel.init_sharded(init_state, shardings, mesh, rules)(jax.random.key(0))
  vq_abs = parallel.abstract_state(lambda: vqgan.init_params(config.vqgan, jax.random.key(1),
                                                             boxed=True), rules=rules)
  vq_sh = parallel.state_shardings(vq_abs, mesh, rules)
  step = parallel.jit_train_step(train_step, shardings, parallel.batch_sharding(mesh, rules),
                                 mesh=mesh, rules=rules,
                                 extra_in_shardings=(vq_sh,) + (parallel.replicated(mesh),) * 2,
                                 donate_state=False)
  gbatch = parallel.global_batch(batch, mesh, rules)
  new_state, metrics = step(state, gbatch, jax.device_put(vq_params, vq_sh), key, metrics0)
  return state, new_state, metrics, mesh, rules, abstract


def loss_of(metrics):
  return float(metrics.loss.compute())


def main(ckpt_dir):
  config = small_config()
  batch = make_batch(config, 8)
  key = jax.random.key(42)
  vq_params = vqgan.init_params(config.vqgan, jax.random.key(1))
  init_state, train_step, metrics0, _ = aot_compile.train_parts(config)
  # Reference: the plain single-device step.
  ref_state = jax.jit(lambda r: parallel.nn.meta.unbox(init_state(r)))(jax.random.key(0))
  ref_new, ref_metrics = jax.jit(train_step)(ref_state, batch, vq_params, key, metrics0)
  out = {"devices": jax.device_count(), "ref_loss": loss_of(ref_metrics),
         "lr": float(config.optimizer.peak_lr),
         "ref_update": max_diff(ref_new.params, ref_state.params)[0]}
  for strategy, sizes in MESHES.items():
    state, new, metrics, mesh, rules, abstract = sharded_run(config, strategy, sizes, batch,
                                                            vq_params, key)
    mu = new.opt_state[1][0].mu  # chain(clip, adamw): adamw's ScaleByAdamState
    out[strategy] = {
        "loss": loss_of(metrics),
        "init_params_diff": max_diff(state.params, ref_state.params)[0],
        "params_diff": max_diff(new.params, ref_new.params),
        "opt_diff": max_diff(new.opt_state, ref_new.opt_state)[0],
        "step": int(new.step),
        "token_embed": spec_str(new.params["token_embed"]),
        "fc1": spec_str(new.params["block_0"]["mlp"]["fc1"]["kernel"]),
        "wq": spec_str(new.params["block_0"]["attn"]["wq"]),
        "mu_fc1": spec_str(mu["block_0"]["mlp"]["fc1"]["kernel"]),
        "fc1_shard_shape": list(new.params["block_0"]["mlp"]["fc1"]["kernel"]
                                .addressable_shards[0].data.shape),
    }
    if strategy == "fsdp_tensor":
      saved = new
      store = checkpoints.CheckpointStore(ckpt_dir, keep=1, async_save=False)
      store.save(1, new, force=True)
      store.close()
      saved_abstract = abstract
  out["restore"] = restore_elsewhere(ckpt_dir, saved, saved_abstract)
  print("RESULT " + json.dumps(out))


def restore_elsewhere(ckpt_dir, saved, abstract):
  """Restores the fsdp_tensor (2x2x2) checkpoint onto 1 device and onto a 2x4 fsdp mesh."""
  result = {}
  for name, strategy, sizes, devices in (("one_device", "data", (1, 1, 1), jax.devices()[:1]),
                                         ("2x4_fsdp", "fsdp", (2, 4, 1), None)):
    mesh = parallel.make_mesh(mesh_config(sizes, strategy), devices)
    rules = parallel.logical_rules(strategy)
    target = parallel.abstract_with_shardings(abstract, parallel.state_shardings(abstract, mesh,
                                                                                  rules))
    state, _ = checkpoints.CheckpointStore(ckpt_dir, keep=1).restore_latest(target)
    result[name] = {"diff": max_diff(state, saved)[0],
                    "fc1": spec_str(state.params["block_0"]["mlp"]["fc1"]["kernel"]),
                    "devices": len(state.params["token_embed"].sharding.device_set)}
  return result


if __name__ == "__main__":
  main(sys.argv[1])
