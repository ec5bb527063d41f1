"""parallel.py: mesh sizes, rules tables, and (in an 8-fake-device subprocess) sharded train
steps equal to the single-device step, params/optimizer really sharded, checkpoint restore onto
other mesh shapes."""
import json
import os
import subprocess
import sys

import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from magvlt_jax import configs_util, parallel
from magvlt_jax.models import transformer

_HERE = os.path.dirname(os.path.abspath(__file__))


def _mesh_cfg(data=-1, fsdp=1, tensor=1, num_slices=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, num_slices=num_slices))


def test_mesh_shape_fills_and_validates():
  assert parallel.mesh_shape(_mesh_cfg(), 8) == (8, 1, 1)
  assert parallel.mesh_shape(_mesh_cfg(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
  assert parallel.mesh_shape(_mesh_cfg(data=1, fsdp=4), 4) == (1, 4, 1)
  with pytest.raises(ValueError, match=r"mesh.data \* mesh.fsdp \* mesh.tensor = 2\*2\*1 = 4 but"):
    parallel.mesh_shape(_mesh_cfg(data=2, fsdp=2), 8)
  with pytest.raises(ValueError, match="cannot fill mesh.data=-1"):
    parallel.mesh_shape(_mesh_cfg(fsdp=3), 8)
  with pytest.raises(ValueError, match="at most one -1"):
    parallel.mesh_shape(_mesh_cfg(data=-1, fsdp=-1), 8)


def test_make_mesh_one_device_is_auto():
  mesh = parallel.make_mesh(_mesh_cfg())
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="mesh.num_slices=2"):
    parallel.make_mesh(_mesh_cfg(data=1, num_slices=2))


def test_aux_subset_must_split_evenly_over_batch_shards():
  mesh = parallel.make_mesh(_mesh_cfg())  # one CPU device: one batch shard
  parallel.check_aux_batch(16, 4, mesh)  # 16 per shard, every 4th: fine
  parallel.check_aux_batch(6, 1, mesh)
  with pytest.raises(ValueError, match=r"config\.train\.aux_batch_stride=4.*global_batch_size=6"):
    parallel.check_aux_batch(6, 4, mesh)


def test_unknown_strategy():
  with pytest.raises(ValueError, match="config.mesh.strategy='zero'"):
    parallel.logical_rules("zero")


@pytest.mark.parametrize("strategy,token,fc1,wq,batch_act", [
    ("data", P(None, None), P(None, None), P(None, None, None), P(("data", "fsdp"), None, None)),
    ("fsdp", P(None, "fsdp"), P("fsdp", None), P("fsdp", None, None),
     P(("data", "fsdp"), None, None)),
    ("fsdp_tensor", P("tensor", "fsdp"), P("fsdp", "tensor"), P("fsdp", "tensor", None),
     P(("data", "fsdp"), None, "tensor")),
])
def test_rules_map_model_axes(strategy, token, fc1, wq, batch_act):
  """The transformer's own logical names resolve as the strategy table says; activations keep
  'embed' unsharded under fsdp (its axis is taken by the batch)."""
  rules = parallel.logical_rules(strategy)
  axes = transformer.logical_axes(configs_util.load_config("configs/magvlt.py:tiny"))
  resolve = lambda names: jax.sharding.PartitionSpec(*nn_axes(names, rules))
  assert resolve(axes["token_embed"]) == token
  assert resolve(axes["block_0"]["mlp"]["fc1"]["kernel"]) == fc1
  assert resolve(axes["block_0"]["attn"]["wq"]) == wq
  act = "mlp" if strategy == "fsdp_tensor" else "embed"
  assert resolve(("batch", "length", act)) == batch_act
  # Scanned blocks: the stacked "layers" axis stays whole, the rest shards as unscanned.
  scan_config = configs_util.load_config("configs/magvlt.py:tiny")
  scan_config.model.scan_layers = True
  scanned = transformer.logical_axes(scan_config)["blocks"]
  assert resolve(scanned["mlp"]["fc1"]["kernel"]) == P(None, *fc1)
  assert resolve(scanned["attn"]["wq"]) == P(None, *wq)
  assert parallel.shard_batch_spec(rules) == P(("data", "fsdp"))


def nn_axes(names, rules):
  return tuple(parallel.nn.logical_to_mesh_axes(tuple(names), rules))


def test_fit_spec_replicates_indivisible_dims():
  """jit shardings must divide evenly: a 3-channel conv under fsdp=4 stays replicated."""
  mesh = jax.sharding.AbstractMesh((2, 4, 1), parallel.MESH_AXES)
  assert parallel.fit_spec(P(None, None, None, "fsdp"), (3, 3, 8, 3), mesh) == P(None, None, None, None)
  assert parallel.fit_spec(P(None, "fsdp"), (3, 64), mesh) == P(None, "fsdp")
  assert parallel.fit_spec(P(("data", "fsdp")), (12, 5), mesh) == P(None, None)
  assert parallel.fit_spec(P(("data", "fsdp")), (16, 5), mesh) == P(("data", "fsdp"), None)


@pytest.fixture(scope="module")
def worker_result(tmp_path_factory):
  ckpt = str(tmp_path_factory.mktemp("ckpt"))
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, os.path.join(_HERE, "sharding_worker.py"), ckpt],
                        env=env, capture_output=True, text=True, timeout=900)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  return json.loads(lines[-1][len("RESULT "):])


STRATEGIES = ("data", "fsdp", "fsdp_tensor")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_sharded_step_matches_single_device(worker_result, strategy):
  r, got = worker_result, worker_result[strategy]
  assert r["devices"] == 8
  assert got["step"] == 1
  assert got["init_params_diff"] == 0.0  # sharded init == single-device init
  assert abs(got["loss"] - r["ref_loss"]) <= 1e-5 * abs(r["ref_loss"])
  # The update moves params by ~lr; the sharded one agrees up to float reduction order (a wrong
  # gradient shows up as a flipped Adam step, 2 lr; Shardy's fsdp_tensor bug did exactly that).
  assert r["ref_update"] > 0.5 * r["lr"]
  assert got["params_diff"][0] < 1e-2 * r["lr"], got["params_diff"]
  assert got["opt_diff"] < 1e-6


@pytest.mark.slow
def test_params_and_optimizer_sharded_as_rules_say(worker_result):
  r = worker_result
  assert (r["data"]["token_embed"], r["data"]["fc1"], r["data"]["mu_fc1"]) == (
      "(None, None)", "(None, None)", "(None, None)")
  assert r["data"]["fc1_shard_shape"] == [64, 256]  # whole kernel on each device
  assert (r["fsdp"]["token_embed"], r["fsdp"]["fc1"], r["fsdp"]["mu_fc1"]) == (
      "(None, 'fsdp')", "('fsdp', None)", "('fsdp', None)")
  assert r["fsdp"]["fc1_shard_shape"] == [16, 256]  # embed 64 over fsdp=4
  ft = r["fsdp_tensor"]
  assert (ft["token_embed"], ft["fc1"], ft["wq"], ft["mu_fc1"]) == (
      "('tensor', 'fsdp')", "('fsdp', 'tensor')", "('fsdp', 'tensor', None)", "('fsdp', 'tensor')")
  assert ft["fc1_shard_shape"] == [32, 128]  # embed over fsdp=2, mlp 256 over tensor=2


@pytest.mark.slow
def test_checkpoint_restores_onto_other_meshes(worker_result):
  """Saved from a 2x2x2 fsdp_tensor mesh; restored onto 1 device and onto a 2x4 fsdp mesh."""
  one, fsdp = worker_result["restore"]["one_device"], worker_result["restore"]["2x4_fsdp"]
  assert one["diff"] == 0.0 and one["devices"] == 1 and one["fc1"] == "(None, None)"
  assert fsdp["diff"] == 0.0 and fsdp["devices"] == 8 and fsdp["fc1"] == "('fsdp', None)"
