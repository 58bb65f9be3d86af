"""Run Megatron-LM's ``pretrain_gpt.py`` (or any script calling ``pretrain``) with ``--pipeline-schedule``.

    torchrun --nproc-per-node 8 -m dualpipe_plugin.megatron.run_megatron_lm \\
        /path/to/Megatron-LM/pretrain_gpt.py <Megatron-LM arguments> --pipeline-schedule dualpipev

Applies :func:`dualpipe_plugin.megatron.patch_megatron_lm` and then runs the script as ``__main__``
(``runpy``), so Megatron-LM needs no edit. Untested here: Megatron-LM is not installed in CI.
"""

from __future__ import annotations

import runpy
import sys
from typing import Any


def main(argv: list[str] | None = None) -> Any:
    """Patch, run the script; return the patch handle (``.undo()``) once the script returns."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0].startswith("-"):
        raise SystemExit("usage: python -m dualpipe_plugin.megatron.run_megatron_lm SCRIPT.py [script arguments]")
    from dualpipe_plugin.megatron.lm_patch import patch_megatron_lm

    patch = patch_megatron_lm()
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")
    return patch


if __name__ == "__main__":
    main()
