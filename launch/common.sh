# Shared settings and helpers for the launch/ scripts. Sourced, not run.
# Every setting is an environment variable with a default; see launch/README.md.

set -euo pipefail

: "${PROJECT:=$(gcloud config get-value project 2>/dev/null || echo my-project)}"
: "${ZONE:=us-east5-a}"
: "${TPU_NAME:=magvlt-pod}"
: "${ACCELERATOR_TYPE:=v5p-128}"
: "${NUM_SLICES:=1}"                 # >1: a multi-slice queued resource (data parallel over DCN)
: "${QR_ID:=${TPU_NAME}-qr}"         # queued-resource id
: "${SPOT:=0}"                       # 1: --spot capacity
: "${REPO_URL:=}"                    # git URL to clone on workers; empty: copy this checkout
: "${REPO_REF:=main}"
: "${REMOTE_DIR:=magvlt_jax}"        # checkout location on each worker (relative to $HOME)
: "${CONFIG:=configs/magvlt.py:base}"
: "${BUCKET:=gs://${PROJECT}-magvlt}"
: "${RUN_NAME:=${TPU_NAME}}"
: "${WORKDIR:=${BUCKET}/runs/${RUN_NAME}}"  # must be shared by all workers (GCS)
: "${TRAIN_ARGS:=}"                  # extra flags, e.g. "--config.train.num_steps=1000"
: "${LOG_FILE:=magvlt_train.log}"    # on each worker, in $HOME
: "${PID_FILE:=magvlt_train.pid}"
: "${WORKER:=0}"                     # logs.sh: which worker to stream (or "all")

# Cloud TPU VM runtime (software) version per TPU generation, unless RUNTIME_VERSION is set.
default_runtime_version() {
  case "$1" in
    v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) echo "tpu-ubuntu2204-base" ;;
  esac
}
: "${RUNTIME_VERSION:=$(default_runtime_version "${ACCELERATOR_TYPE}")}"

DRY_RUN=0
parse_flags() {
  for arg in "$@"; do
    case "$arg" in
      --dry-run|-n) DRY_RUN=1 ;;
      -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
      *) echo "$(basename "$0"): unknown argument '$arg' (settings are environment variables;" \
              "see launch/README.md)" >&2; exit 2 ;;
    esac
  done
}

# run CMD...: print the command (shell-quoted); execute it unless --dry-run.
run() {
  local arg quoted=""
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=@,+%~-]+$ ]]; then
      quoted+=" $arg"
    else  # single-quote it (copy-pastable), escaping embedded single quotes
      quoted+=" '${arg//\'/\'\\\'\'}'"
    fi
  done
  echo "+${quoted}"
  if [[ "$DRY_RUN" == 0 ]]; then
    "$@"
  fi
}

# The TPU VM node names: one per slice.
node_names() {
  if [[ "$NUM_SLICES" -gt 1 ]]; then
    local i
    for ((i = 0; i < NUM_SLICES; i++)); do echo "${TPU_NAME}-${i}"; done
  else
    echo "${TPU_NAME}"
  fi
}

# on_workers WORKERS COMMAND: ssh COMMAND to the given workers of every slice.
on_workers() {
  local workers="$1" command="$2" node
  for node in $(node_names); do
    run gcloud compute tpus tpu-vm ssh "$node" --project="$PROJECT" --zone="$ZONE" \
      --worker="$workers" --command="$command"
  done
}
