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


def token_places(lengths: list[int], steps: int) -> torch.Tensor | None:
    """[sum(lengths)] int64 (CPU): each real token's index in rows right-padded to `steps` and
    viewed as [B * steps]; None where no row is padded (the two layouts are the same)."""
    if all(n == steps for n in lengths):
        return None
    counts = torch.tensor(lengths, dtype=torch.int64)
    row_of = torch.repeat_interleave(torch.arange(len(lengths)), counts)
    firsts = torch.cumsum(counts, 0) - counts
    return row_of * steps + torch.arange(int(counts.sum())) - firsts[row_of]


def pack_rows(padded: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """[B, T, ...] right-padded rows -> [sum(lengths), ...], the real tokens in row order. Stages
    send hidden states this way: a mixed micro-batch of 64 decode rows and one 1024-token prompt
    is 1088 tokens, not 65 x 1024 (which for a Llama-3-8B shape passed ZeroMQ's message limit)."""
    rows, steps = padded.shape[:2]
    flat = padded.reshape(rows * steps, *padded.shape[2:])
    places = token_places(lengths, steps)
    return flat if places is None else flat.index_select(0, to_device(places, padded.device))


def unpack_rows(packed: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """pack_rows' inverse: [sum(lengths), ...] -> [B, max(lengths), ...], zeros at padding."""
    rows, steps = len(lengths), max(lengths)
    places = token_places(lengths, steps)
    if places is None:
        return packed.reshape(rows, steps, *packed.shape[1:])
    padded = packed.new_zeros((rows * steps, *packed.shape[1:]))
    padded.index_copy_(0, to_device(places, packed.device), packed)
    return padded.view(rows, steps, *packed.shape[1:])


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
