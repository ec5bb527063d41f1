#!/usr/bin/env bash
# Stop the training job on all workers (SIGTERM to the pid train.sh recorded: the trainer saves
# a checkpoint on SIGTERM). The pod slice keeps running; delete.sh releases it.
#   TPU_NAME=magvlt-pod launch/stop.sh [--dry-run]

source "$(dirname "$0")/common.sh"
parse_flags "$@"

on_workers all "if [ -f ~/${PID_FILE} ]; then kill -TERM \$(cat ~/${PID_FILE}) || true; rm -f ~/${PID_FILE}; fi"
