"""Device mesh, logical-axis rules and sharded jit for magvlt_jax.

Every parameter and activation carries logical axis names (models/). This module maps those
names onto a 3-axis device mesh ('data', 'fsdp', 'tensor') with ONE rules table per strategy:

  data         pure data parallelism: the batch is split over ('data', 'fsdp'), params replicated.
  fsdp         ZeRO-3: additionally every parameter's 'embed' axis (the VQ-GAN's 'conv_out' and
               'codebook' axes) is split over 'fsdp'; XLA all-gathers weights per layer.
  fsdp_tensor  fsdp plus Megatron-style tensor parallelism: 'heads', 'mlp', 'vocab' over 'tensor'.

Typical use (the trainer; with 1 device everything degenerates to replication):

  mesh = parallel.make_mesh(config.mesh)
  rules = parallel.logical_rules(config.mesh.strategy)
  abstract = parallel.abstract_state(init_fn, rng, rules=rules)       # boxed, no memory
  shardings = parallel.state_shardings(abstract, mesh, rules)          # params AND optimizer
  state = parallel.init_sharded(init_fn, shardings, mesh, rules)(rng)  # born sharded
  step = parallel.jit_train_step(train_step, shardings, parallel.batch_sharding(mesh, rules),
                                 mesh=mesh, rules=rules)
  state, metrics = step(state, parallel.global_batch(host_batch, mesh, rules), rng)
"""
import contextlib
import logging
import math
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax._src import config as jax_config  # the partitioner switch as a context manager
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")  # the batch is split over both: fsdp is data parallel for activations

# Logical name -> mesh axes, in priority order (flax takes the first rule whose mesh axes are still
# free in that array). 'batch' comes first, so an activation [batch, length, embed] keeps 'embed'
# unsharded under fsdp (its 'fsdp' axis is already used by 'batch') while params shard 'embed'.
# Names without a rule ('layers' of scanned blocks, 'length', 'kv', 'positions', 'special',
# 'length_classes', 'conv_in', ...) are replicated.
_BATCH_RULE = (("batch", BATCH_AXES),)
_FSDP_RULES = (("embed", "fsdp"), ("conv_out", "fsdp"), ("codebook", "fsdp"))
_TENSOR_RULES = (("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"))
_RULES = {
    "data": _BATCH_RULE,
    "fsdp": _BATCH_RULE + _FSDP_RULES,
    "fsdp_tensor": _BATCH_RULE + _TENSOR_RULES + _FSDP_RULES,
}
STRATEGIES = tuple(_RULES)

Rules = Sequence[tuple[str, Any]]


def logical_rules(strategy: str) -> Rules:
  """The logical-axis rules table for a strategy (config.mesh.strategy)."""
  if strategy not in _RULES:
    raise ValueError(f"config.mesh.strategy={strategy!r}: expected one of {STRATEGIES}")
  return _RULES[strategy]


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) sizes from config.mesh; one entry may be -1 (fill the rest)."""
  sizes = [int(mesh_config.get(name, 1)) for name in MESH_AXES]
  fill = [n for n, s in zip(MESH_AXES, sizes) if s == -1]
  bad = [f"mesh.{n}={s}" for n, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad or len(fill) > 1:
    raise ValueError(f"config.mesh: sizes must be positive with at most one -1 (fill); got "
                     f"{', '.join(bad) or ', '.join(f'mesh.{n}=-1' for n in fill)}")
  known = math.prod(s for s in sizes if s != -1)
  if fill:
    if num_devices % known:
      raise ValueError(f"config.mesh: cannot fill mesh.{fill[0]}=-1: {num_devices} devices are not "
                       f"divisible by the product of the other axes ({known})")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"config.mesh: mesh.data * mesh.fsdp * mesh.tensor = "
                     f"{sizes[0]}*{sizes[1]}*{sizes[2]} = {math.prod(sizes)} but there are "
                     f"{num_devices} devices; set one of them to -1 to fill")
  return tuple(sizes)


def make_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  """A `Mesh` with axes ('data','fsdp','tensor') and Auto axis types from config.mesh.

  `devices` defaults to jax.devices(); pass a TPU topology's devices for AOT compilation.
  With mesh.num_slices > 1 the 'data' axis spans slices (DCN) and fsdp/tensor stay inside a slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  num_slices = int(mesh_config.get("num_slices", 1))
  if num_slices > 1:
    if shape[0] % num_slices:
      raise ValueError(f"config.mesh: mesh.data={shape[0]} must be divisible by "
                       f"mesh.num_slices={num_slices} (data parallelism spans the slices)")
    ici = (shape[0] // num_slices, shape[1], shape[2])
    grid = mesh_utils.create_hybrid_device_mesh(ici, (num_slices, 1, 1), devices,
                                                allow_split_physical_axes=True)
  else:
    try:  # topology-aware placement on TPU (ICI rings); plain order elsewhere
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError) as e:
      logging.warning("create_device_mesh(%s) failed (%s); using device order", shape, e)
      grid = np.asarray(devices, dtype=object).reshape(shape)
  return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


# Shardy (jax's default partitioner since 0.7) mis-partitions the backward pass of our train step
# under fsdp_tensor in jax 0.10.2: on 8 CPU devices the gradients of the head, embeddings and
# block weights differ from the single-device step by up to ~90% while the loss matches; GSPMD is
# exact (tests/test_parallel.py). So our jitted steps lower with GSPMD where this jax still has
# the switch; MAGVLT_SHARDY=1 opts back in.
USE_SHARDY = os.environ.get("MAGVLT_SHARDY", "0") == "1"


def _partitioner():
  state = getattr(jax_config, "use_shardy_partitioner", None)
  if state is None or USE_SHARDY:
    return contextlib.nullcontext()
  return state(False)


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules):
  """Mesh + flax logical rules (+ the partitioner choice above) in context, so
  `nn.with_logical_constraint` takes effect.

  Uses `jax.set_mesh` (outside jit only): the deprecated `with mesh:` leaves flax's constraints
  silently as no-ops because it does not set the abstract mesh flax looks at.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules), _partitioner():
    yield


def _axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else axes
  return math.prod(mesh.shape[a] for a in axes)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops mesh axes from dimensions they do not divide (e.g. a 3-channel conv under fsdp=64):
  jit in/out shardings must divide evenly; such small tensors are cheap to replicate."""
  fitted = list(spec) + [None] * (len(shape) - len(spec))
  for i, (axes, dim) in enumerate(zip(fitted, shape)):
    if axes is not None and dim % _axis_size(mesh, axes):
      fitted[i] = None
  return P(*fitted)


def _is_box(x) -> bool:
  return isinstance(x, nn.Partitioned)


def _leaf_spec(x, rules: Rules) -> P:
  if isinstance(x, nn.LogicallyPartitioned):
    return nn.logical_to_mesh_axes(x.names, rules)
  if isinstance(x, nn.Partitioned):
    return P(*x.names)
  return P()


def state_shardings(abstract_boxed_state, mesh: Mesh, rules: Rules):
  """NamedShardings for a whole (boxed, abstract) state: params AND optimizer state.

  `abstract_boxed_state` comes from `jax.eval_shape` of an init function that returns boxed
  params (nn.LogicallyPartitioned) and `tx.init(boxed_params)`: optax maps over the boxes, so
  mu/nu inherit the params' logical names (the flax get_partition_spec route). Unboxed leaves
  (step, counts, rngs) are replicated. The result has the structure of the UNBOXED state.
  """
  def one(x):
    shape = (x.value if _is_box(x) else x).shape
    return NamedSharding(mesh, fit_spec(_leaf_spec(x, rules), shape, mesh))
  return jax.tree.map(one, abstract_boxed_state, is_leaf=_is_box)


def abstract_state(init_fn: Callable, *args, rules: Rules | None = None, **kwargs):
  """`jax.eval_shape(init_fn, *args)` (no memory, boxes kept), under `rules` if given."""
  with nn.logical_axis_rules(rules or ()):
    return jax.eval_shape(init_fn, *args, **kwargs)


def abstract_with_shardings(abstract_state_tree, shardings):
  """ShapeDtypeStructs carrying shardings: the restore target for orbax onto ANY mesh, and the
  argument spec for `jit(...).lower(...)`. Boxes are removed."""
  unboxed = nn.meta.unbox(abstract_state_tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      unboxed, shardings)


def init_sharded(init_fn: Callable, shardings, mesh: Mesh, rules: Rules):
  """jit(init_fn) whose unboxed outputs are born with `shardings` (never whole on one device)."""
  def unboxed_init(*args):
    return nn.meta.unbox(init_fn(*args))
  jitted = jax.jit(unboxed_init, out_shardings=shardings)

  def run(*args):
    with activate(mesh, rules):
      return jitted(*args)
  return run


def shard_train_state(state, shardings):
  """Moves an existing (unboxed) state onto the mesh, e.g. after a host-side restore."""
  return jax.device_put(nn.meta.unbox(state), shardings)


def shard_batch_spec(rules: Rules | None = None) -> P:
  """PartitionSpec of a batch: leading (batch) axis over the data axes, the rest replicated."""
  return nn.logical_to_mesh_axes(("batch",), rules or logical_rules("data"))


def batch_sharding(mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
  return NamedSharding(mesh, shard_batch_spec(rules))


def batch_shards(mesh: Mesh, rules: Rules | None = None) -> int:
  """How many ways the batch is split (mesh.data * mesh.fsdp under the standard rules)."""
  return _axis_size(mesh, batch_sharding(mesh, rules).spec[0])


def check_aux_batch(global_batch_size: int, stride: int, mesh: Mesh, rules: Rules | None = None):
  """The UnrollMask / MixSel / length-probe passes take every stride-th example; that subset must
  split evenly over the batch shards. An uneven subset is padded by XLA and, under fsdp_tensor,
  gave a different gradient than one device (tests/test_parallel.py)."""
  shards = batch_shards(mesh, rules)
  if stride > 1 and (global_batch_size // shards) % stride:
    raise ValueError(
        f"config.train.aux_batch_stride={stride}: the auxiliary passes take one example in "
        f"{stride}, but each of the {shards} batch shards holds {global_batch_size // shards} "
        f"(config.data.global_batch_size={global_batch_size}), not a multiple of {stride}; use a "
        f"stride that divides {global_batch_size // shards} (1 always works) or a larger global batch")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def put_replicated(tree, mesh: Mesh):
  """`tree` (host values or single-device arrays, typed PRNG keys included) replicated on `mesh`,
  also when the mesh spans processes: a committed single-device jax.Array cannot be device_put
  onto another process's devices, its host copy can (every process passes the same value)."""
  sharding = replicated(mesh)
  if not mesh.is_multi_process:
    # One process: a direct device_put, no host round trip (which would wait on the device queue
    # and break the asynchronous train loop).
    return jax.device_put(tree, sharding)

  def one(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      return jax.random.wrap_key_data(one(jax.random.key_data(x)), impl=jax.random.key_impl(x))
    return jax.device_put(np.asarray(jax.device_get(x)), sharding)

  return jax.tree.map(one, tree)


def global_batch(host_local_batch, mesh: Mesh, rules: Rules | None = None):
  """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded over the batch.

  Every process passes its own rows (same per-host size); non-array entries (caption lists)
  are returned unchanged. The global batch must be divisible by mesh.data * mesh.fsdp.
  """
  sharding = batch_sharding(mesh, rules)
  split = _axis_size(mesh, sharding.spec[0])

  def one(x):
    if not isinstance(x, (np.ndarray, jax.Array)) or np.ndim(x) == 0:
      return x
    rows = x.shape[0] * jax.process_count()
    if rows % split:
      raise ValueError(f"global batch {rows} (per host {x.shape[0]}) is not divisible by "
                       f"mesh.data*mesh.fsdp={split}; change config.data.global_batch_size")
    return jax.make_array_from_process_local_data(sharding, np.asarray(x))
  return jax.tree.map(one, host_local_batch, is_leaf=lambda x: isinstance(x, (list, tuple)))


def initialize_distributed(config) -> bool:
  """`jax.distributed.initialize()` when config.mesh.distributed (multi-host pods; the TPU
  runtime supplies the coordinator). Must run before any other JAX call. Returns whether the
  distributed runtime is up."""
  if not config.mesh.get("distributed", False):
    return False
  if not jax.distributed.is_initialized():
    jax.distributed.initialize()
    logging.info("jax.distributed: process %d/%d, %d local / %d global devices",
                 jax.process_index(), jax.process_count(), jax.local_device_count(),
                 jax.device_count())
  return True


class ShardedFunction:
  """`jax.jit` with explicit shardings whose calls AND lowerings run under `activate(mesh,
  rules)`, so the model's logical constraints resolve against this mesh at trace time."""

  def __init__(self, fn, mesh: Mesh, rules: Rules, **jit_kwargs):
    self.mesh, self.rules = mesh, rules
    self.jitted = jax.jit(fn, **jit_kwargs)

  def __call__(self, *args, **kwargs):
    with activate(self.mesh, self.rules):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with activate(self.mesh, self.rules):
      return self.jitted.lower(*args, **kwargs)


def jit_train_step(step_fn: Callable, state_shardings, batch_sharding, *, mesh: Mesh,
                   rules: Rules, extra_in_shardings: tuple = (), metrics_sharding=None,
                   donate_state: bool = True, static_argnames=()) -> ShardedFunction:
  """`step_fn(state, batch, *extra) -> (state, metrics)` jitted with the state sharded per the
  rules, the batch over the data axes, extras (rng, vq params, ...) as given, metrics replicated
  and the input state donated (its buffers are reused for the new state)."""
  metrics_sharding = metrics_sharding or replicated(mesh)
  return ShardedFunction(
      step_fn, mesh, rules,
      in_shardings=(state_shardings, batch_sharding, *extra_in_shardings),
      out_shardings=(state_shardings, metrics_sharding),
      donate_argnums=(0,) if donate_state else (),
      static_argnames=static_argnames)


def jit_sample_fn(sample_fn: Callable, param_shardings, *, mesh: Mesh, rules: Rules,
                  num_batch_args: int = 1, out_sharding=None, static_argnames=()):
  """`sample_fn(params, key, *batch_args)` (e.g. the T2I decoding loop): params per the rules,
  the PRNG key replicated, every batch argument (text ids, lengths, ...) and the outputs split
  over the data axes."""
  batch = batch_sharding(mesh, rules)
  return ShardedFunction(
      sample_fn, mesh, rules,
      in_shardings=(param_shardings, replicated(mesh)) + (batch,) * num_batch_args,
      out_shardings=batch if out_sharding is None else out_sharding,
      static_argnames=static_argnames)


def describe_shardings(shardings, max_lines: int = 20) -> str:
  """A short human-readable listing (path: spec) for logs and `--mode=describe`."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  lines = [f"{jax.tree_util.keystr(path)}: {s.spec}" for path, s in flat[:max_lines]]
  if len(flat) > max_lines:
    lines.append(f"... ({len(flat) - max_lines} more)")
  return "\n".join(lines)
