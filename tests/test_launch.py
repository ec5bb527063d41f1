"""launch/ scripts: bash-syntax clean, and --dry-run prints the right gcloud commands."""
import os
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
SCRIPTS = ("create.sh", "setup.sh", "train.sh", "logs.sh", "stop.sh", "delete.sh")
ENV = {"PROJECT": "proj", "ZONE": "us-east5-a", "TPU_NAME": "pod", "ACCELERATOR_TYPE": "v5p-128",
       "BUCKET": "gs://bkt"}


def _dry_run(script, **env):
  full = {**os.environ, **ENV, **env}
  out = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry-run"], env=full,
                       capture_output=True, text=True, timeout=30, check=True)
  return [line[2:] for line in out.stdout.splitlines() if line.startswith("+ ")]


@pytest.mark.parametrize("script", SCRIPTS + ("common.sh",))
def test_bash_syntax(script):
  subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], check=True)


def test_create_uses_queued_resources():
  cmds = _dry_run("create.sh")
  assert cmds[0] == ("gcloud compute tpus queued-resources create pod-qr --project=proj "
                     "--zone=us-east5-a --accelerator-type=v5p-128 --runtime-version=v2-alpha-tpuv5 "
                     "--node-id=pod")
  multi = _dry_run("create.sh", NUM_SLICES="2", ACCELERATOR_TYPE="v4-32", SPOT="1")[0]
  assert "--node-count=2 --node-prefix=pod --spot" in multi
  assert "--runtime-version=tpu-ubuntu2204-base" in multi


def test_setup_installs_on_all_workers():
  cmds = _dry_run("setup.sh")
  assert cmds[0].startswith("git -C ") and " archive " in cmds[0]
  assert cmds[1].startswith("gcloud compute tpus tpu-vm scp /tmp/magvlt_jax.tar.gz pod:~/")
  assert "--worker=all" in cmds[1]
  assert all("--worker=all" in c for c in cmds[2:]) and 'pip install -e ".[tpu]"' in cmds[2]
  cloned = _dry_run("setup.sh", REPO_URL="https://example.com/r.git")
  assert "git clone --branch main https://example.com/r.git" in cloned[0]


def test_train_same_command_on_all_workers_of_each_slice():
  cmds = _dry_run("train.sh", NUM_SLICES="2", TRAIN_ARGS="--config.mesh.strategy=fsdp")
  assert [c.split()[5] for c in cmds] == ["pod-0", "pod-1"]
  assert cmds[0].replace("pod-0", "pod-1") == cmds[1]
  cmd = cmds[0]
  assert "--worker=all" in cmd
  assert ("python3 -m magvlt_jax.main --config=configs/magvlt.py:base "
          "--workdir=gs://bkt/runs/pod --mode=train --config.mesh.distributed=True "
          "--config.mesh.num_slices=2 --config.mesh.strategy=fsdp") in cmd
  assert "nohup" in cmd and "magvlt_train.pid" in cmd


def test_logs_stop_delete():
  assert _dry_run("logs.sh", WORKER="3") == [
      "gcloud compute tpus tpu-vm ssh pod --project=proj --zone=us-east5-a --worker=3 "
      "'--command=tail -n 200 -F ~/magvlt_train.log'"]
  stop = _dry_run("stop.sh")
  assert len(stop) == 1 and "--worker=all" in stop[0] and "kill -TERM" in stop[0]
  assert _dry_run("delete.sh") == [
      "gcloud compute tpus queued-resources delete pod-qr --project=proj --zone=us-east5-a "
      "--force --quiet"]


def test_unknown_flag_fails():
  out = subprocess.run(["bash", os.path.join(LAUNCH, "train.sh"), "--bogus"],
                       env=dict(os.environ, **ENV), capture_output=True, text=True)
  assert out.returncode == 2 and "unknown argument '--bogus'" in out.stderr
