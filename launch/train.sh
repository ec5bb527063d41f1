#!/usr/bin/env bash
# Start training on ALL workers with the same command (multi-host: config.mesh.distributed=True
# makes each process call jax.distributed.initialize()). Runs in the background on each worker,
# logging to ~/$LOG_FILE; WORKDIR must be shared storage (gs://...).
#   CONFIG=configs/magvlt.py:base WORKDIR=gs://bucket/runs/x TRAIN_ARGS="--config.mesh.strategy=fsdp" \
#     launch/train.sh [--dry-run]

source "$(dirname "$0")/common.sh"
parse_flags "$@"

cmd="python3 -m magvlt_jax.main --config=${CONFIG} --workdir=${WORKDIR} --mode=train"
cmd+=" --config.mesh.distributed=True --config.mesh.num_slices=${NUM_SLICES} ${TRAIN_ARGS}"
# nohup + pid file: the job survives the ssh session; stop.sh kills exactly this pid.
on_workers all "cd ~/${REMOTE_DIR} && nohup ${cmd% } > ~/${LOG_FILE} 2>&1 < /dev/null & echo \$! > ~/${PID_FILE}"
echo "Started. Stream logs with: TPU_NAME=${TPU_NAME} launch/logs.sh"
