"""Run Megatron-LM's ``pretrain_gpt.py`` (or any script calling ``pretrain``) with ``--pipeline-schedule``.

    torchrun --nproc-per-node 8 -m dualpipe_plugin.megatron.run_megatron_lm \\
        /path/to/Megatron-LM/pretrain_gpt.py <Megatron-LM arguments> --pipeline-schedule dualpipev

    python -m dualpipe_plugin.megatron.run_megatron_lm --cpu SCRIPT.py ...   # CPU/gloo (CI, laptops)

Order, so that the patch cannot come too late: :func:`dualpipe_plugin.megatron.patch_megatron_lm` is
applied first (``--cpu``: and :func:`~dualpipe_plugin.megatron.enable_cpu_mode`), then the script's folder
is put first on ``sys.path`` as Python does for a script (Megatron-LM's ``pretrain_gpt.py`` imports
``gpt_builders``, ``model_provider`` from beside it), then the script runs as ``__main__`` (``runpy``).
Megatron-LM needs no edit.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path
from typing import Any

from dualpipe_plugin.distributed import print_error_line

_USAGE = "usage: python -m dualpipe_plugin.megatron.run_megatron_lm [--cpu] SCRIPT.py [script arguments]"


def main(argv: list[str] | None = None) -> Any:
    """Patch, run the script; return the patch handle (``.undo()``) once the script returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    cpu = bool(argv) and argv[0] == "--cpu"
    if cpu:
        argv = argv[1:]
    if not argv or argv[0].startswith("-"):
        raise SystemExit(_USAGE)
    script = Path(argv[0])
    if not script.is_file():
        raise SystemExit(f"run_megatron_lm: error: the training script {str(script)!r} does not exist\n{_USAGE}")
    from dualpipe_plugin.megatron.lm_patch import patch_megatron_lm

    if cpu:
        from dualpipe_plugin.megatron.cpu_mode import enable_cpu_mode

        os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
        enable_cpu_mode()
    patch = patch_megatron_lm()
    folder = str(script.resolve().parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    sys.argv = argv
    runpy.run_path(str(script), run_name="__main__")
    return patch


def _cli() -> int:
    """``python -m``: a refused setting ends the rank with one line naming the fix (every rank says it)."""
    try:
        main()
    except ValueError as error:  # MegatronScheduleError, PipelineConfigError, ScheduleConfigError
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None else ""
        print_error_line(f"run_megatron_lm: error{where}: {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_cli())
