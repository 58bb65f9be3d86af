# Shared by the local launchers (sourced, not run): argument checks, DUALPIPE_CPU, and the preflight.
#
#   local_launch_args "$@"   sets PROG, NPROC, SCRIPT, PYTHON and the array ARGS (the script's arguments),
#                            then runs SCRIPT --preflight NPROC when the script supports it, so a missing
#                            config or a schedule NPROC ranks cannot run fails with one line, before any rank.
# shellcheck shell=bash

die() { echo "$PROG: error: $*" >&2; exit 2; }

local_launch_args() {
    PROG=$(basename "$0")
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
}
