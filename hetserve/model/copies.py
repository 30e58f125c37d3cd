"""Copies between the host and a GPU that never wait for the work queued on the GPU.

A host queues a micro-batch's kernels while the micro-batch before is still computing
(worker/stage_loop.py). A plain `tensor.to("cuda")` from pageable memory synchronizes the stream
first, so each step would wait for the one before it; from pinned memory, with non_blocking, the
copy is queued behind that work like a kernel. Pinned blocks come from torch's caching host
allocator, which reuses one only once the copies that read it have run.
"""

from __future__ import annotations

import torch


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`, queued on a GPU's current stream (the host does not wait)."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def copy_into(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst (on any device) <- src (a CPU tensor of its shape), queued like to_device."""
    cuda = dst.device.type == "cuda"
    dst.copy_(src.pin_memory() if cuda else src, non_blocking=cuda)


def column(values: list[int], device: torch.device) -> torch.Tensor:
    """[len(values)] int64 on `device`."""
    return to_device(torch.tensor(values, dtype=torch.int64), device)


class HostCopy:
    """A tensor's copy on the host, queued behind the work that computes it; `wait` returns it."""

    def __init__(self, tensor: torch.Tensor):
        if tensor.device.type != "cuda":
            self.tensor, self.done = tensor, None
            return
        self.tensor = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        self.tensor.copy_(tensor, non_blocking=True)
        self.done = torch.cuda.Event(enable_timing=True)  # also ends the stage's timing (stage_loop.py)
        self.done.record(torch.cuda.current_stream(tensor.device))  # the copy's stream, on cuda:N too

    def wait(self) -> torch.Tensor:
        """Blocks (releasing the GIL) until the copy has run."""
        if self.done is not None:
            self.done.synchronize()
        return self.tensor
