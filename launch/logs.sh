#!/usr/bin/env bash
# Stream the training log of one worker (WORKER=0 by default; WORKER=all prints every worker's).
#   TPU_NAME=magvlt-pod WORKER=0 launch/logs.sh [--dry-run]

source "$(dirname "$0")/common.sh"
parse_flags "$@"

node=$(node_names | head -n 1)
run gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" \
  --worker="$WORKER" --command="tail -n 200 -F ~/${LOG_FILE}"
