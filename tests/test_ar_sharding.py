"""A 2-device sharded ARGVLT / BiART train step equals the unsharded one (issue 15): fsdp
(BiART) and fsdp_tensor (ARGVLT) meshes over 2 fake CPU devices, in a subprocess (tests/ar_sharding_worker.py)
so XLA_FLAGS is set before jax starts."""
import json
import os
import subprocess
import sys

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def result():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, os.path.join(_HERE, "ar_sharding_worker.py")],
                        env=env, capture_output=True, text=True, timeout=1800)  # ~2.5 CPU min
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stderr[-4000:]
  return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow  # 2 sharded + 2 single-device compiles of the train step
@pytest.mark.parametrize("case", ["argvlt/fsdp_tensor", "lverse/fsdp"])
def test_sharded_ar_step_equals_unsharded(result, case):
  assert result["devices"] == 2
  got = result[case]
  assert got["objective"] == ("biart" if case.startswith("lverse") else "ar")
  assert got["step"] == 1 and got["init_params_diff"] == 0.0
  assert abs(got["loss"] - got["ref_loss"]) <= 1e-5 * abs(got["ref_loss"])
  # The update moves params by ~lr (Adam's first step); the sharded one agrees up to float
  # reduction order (a wrong gradient would flip an Adam step: 2 lr).
  assert got["ref_update"] > 0.5 * got["lr"]
  assert got["params_diff"][0] < 1e-2 * got["lr"], got["params_diff"]
  assert got["opt_diff"] < 1e-6
  # fsdp / tensor really split the MLP kernel over both devices
  assert got["fc1_devices"] == 2 and got["fc1"] != "(None, None)", got["fc1"]
