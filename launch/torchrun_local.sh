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

PROG=$(basename "$0")
die() { echo "$PROG: error: $*" >&2; exit 2; }

[[ $# -ge 2 ]] || die "usage: $PROG NPROC SCRIPT [SCRIPT ARGS...]"
NPROC=$1
SCRIPT=$2
shift 2
[[ $NPROC =~ ^[1-9][0-9]*$ ]] || die "NPROC must be a positive integer, got '$NPROC'"
[[ -f $SCRIPT ]] || die "training script '$SCRIPT' does not exist"
PYTHON=${PYTHON:-python3}

ARGS=("$@")
if [[ ${DUALPIPE_CPU:-0} == 1 && " ${ARGS[*]} " != *" --cpu "* ]]; then
    ARGS+=(--cpu)
fi

if grep -q -- "--preflight" "$SCRIPT"; then
    "$PYTHON" "$SCRIPT" "${ARGS[@]}" --preflight "$NPROC" >/dev/null || exit 2
fi

LOG_ARGS=()
if [[ -n ${LOG_DIR:-} ]]; then
    mkdir -p "$LOG_DIR"
    LOG_ARGS=(--log-dir "$LOG_DIR" --tee 3)
fi

# --standalone: a rendezvous on this machine on a free port (no MASTER_ADDR/MASTER_PORT to choose).
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc-per-node "$NPROC" "${LOG_ARGS[@]}" \
    "$SCRIPT" "${ARGS[@]}"
