"""What a host reports when it joins: its device, memory, and a quick measured speed."""

from __future__ import annotations

import platform
import time

import psutil
import torch

from ..wire.messages import Inventory


def measure_gflops(device: torch.device, size: int = 512, repeats: int = 8) -> float:
    """fp32 matmul throughput, a rough speed for logs and status (~10 ms on a CPU)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    (a @ b).sum().item()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        c = a @ b
    c.sum().item()  # waits for the device
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def take_inventory(device: str, memory_limit: int | None) -> Inventory:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device}: this host has no CUDA device")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise RuntimeError(f"--device {device}: only {torch.cuda.device_count()} CUDA devices here")
        dev = torch.device("cuda", index)
        free, total = torch.cuda.mem_get_info(dev)
        name = torch.cuda.get_device_name(dev)
    elif dev.type == "cpu":
        mem = psutil.virtual_memory()
        free, total = mem.available, mem.total
        name = platform.processor() or platform.machine()
    else:
        raise RuntimeError(f"--device {device}: use cpu, cuda or cuda:N")
    usable = free if memory_limit is None else min(free, memory_limit)
    return Inventory(device=str(dev), kind=dev.type, name=name, total_bytes=int(total), free_bytes=int(free),
                     usable_bytes=int(usable), gflops=round(measure_gflops(dev), 1),
                     threads=torch.get_num_threads())
