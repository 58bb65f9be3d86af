#!/usr/bin/env bash
# Run a training script on NPROC processes of this machine with torchrun (one per GPU, or gloo on CPU).
#
#   launch/torchrun_local.sh NPROC SCRIPT [SCRIPT ARGS...]
#
#   launch/torchrun_local.sh 8 launch/train_deepspeed.py --deepspeed_config configs/deepspeed/dualpipev.json \
#       --pipeline-stages 4
#   launch/torchrun_local.sh 4 launch/train_deepspeed.py --cpu --deepspeed_config ... --steps 2   # CPU, gloo
#
# Environment:
#   DUALPIPE_CPU=1   append --cpu to the script's arguments (CPU + gloo; for scripts that take --cpu)
#   LOG_DIR=DIR      also write every rank's stdout/stderr under DIR (torchrun --log-dir, --tee)
#   PYTHON=...       the interpreter (default: python3 on PATH)
#
# A script that accepts `--preflight WORLD_SIZE` (launch/train_deepspeed.py, launch/pretrain_gpt.py) is
# first run that way in this shell, so a missing config file or a schedule that NPROC ranks cannot run
# fails at once with one line, before any rank starts.
set -euo pipefail

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
local_launch_args "$@"

LOG_ARGS=()
if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
    LOG_ARGS=(--log-dir "$LOG_DIR" --tee 3)
fi

# --standalone: a rendezvous on this machine on a free port (no MASTER_ADDR/MASTER_PORT to choose).
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" "${LOG_ARGS[@]}" \
    "$SCRIPT" "${ARGS[@]}"
