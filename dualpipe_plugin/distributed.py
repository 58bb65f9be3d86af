"""Process-group start-up that survives torchrun's elastic restarts.

After a worker dies, torchrun restarts every worker against the same rendezvous store. gloo's mesh
set-up then reads the peer addresses the *dead* workers published and fails with "connection refused".
:func:`init_distributed` gives each restart attempt its own key space (``TORCHELASTIC_RESTART_COUNT``),
so a restarted job connects cleanly. Outside torchrun it is a plain ``init_process_group``.
"""

from __future__ import annotations

import datetime
import os

import torch.distributed as dist

__all__ = ["init_distributed"]


def init_distributed(backend: str | None = None, timeout_s: float = 600.0) -> None:
    """Initialise the default process group from torchrun/SLURM-style env vars (RANK, WORLD_SIZE, MASTER_*)."""
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


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()
