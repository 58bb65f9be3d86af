"""Tensor metadata headers: what a receiver must know to allocate its buffers.

A chunk's forward output (one tensor or a tuple) is described by a fixed-size int64 header sent ahead of
the first payload on each channel in each step, so shapes and dtypes may change from step to step
(variable sequence length) without the receiver knowing them in advance.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from dualpipe_plugin.runtime.errors import PipelineConfigError

__all__ = ["TensorMeta", "HEADER_LEN", "encode_header", "decode_header", "describe"]

HEADER_LEN = 64

_DTYPES = (
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
)
_CODE = {dtype: code for code, dtype in enumerate(_DTYPES)}


class TensorMeta(NamedTuple):
    """Shape, dtype and whether a gradient flows back for one transferred tensor."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool

    @classmethod
    def of(cls, tensor: torch.Tensor) -> "TensorMeta":
        return cls(tuple(tensor.shape), tensor.dtype, bool(tensor.requires_grad))

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.shape, dtype=self.dtype, device=device)


def describe(metas: tuple[TensorMeta, ...]) -> str:
    return ", ".join(f"{str(m.dtype).removeprefix('torch.')}{list(m.shape)}" for m in metas)


def encode_header(metas: tuple[TensorMeta, ...], device: torch.device) -> torch.Tensor:
    values = [len(metas)]
    for meta in metas:
        if meta.dtype not in _CODE:
            raise PipelineConfigError(
                f"cannot send a {meta.dtype} tensor between pipeline stages; supported: "
                f"{', '.join(str(d) for d in _DTYPES)}"
            )
        values += [_CODE[meta.dtype], int(meta.requires_grad), len(meta.shape), *meta.shape]
    if len(values) > HEADER_LEN:
        raise PipelineConfigError(
            f"a stage output of {len(metas)} tensors ({describe(metas)}) does not fit the {HEADER_LEN}-entry "
            f"header; return fewer tensors between stages (pack them into one)"
        )
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[: len(values)] = torch.tensor(values, dtype=torch.int64)
    return header.to(device)


def decode_header(header: torch.Tensor) -> tuple[TensorMeta, ...]:
    values = header.tolist()
    count, position, metas = values[0], 1, []
    for _ in range(count):
        code, requires_grad, ndim = values[position : position + 3]
        shape = tuple(values[position + 3 : position + 3 + ndim])
        metas.append(TensorMeta(shape, _DTYPES[code], bool(requires_grad)))
        position += 3 + ndim
    return tuple(metas)
