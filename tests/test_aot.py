"""tools/aot_compile: the trainer's train step and the T2I loop compile for a TPU topology on
this CPU (libtpu's compile-only devices). Skipped without libtpu."""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from magvlt_jax.tools import aot_compile

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None

# tiny, shrunk like tests/sharding_worker.py so the TPU compile stays short.
SMALL = ["--config.model.num_layers=1", "--config.model.embed_dim=64", "--config.model.num_heads=2",
         "--config.vqgan.image_size=8", "--config.vqgan.channel_mult=(1,2)",
         "--config.vqgan.base_channels=16", "--config.sequence.image_tokens=16",
         "--config.train.use_unroll=False", "--config.train.use_mixsel=False",
         "--config.train.aux_batch_stride=1"]  # batch 8 over 4 chips: the probe takes it whole


def test_topology_names():
  assert aot_compile.resolve_topology("v5p-128") == ("v5p:4x4x4", "megacore", 95, 459.0)
  assert aot_compile.resolve_topology("v4:2x2x4")[:3] == ("v4:2x2x4", "megacore", 32)
  assert aot_compile.resolve_topology("v5e-256")[0] == "v5e:16x16"
  with pytest.raises(ValueError, match="--topology='tpu7'"):
    aot_compile.resolve_topology("tpu7")


def test_analytic_flops_scale_with_batch():
  from magvlt_jax import configs_util  # pylint: disable=import-outside-toplevel
  config = configs_util.load_config("configs/magvlt.py:base")
  one = aot_compile.analytic_train_flops(config, 1)
  assert aot_compile.analytic_train_flops(config, 64) == pytest.approx(64 * one)
  # 6 N tokens dominates: base has ~302M matmul params and 324 tokens per example.
  assert 6 * 302e6 * 324 < one < 2 * 6 * 302e6 * 324


class _OverflowingLowered:
  """Stands in for jit(f).lower(...): compile() fails the way XLA:TPU does on an HBM overflow."""

  def lower(self, *args):
    del args
    return self

  def compile(self):
    raise aot_compile.jax.errors.JaxRuntimeError(
        "RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: XLA:TPU compile permanent error. Ran out "
        "of memory in memory space hbm. Used 18.70G of 15.75G hbm. Exceeded hbm capacity by 2.95G.")


def test_hbm_overflow_is_reported_as_does_not_fit():
  with pytest.raises(aot_compile.DoesNotFit, match=r"train on v5e:16x16 .*per-chip batch 16.*does "
                     r"NOT fit in 16 GiB.*Used 18.70G of 15.75G hbm.*--per_chip_batch"):
    aot_compile.compile_one("train", _OverflowingLowered(), (), topology="v5e:16x16", config=None,
                            mesh=None, per_chip_batch=16, global_batch=4096)


@pytest.mark.slow
@pytest.mark.skipif(not _HAS_LIBTPU, reason="libtpu is not installed")
def test_aot_compile_cli_on_v5p_2x2x1():
  env = dict(os.environ, JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  cmd = [sys.executable, "-m", "magvlt_jax.tools.aot_compile", "--config=configs/magvlt.py:tiny",
         "--topology=v5p:2x2x1", "--strategy=fsdp", "--per_chip_batch=2"] + SMALL
  proc = subprocess.run(cmd, cwd=_ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  out = proc.stdout
  assert "== train on v5p:2x2x1 (fsdp, mesh data x fsdp x tensor = 1x4x1), per-chip batch 2, " \
         "global batch 8" in out
  assert "== t2i on v5p:2x2x1" in out
  mems = [float(m) for m in re.findall(r"per-chip memory: ([0-9.]+) GiB", out)]
  flops = [float(f) for f in re.findall(r"FLOPs per chip \(XLA cost analysis\): ([0-9.e+]+)", out)]
  assert len(mems) == 2 and all(0 < m < 95 for m in mems), out
  assert len(flops) == 2 and all(f > 1e6 for f in flops), out
