"""Our weight-only Triton kernels run by Triton's interpreter on the CPU, against torch on the same
weights: the logic of every tile family (plain and transposed, K split or not, splits that do not
divide the groups, tiles that N and the rows do not fill), the in-kernel sum of split products
with its counters back at zero, and both dequantize paths. Run by tests/test_kernels_interpreted.py
in a process of its own (TRITON_INTERPRET must be set before triton is imported, and the
interpreter needs a numpy older than the project's: the Makefile installs both apart).

float32 and float16 only: the interpreter does not reproduce bf16 bit casts inside products (the
GPU tests in tests/test_gpu_decode.py cover bf16). Exits non-zero with the failing cases listed.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

from hetserve.model.weight_only import WeightOnlyLinear, group_major  # noqa: E402
from hetserve.model.weight_only_kernels import TileConfig, dequantize, int4_matmul, int8_matmul  # noqa: E402

# (rows, K, N, tiles): splits of 1-4 over 6-8 K blocks; rows and N that leave tiles part-empty
INT4_CASES = [(1, 1024, 96, TileConfig(16, 64, 128, 4, 4, 1, True)),
              (3, 1024, 96, TileConfig(16, 64, 128, 3, 4, 1, True)),
              (20, 768, 80, TileConfig(64, 64, 128, 2, 4, 1)),
              (20, 768, 80, TileConfig(64, 64, 256, 1, 4, 1)),
              (5, 768, 150, TileConfig(16, 128, 128, 1, 4, 1, True))]
INT8_CASES = [(1, 1024, 96, TileConfig(16, 32, 128, 4, 4, 1)),
              (20, 512, 80, TileConfig(64, 64, 128, 2, 4, 1, True)),
              (7, 640, 70, TileConfig(16, 64, 128, 1, 4, 1))]


def off(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest value."""
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def int4_linear(n: int, k: int, group: int, dtype: torch.dtype) -> WeightOnlyLinear:
    q = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    scale = group_major(torch.rand(n, k // group) / 64).to(dtype)
    zero = group_major(torch.rand(n, k // group) / 64).to(dtype)
    return WeightOnlyLinear(q, scale, zero, None, 4, group, k)


def main() -> int:
    torch.manual_seed(0)
    failures = []

    def check(name: str, error: float, counters: torch.Tensor | None = None) -> None:
        if not error < 1e-2 or (counters is not None and counters.any()):
            failures.append(f"{name}: off by {error:.2e}, counters left {counters.tolist() if counters is not None else []}")

    for dtype in (torch.float32, torch.float16):
        for rows, k, n, tiles in INT4_CASES:
            linear = int4_linear(n, k, 128, dtype)
            for launch in range(2):  # the second reuses the counters the first left
                x = torch.randn(rows, k).to(dtype)
                got = int4_matmul(x, linear.weight, linear.scale, linear.zero, 128, tiles, linear.counters)
                check(f"int4 {dtype} {rows}x{k}x{n} {tiles} launch {launch}",
                      off(got, F.linear(x.float(), linear.dequantized_by_torch())), linear.counters)
        for rows, k, n, tiles in INT8_CASES:
            linear = WeightOnlyLinear(torch.randint(-127, 128, (n, k), dtype=torch.int8), (torch.rand(n) / 64).to(dtype),
                                      None, None, 8, 0, k)
            x = torch.randn(rows, k).to(dtype)
            want = F.linear(x.float(), linear.dequantized_by_torch())
            check(f"int8 {dtype} {rows}x{k}x{n} {tiles}", off(int8_matmul(x, linear.weight, linear.scale, tiles,
                                                                           linear.counters), want), linear.counters)
            check(f"int8 {dtype} {rows}x{k}x{n} {tiles}, counters made per launch",
                  off(int8_matmul(x, linear.weight, linear.scale, tiles), want))
            check(f"int8 dequantize {dtype}", off(dequantize(linear.weight, linear.scale, None, 8, 0, k),
                                                  linear.dequantized_by_torch()))
        for group, k in ((128, 512), (96, 576)):  # a power of two: a group a block; 96: each value's byte gathered
            linear = int4_linear(70, k, group, dtype)
            check(f"int4 dequantize {dtype} group {group}",
                  off(dequantize(linear.weight, linear.scale, linear.zero, 4, group, k), linear.dequantized_by_torch()))
    for failure in failures:
        print(failure)
    print(f"{len(failures)} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
