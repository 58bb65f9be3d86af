"""The smallest Megatron-Core model chunk: what Megatron's schedules (and the plugin's through
``dualpipe_plugin.megatron``) ask of a module, around a slice of emulated layers.

Used by ``bench compare``'s Megatron entries (:mod:`dualpipe_plugin.bench.peers_megatron`) and
``benchmarks/megatron_compare.py``. The class subclasses Megatron's ``MegatronModule``, so it is built on
first use by :func:`emulated_megatron_chunk_class`: importing this module imports neither torch nor
Megatron-Core.
"""

from __future__ import annotations

__all__ = ["emulated_megatron_chunk_class"]


def emulated_megatron_chunk_class():
    """``EmulatedMegatronChunk(config, layers, *, pre_process, post_process)``: a ``MegatronModule`` running
    ``layers`` (e.g. :class:`~dualpipe_plugin.runtime.emulate.EmulatedLayer` s) in order. The first stage
    reads the micro-batch it is called with, the others the received activation (``set_input_tensor``);
    the output is the last layer's."""
    import torch
    from megatron.core.enums import ModelType
    from megatron.core.transformer.module import MegatronModule

    class EmulatedMegatronChunk(MegatronModule):
        model_type = ModelType.encoder_or_decoder

        def __init__(self, config, layers, *, pre_process: bool, post_process: bool):
            super().__init__(config=config)
            self.layers = torch.nn.ModuleList(layers)
            self.pre_process, self.post_process = pre_process, post_process
            self.input_tensor = None

        def set_input_tensor(self, input_tensor) -> None:
            self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

        def forward(self, x):
            h = x if self.pre_process else self.input_tensor
            for layer in self.layers:
                h = layer(h)
            return h

    return EmulatedMegatronChunk
