#!/usr/bin/env bash
# Delete the queued resource and its TPU VM(s). Checkpoints in WORKDIR (GCS) are kept.
#   TPU_NAME=magvlt-pod launch/delete.sh [--dry-run]

source "$(dirname "$0")/common.sh"
parse_flags "$@"

run gcloud compute tpus queued-resources delete "$QR_ID" --project="$PROJECT" --zone="$ZONE" \
  --force --quiet
