"""Tensors as raw frames beside a msgpack header: no pickle, shape and dtype checked on arrival."""

from __future__ import annotations

import math

import numpy as np
import torch

from .codec import WireError
from .messages import TensorMeta

WIRE_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int64": torch.int64,
}
_NAMES = {v: k for k, v in WIRE_DTYPES.items()}


def to_frame(tensor: torch.Tensor) -> tuple[TensorMeta, memoryview]:
    """A CPU view of the tensor's bytes (no copy for a contiguous CPU tensor)."""
    tensor = tensor.detach().contiguous().cpu()
    raw = tensor.view(torch.uint8) if tensor.numel() else torch.empty(0, dtype=torch.uint8)
    return TensorMeta(_NAMES[tensor.dtype], list(tensor.shape)), memoryview(raw.numpy()).cast("B")


def from_frame(meta: TensorMeta, frame, shape: tuple[int | None, ...], dtypes: tuple[str, ...],
               device: torch.device) -> torch.Tensor:
    """Validate meta against the expected shape (None = any size) and dtypes, then copy in.

    The frame buffer is read-only (owned by ZeroMQ), so it is copied once into a fresh tensor;
    for a GPU into pinned memory, from where it is queued to the device without waiting for the
    work queued there (model/copies.py says why).
    """
    if meta.dtype not in dtypes:
        raise WireError(f"tensor dtype {meta.dtype!r}, expected one of {dtypes}")
    if len(meta.shape) != len(shape) or any(
        d < 0 or (want is not None and d != want) for d, want in zip(meta.shape, shape)
    ):
        raise WireError(f"tensor shape {meta.shape}, expected {list(shape)}")
    dtype = WIRE_DTYPES[meta.dtype]
    nbytes = math.prod(meta.shape) * torch.empty(0, dtype=dtype).element_size()
    buf = memoryview(frame)
    if buf.nbytes != nbytes:
        raise WireError(f"tensor frame holds {buf.nbytes} bytes, its header says {nbytes}")
    gpu = device.type == "cuda"
    out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=gpu)
    if nbytes:
        out.numpy()[:] = np.frombuffer(buf, dtype=np.uint8)
    return out.view(dtype).reshape(meta.shape).to(device, non_blocking=gpu)
