#!/usr/bin/env bash
# Install magvlt_jax (with the [tpu] extra) on every worker of the pod slice(s).
# With REPO_URL set each worker clones it (REPO_REF); otherwise this checkout is packed with
# `git archive` (committed files of HEAD) and copied to every worker.
#   TPU_NAME=magvlt-pod launch/setup.sh [--dry-run]

source "$(dirname "$0")/common.sh"
parse_flags "$@"

install="cd ~/${REMOTE_DIR} && python3 -m pip install -U pip && python3 -m pip install -e \".[tpu]\""
if [[ -n "$REPO_URL" ]]; then
  on_workers all "rm -rf ~/${REMOTE_DIR} && git clone --branch ${REPO_REF} ${REPO_URL} ~/${REMOTE_DIR} && ${install}"
else
  repo_root=$(cd "$(dirname "$0")/.." && pwd)
  tarball="/tmp/${REMOTE_DIR}.tar.gz"
  run git -C "$repo_root" archive --format=tar.gz --output="$tarball" HEAD
  for node in $(node_names); do
    run gcloud compute tpus tpu-vm scp "$tarball" "${node}:~/" --project="$PROJECT" \
      --zone="$ZONE" --worker=all
  done
  on_workers all "rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/${REMOTE_DIR}.tar.gz -C ~/${REMOTE_DIR} && ${install}"
fi
# Sanity check: every worker sees its local TPU chips.
on_workers all "python3 -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
