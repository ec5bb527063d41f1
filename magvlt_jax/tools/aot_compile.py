r"""Ahead-of-time compilation of the train step and the T2I sampling loop for a TPU topology.

Runs on a CPU machine with libtpu installed (no TPU needed): libtpu describes the devices of a
named topology, we build the mesh from them, lower the real jitted functions with abstract,
sharded arguments and compile. An HBM overflow shows up here, before a pod is booked.

  python -m magvlt_jax.tools.aot_compile --config=configs/magvlt.py:base --topology=v5p:4x4x4 \
      [--per_chip_batch=16] [--strategy=fsdp] [--mesh=1,-1,1] [--what=train,t2i] \
      [--config.model.dtype=bfloat16 ...]

Prints per function a line `per-chip memory: X GiB` = arguments + outputs + temporaries - aliased
(donated) bytes from `compiled.memory_analysis()` (generated code is listed separately), the
per-chip FLOPs from `compiled.cost_analysis()`, and the analytic model FLOPs (6 N tokens +
attention + logits, maxtext-style; the VQ-GAN encode inside the step is not in it).
"""
import dataclasses
import functools
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from magvlt_jax import decoders, image_tokenizers, objectives, parallel
from magvlt_jax.models import transformer
from magvlt_jax.train import optimizer as optimizer_lib
from magvlt_jax.train import steps as steps_lib
from magvlt_jax.train.train_state import TrainState

# Cloud name -> (libtpu topology, chip config, HBM GiB per chip, peak bf16 TFLOP/s per chip).
# v4 and v5p chips have two TensorCores driven as one device ("megacore").
_CHIPS = {
    "v4": ("megacore", 32, 275.0),
    "v5e": ("default", 16, 197.0),
    "v5p": ("megacore", 95, 459.0),
    "v6e": ("default", 32, 918.0),
}
ALIASES = {"v4-32": "v4:2x2x4", "v5e-256": "v5e:16x16", "v5litepod-256": "v5e:16x16",
           "v5p-128": "v5p:4x4x4", "v5p-8": "v5p:2x2x1", "v4-8": "v4:2x2x1"}
DEFAULT_MESH = {"data": (-1, 1, 1), "fsdp": (1, -1, 1), "fsdp_tensor": (1, -1, 2)}


def define_flags():
  """Command-line flags, defined only when run as a program so that importing this module
  (tests, main.py) does not clash with other absl flag definitions."""
  flags.DEFINE_string("topology", "v5p:4x4x4", "libtpu topology 'gen:AxB[xC]' or a cloud name "
                      f"({', '.join(ALIASES)})")
  flags.DEFINE_integer("per_chip_batch", 0, "examples per data-parallel shard (0: config's global "
                       "batch / shards)")
  flags.DEFINE_string("strategy", "", "override config.mesh.strategy (data | fsdp | fsdp_tensor)")
  flags.DEFINE_string("mesh", "", "'data,fsdp,tensor' sizes (-1 fills); default per strategy")
  flags.DEFINE_list("what", ["train", "t2i"], "functions to compile: train, t2i")
  flags.DEFINE_integer("sample_per_chip", 1, "T2I prompts per data-parallel shard")
  return config_flags.DEFINE_config_file("config", "configs/magvlt.py:base", "magvlt config")


class DoesNotFit(RuntimeError):
  """The TPU compiler ran out of HBM for this function (its message says by how much)."""


@dataclasses.dataclass
class Result:
  name: str
  topology: str
  strategy: str
  mesh: str
  per_chip_batch: int
  global_batch: int
  memory_gib: float
  hbm_gib: float
  xla_flops_per_chip: float
  analytic_flops_per_chip: float
  compile_s: float
  memory_detail: dict


def resolve_topology(name: str):
  """(libtpu topology name, chip config name, HBM GiB, peak TFLOP/s) for a name or alias."""
  topo = ALIASES.get(name, name)
  gen = topo.split(":")[0]
  if gen not in _CHIPS or ":" not in topo:
    raise ValueError(f"--topology={name!r}: expected 'GEN:AxB[xC]' with GEN in {sorted(_CHIPS)} "
                     f"(e.g. v5p:4x4x4, v5e:16x16, v4:2x2x4) or one of {sorted(ALIASES)}")
  chip_config, hbm, peak = _CHIPS[gen]
  return topo, chip_config, hbm, peak


def topology_devices(name: str):
  """Compile-only devices (one per chip) of a TPU topology, described by libtpu."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topo, chip_config, _, _ = resolve_topology(name)
  # Compile-only use: do not fail on libtpu's single-process lock held by another jax process.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  return topologies.get_topology_desc(platform="tpu", topology_name=topo,
                                      chip_config_name=chip_config).devices


def configure_mesh(config, strategy: str = "", mesh: str = ""):
  """Applies --strategy / --mesh to config.mesh (in place)."""
  if strategy:
    parallel.logical_rules(strategy)  # validates the name
    config.mesh.strategy = strategy
    if not mesh:
      mesh = ",".join(str(s) for s in DEFAULT_MESH[strategy])
  if mesh:
    sizes = [int(s) for s in mesh.split(",")]
    if len(sizes) != 3:
      raise ValueError(f"--mesh={mesh!r}: expected three sizes 'data,fsdp,tensor'")
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = sizes
  return config


def _batch_spec(config, batch: int):
  s, n_txt = int(config.vqgan.image_size), int(config.sequence.text_length)
  u8, i32 = jnp.uint8, jnp.int32
  return {"image": ((batch, s, s, 3), u8), "image_lr": ((batch, s, s // 2, 3), u8),
          "image_tb": ((batch, s // 2, s, 3), u8), "text": ((batch, n_txt), i32),
          "text_length": ((batch,), i32)}


def _abstract(shape_dtype, sharding):
  shape, dtype = shape_dtype
  return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)


@dataclasses.dataclass(frozen=True)
class _TextIds:
  """The text-tokenizer ids an objective needs, without a tokenizer file (AOT compiles only)."""
  eos_id: int = 1
  sep_id: int = 2


def train_parts(config, eos_id: int = 1, sep_id: int = 2):
  """(init_state(rng) -> boxed TrainState, the trainer's train_step(state, batch, tokenizer_params,
  rng, metrics), initial metrics, objective): the pieces train/trainer.py's Setup assembles,
  without its I/O."""
  tx = optimizer_lib.make_optimizer(config)
  objective = objectives.create(config, transformer.from_config(config),
                                image_tokenizers.get(config), _TextIds(eos_id, sep_id))
  step = functools.partial(steps_lib.train_step, objective=objective, tx=tx,
                           schedule=optimizer_lib.learning_rate_schedule(config))

  def init_state(rng):
    return TrainState.create(transformer.init_params(config, rng, boxed=True), tx)
  return init_state, step, steps_lib.empty_metrics(objective), objective


def build_train(config, mesh, rules, global_batch: int):
  """(ShardedFunction, abstract args) of the trainer's train step (image tokenizer encode
  inside)."""
  parallel.check_aux_batch(global_batch, int(config.train.get("aux_batch_stride", 1)), mesh, rules)
  init_state, train_step, metrics, objective = train_parts(config)
  state_abs = parallel.abstract_state(init_state, jax.random.key(0), rules=rules)
  state_sh = parallel.state_shardings(state_abs, mesh, rules)
  image_tok = image_tokenizers.get(config)
  vq_abs = parallel.abstract_state(lambda: image_tok.init_params(jax.random.key(0), boxed=True),
                                   rules=rules)
  vq_sh = parallel.state_shardings(vq_abs, mesh, rules)
  batch_sh, rep = parallel.batch_sharding(mesh, rules), parallel.replicated(mesh)
  fn = parallel.jit_train_step(train_step, state_sh, batch_sh, mesh=mesh, rules=rules,
                               extra_in_shardings=(vq_sh, rep, rep))
  batch = {k: _abstract(v, batch_sh) for k, v in _batch_spec(config, global_batch).items()
           if k in objective.batch_keys}
  metrics_abs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                             metrics)
  args = (parallel.abstract_with_shardings(state_abs, state_sh), batch,
          parallel.abstract_with_shardings(vq_abs, vq_sh),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=rep), metrics_abs)
  return fn, args


def build_t2i(config, mesh, rules, global_batch: int):
  """(ShardedFunction, abstract args) of the T2I decoding loop of the config's decoder."""
  model = transformer.from_config(config)
  scale = float(config.decoding.guidance_scale)
  _, t2i = decoders.create(config, model, eos_id=1).task_fn("t2i", guidance=scale != 0.0)

  def sample(params, key, text_ids, text_length):
    return t2i(params, key, jnp.float32(scale), text_ids, text_length)

  params_abs = parallel.abstract_state(lambda: transformer.param_shapes(config, boxed=True),
                                       rules=rules)
  params_sh = parallel.state_shardings(params_abs, mesh, rules)
  fn = parallel.jit_sample_fn(sample, params_sh, mesh=mesh, rules=rules, num_batch_args=2)
  batch_sh = parallel.batch_sharding(mesh, rules)
  n_txt = int(config.sequence.text_length)
  args = (parallel.abstract_with_shardings(params_abs, params_sh),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=parallel.replicated(mesh)),
          jax.ShapeDtypeStruct((global_batch, n_txt), jnp.int32, sharding=batch_sh),
          jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=batch_sh))
  return fn, args


def analytic_train_flops(config, global_batch: int) -> float:
  """Model FLOPs of one train step: 6 * matmul params * tokens + bidirectional attention
  (3 * 4 B L^2 D per layer) + the tied logits (6 B D (n_img V_img + n_txt V_txt)). One forward
  per step; UnrollMask/MixSel extra passes and the VQ-GAN encode are not counted."""
  m, s = config.model, config.sequence
  d, layers = int(m.embed_dim), int(m.num_layers)
  n_img, n_txt = int(s.image_tokens), int(s.text_length)
  seq_len = 4 + n_img + n_txt
  block = 4 * d * d + 2 * d * d * int(m.mlp_ratio)  # q,k,v,o + mlp in/out
  matmul_params = layers * block + d * d  # + head dense
  tokens = global_batch * seq_len
  attention = 3 * 4 * global_batch * seq_len ** 2 * d * layers
  logits = 6 * global_batch * d * (n_img * int(s.image_vocab_size) + n_txt * int(s.text_vocab_size))
  return 6.0 * matmul_params * tokens + attention + logits


def _memory(compiled) -> tuple[float, dict]:
  m = compiled.memory_analysis()
  detail = {k: int(getattr(m, f"{k}_size_in_bytes", 0))
            for k in ("argument", "output", "temp", "alias", "generated_code")}
  total = detail["argument"] + detail["output"] + detail["temp"] - detail["alias"]
  return total / 2 ** 30, detail


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", float("nan")))


def compile_one(name, fn, args, *, topology, config, mesh, per_chip_batch, global_batch,
                analytic_flops=float("nan")) -> Result:
  start = time.time()
  _, _, hbm, _ = resolve_topology(topology)
  try:
    compiled = fn.lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e) and "Ran out of memory" not in str(e):
      raise
    first = next((line for line in str(e).splitlines() if "Ran out of memory" in line), str(e)[:300])
    raise DoesNotFit(f"{name} on {topology} (per-chip batch {per_chip_batch}, global "
                     f"{global_batch}) does NOT fit in {hbm} GiB HBM per chip: {first.strip()} "
                     f"Lower --per_chip_batch, use --strategy=fsdp, or "
                     f"--config.model.remat=True.") from None
  elapsed = time.time() - start
  gib, detail = _memory(compiled)
  return Result(name=name, topology=topology, strategy=config.mesh.strategy,
                mesh="x".join(str(v) for v in mesh.shape.values()), per_chip_batch=per_chip_batch,
                global_batch=global_batch, memory_gib=gib, hbm_gib=float(hbm),
                xla_flops_per_chip=_flops(compiled),
                analytic_flops_per_chip=analytic_flops / mesh.size, compile_s=elapsed,
                memory_detail=detail)


def run(config, topology: str, per_chip_batch: int = 0, what=("train", "t2i"),
        sample_per_chip: int = 1, devices=None) -> list:
  """Compiles the requested functions for `topology`; returns a Result per function."""
  devices = topology_devices(topology) if devices is None else devices
  mesh = parallel.make_mesh(config.mesh, devices)
  rules = parallel.logical_rules(config.mesh.strategy)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if per_chip_batch <= 0:
    per_chip_batch = max(1, int(config.data.global_batch_size) // shards)
  results = []
  for name in what:
    if name == "train":
      batch = per_chip_batch * shards
      fn, args = build_train(config, mesh, rules, batch)
      flops = analytic_train_flops(config, batch)
    elif name == "t2i":
      batch = sample_per_chip * shards
      fn, args = build_t2i(config, mesh, rules, batch)
      flops = float("nan")
    else:
      raise ValueError(f"--what: unknown function {name!r}; expected train or t2i")
    results.append(compile_one(name, fn, args, topology=topology, config=config, mesh=mesh,
                               per_chip_batch=batch // shards, global_batch=batch,
                               analytic_flops=flops))
  return results


def format_result(r: Result) -> str:
  d = {k: v / 2 ** 30 for k, v in r.memory_detail.items()}
  lines = [
      f"== {r.name} on {r.topology} ({r.strategy}, mesh data x fsdp x tensor = {r.mesh}), "
      f"per-chip batch {r.per_chip_batch}, global batch {r.global_batch}",
      f"per-chip memory: {r.memory_gib:.3f} GiB (of {r.hbm_gib:.0f} GiB HBM; arguments "
      f"{d['argument']:.3f} + outputs {d['output']:.3f} + temps {d['temp']:.3f} - aliased "
      f"{d['alias']:.3f}; generated code {d['generated_code']:.3f})",
      f"FLOPs per chip (XLA cost analysis): {r.xla_flops_per_chip:.4g}",
  ]
  if not math.isnan(r.analytic_flops_per_chip):
    ratio = r.analytic_flops_per_chip / r.xla_flops_per_chip if r.xla_flops_per_chip else float("nan")
    lines.append(f"analytic model FLOPs per chip (6*N*tokens + attention + logits): "
                 f"{r.analytic_flops_per_chip:.4g} ({ratio:.2f} of XLA's count)")
  lines.append(f"compile time: {r.compile_s:.1f} s")
  if r.memory_gib > r.hbm_gib:
    lines.append(f"WARNING: does NOT fit: {r.memory_gib:.1f} GiB > {r.hbm_gib:.0f} GiB HBM")
  return "\n".join(lines)


def main(argv):
  del argv
  config = configure_mesh(flags.FLAGS.config, flags.FLAGS.strategy, flags.FLAGS.mesh)
  try:
    for r in run(config, flags.FLAGS.topology, flags.FLAGS.per_chip_batch, flags.FLAGS.what,
                 flags.FLAGS.sample_per_chip):
      print(format_result(r), flush=True)
  except DoesNotFit as e:
    print(f"per-chip memory: does not fit. {e}", flush=True)
    raise SystemExit(2) from None


if __name__ == "__main__":
  define_flags()
  app.run(main)
