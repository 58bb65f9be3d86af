"""dualpipe_plugin: DeepSeek's DualPipe and DualPipeV pipeline schedules for DeepSpeed and Megatron-Core.

Layers, top to bottom (each imports only from the ones below it):

- ``schedules``: pure Python; the schedule IR, generators, validator and simulator.
- ``runtime``: executes any schedule on ``torch.distributed``.
- ``moe``: a reference MoE block cut into overlappable sub-stages.
- ``deepspeed`` / ``megatron``: thin adapters onto the runtime.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]
