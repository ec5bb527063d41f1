#!/usr/bin/env bash
# Create a Cloud TPU pod slice (or NUM_SLICES slices) through a queued resource and wait
# until it is ACTIVE.
#   PROJECT=... ZONE=us-east5-a TPU_NAME=magvlt-pod ACCELERATOR_TYPE=v5p-128 launch/create.sh [--dry-run]

source "$(dirname "$0")/common.sh"
parse_flags "$@"

args=(gcloud compute tpus queued-resources create "$QR_ID"
  --project="$PROJECT" --zone="$ZONE"
  --accelerator-type="$ACCELERATOR_TYPE" --runtime-version="$RUNTIME_VERSION")
if [[ "$NUM_SLICES" -gt 1 ]]; then
  args+=(--node-count="$NUM_SLICES" --node-prefix="$TPU_NAME")
else
  args+=(--node-id="$TPU_NAME")
fi
if [[ "$SPOT" == 1 ]]; then
  args+=(--spot)
fi
run "${args[@]}"

describe=(gcloud compute tpus queued-resources describe "$QR_ID"
  --project="$PROJECT" --zone="$ZONE" --format="value(state.state)")
if [[ "$DRY_RUN" == 1 ]]; then
  run "${describe[@]}"
  exit 0
fi
echo "Waiting for queued resource $QR_ID to become ACTIVE (Ctrl-C is safe; re-run to keep waiting)..."
while true; do
  state=$("${describe[@]}")
  echo "$(date -u +%H:%M:%S) $QR_ID: $state"
  case "$state" in
    ACTIVE) break ;;
    FAILED|SUSPENDED) echo "queued resource $QR_ID is $state; see 'gcloud compute tpus" \
                           "queued-resources describe $QR_ID'" >&2; exit 1 ;;
  esac
  sleep 30
done
