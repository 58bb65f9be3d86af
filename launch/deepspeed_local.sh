#!/usr/bin/env bash
# Run a training script on NPROC processes of this machine with the deepspeed launcher.
#
#   launch/deepspeed_local.sh NPROC SCRIPT [SCRIPT ARGS...]
#
#   launch/deepspeed_local.sh 8 launch/train_deepspeed.py --deepspeed_config configs/deepspeed/dualpipev.json \
#       --pipeline-stages 4
#   DUALPIPE_CPU=1 launch/deepspeed_local.sh 4 launch/train_deepspeed.py --deepspeed_config ... --steps 2
#
# This is `deepspeed --num_gpus NPROC --num_nodes 1 SCRIPT ARGS`. The launcher starts the ranks itself
# (no ssh, no hostfile) and appends --local_rank=N to the script's arguments. On CPU it works as on GPUs:
# with --num_gpus given it starts NPROC processes whatever its CPU accelerator counts (one per NUMA node
# by default); the script must then run DeepSpeed on its CPU accelerator (DS_ACCELERATOR=cpu, gloo), which
# launch/train_deepspeed.py does with --cpu. The launcher sets CUDA_VISIBLE_DEVICES=0..NPROC-1 even on
# CPU (harmless) and does not set OMP_NUM_THREADS (train_deepspeed.py --cpu divides the cores itself).
#
# Environment:
#   DUALPIPE_CPU=1   append --cpu to the script's arguments
#   MASTER_PORT=N    the rendezvous port (default 29500)
#   LOG_DIR=DIR      write each rank's output to DIR/<time>_rank<N>.log instead of the console
#   PYTHON=...       the interpreter (default: python3 on PATH)
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
local_launch_args "$@"

LAUNCHER_ARGS=(--num_gpus "$NPROC" --num_nodes 1 --master_port "${MASTER_PORT:-29500}")
if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
    LAUNCHER_ARGS+=(--enable_each_rank_log "$LOG_DIR")
fi
if [[ ${DUALPIPE_CPU:-0} == 1 ]]; then
    export DS_ACCELERATOR=cpu  # the launcher's own accelerator probe, quiet and deterministic
fi

exec "$PYTHON" -m deepspeed.launcher.runner "${LAUNCHER_ARGS[@]}" "$SCRIPT" "${ARGS[@]}"
