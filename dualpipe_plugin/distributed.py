"""What every rank of a launched job does at its start and at a refused exit.

Start-up that survives torchrun's elastic restarts.
After a worker dies, torchrun restarts every worker against the same rendezvous store. gloo's mesh
set-up then reads the peer addresses the *dead* workers published and fails with "connection refused".
:func:`init_distributed` gives each restart attempt its own key space (``TORCHELASTIC_RESTART_COUNT``),
so a restarted job connects cleanly. Outside torchrun it is a plain ``init_process_group``.

A refused exit: :func:`print_error_line` writes a rank's one-line error in one ``write``, so the lines of
ranks sharing a launcher's pipe never cut into each other (``print`` under ``python -u``, as the deepspeed
launcher starts ranks, writes the text and its newline separately).
"""

from __future__ import annotations

import datetime
import os

__all__ = ["init_distributed", "print_error_line"]


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Initialise the default process group from torchrun/SLURM-style env vars (RANK, WORLD_SIZE, MASTER_*)."""
    import torch.distributed as dist  # here, so that print_error_line costs no torch import (the CLI uses it)

    if dist.is_initialized():
        return
    backend = backend or ("nccl" if _cuda() else "gloo")
    timeout = datetime.timedelta(seconds=timeout_s)
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(
            f"cannot start torch.distributed: {', '.join(missing)} not set; launch with torchrun, the deepspeed "
            f"launcher or srun (see launch/), or set them by hand"
        )
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout)
        return
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                          timeout=timeout)
    dist.init_process_group(backend, store=dist.PrefixStore(f"attempt{attempt}", store), rank=rank,
                            world_size=world, timeout=timeout)


def print_error_line(line: str) -> None:
    """``line`` and a newline to stderr in one write (whole, up to the pipe's atomic size of 4 KiB)."""
    import io
    import sys

    text = line.replace("\n", " ") + "\n"
    sys.stderr.flush()
    try:
        descriptor = sys.stderr.fileno()
    except (AttributeError, ValueError, io.UnsupportedOperation):  # a captured stream (pytest, a notebook)
        sys.stderr.write(text)
        sys.stderr.flush()
        return
    os.write(descriptor, text.encode("utf-8", "replace"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
