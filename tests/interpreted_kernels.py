"""Our Triton kernels run by Triton's interpreter on the CPU, against torch on the same inputs.
Weight-only matmuls: every tile family (plain and transposed, K split or not, splits that do not
divide the groups, tiles that N and the rows do not fill), the in-kernel sum of split products
with its counters back at zero, and both dequantize paths. Slot attention: the new K/V written
into each row's slot (a padding row's into the scratch column), rotary applied inside, grouped
query heads, keys past one block. Run by tests/test_kernels_interpreted.py
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

from hetserve.model.slot_attention import slot_decode_attention, slot_prefill_attention  # noqa: E402
from hetserve.model.weight_only import random_linear  # noqa: E402
from hetserve.model.weight_only_kernels import TileConfig, dequantize, int4_matmul, int8_matmul  # noqa: E402

# (rows, K, N, tiles): splits of 1-4 over 6-8 K blocks; rows and N that leave tiles part-empty
INT4_CASES = [(1, 1024, 96, TileConfig(16, 64, 128, 4, 4, 1, True)),
              (3, 1024, 96, TileConfig(16, 64, 128, 3, 4, 1, True)),
              (20, 768, 80, TileConfig(64, 64, 128, 2, 4, 1)),
              (20, 768, 80, TileConfig(64, 64, 256, 1, 4, 1)),
              (5, 768, 150, TileConfig(16, 128, 128, 1, 4, 1, True)),
              (3, 1280, 96, TileConfig(16, 32, 256, 4, 4, 1))]  # 5 blocks of 2 groups over 4 splits
INT8_CASES = [(1, 1024, 96, TileConfig(16, 32, 128, 4, 4, 1)),
              (20, 512, 80, TileConfig(64, 64, 128, 2, 4, 1, True)),
              (7, 640, 70, TileConfig(16, 64, 128, 1, 4, 1)),
              (150, 448, 100, TileConfig(128, 64, 64, 2, 4, 1))]  # two row blocks, K blocks of 64


def off(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest error relative to the largest value."""
    return ((got.float() - want).abs().max() / want.abs().max()).item()


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., D] * cos + rotate_half(x) * sin, as transformers' Llama applies rotary."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def attention_error(dtype: torch.dtype, rotary: bool) -> float:
    """Slot attention for 3 rows (the last a padding row) of 8 query heads over 2 K/V heads against
    writing the K/V and attending with torch, row by row; also the caches written."""
    heads, kv_heads, dim, slots, context = 8, 2, 16, 4, 100
    keys = torch.randn(slots, kv_heads, context + 1, dim).to(dtype)
    values = torch.randn(slots, kv_heads, context + 1, dim).to(dtype)
    q = torch.randn(3, heads, 1, dim).to(dtype)
    k, v = torch.randn(3, kv_heads, 1, dim).to(dtype), torch.randn(3, kv_heads, 1, dim).to(dtype)
    slot, start, length = torch.tensor([2, 0, 3]), torch.tensor([70, 5, 0]), torch.tensor([1, 1, 0])
    cos, sin = torch.randn(3, 1, dim).to(dtype), torch.randn(3, 1, dim).to(dtype)
    want_keys, want_values = keys.clone(), values.clone()
    got = slot_decode_attention(q, k, v, keys, values, slot, start, length, context, dim ** -0.5,
                                rotary=(cos, sin) if rotary else None).float()
    error = 0.0
    for row in range(2):  # the padding row's output is discarded by its callers
        s, p = int(slot[row]), int(start[row])
        qr, kr = (rotated(q[row].float(), cos[row].float(), sin[row].float()),
                  rotated(k[row].float(), cos[row].float(), sin[row].float())) if rotary else (q[row].float(), k[row].float())
        want_keys[s, :, p] = kr[:, 0].to(dtype)
        want_values[s, :, p] = v[row, :, 0]
        ks = want_keys[s, :, :p + 1].float().repeat_interleave(heads // kv_heads, 0)  # [H, p + 1, D]
        vs = want_values[s, :, :p + 1].float().repeat_interleave(heads // kv_heads, 0)
        want = F.scaled_dot_product_attention(qr, ks, vs).reshape(1, heads * dim)  # [1, H * D]
        error = max(error, off(got[row], want))
    want_keys[int(slot[2]), :, context] = k[2, :, 0] if not rotary else \
        rotated(k[2].float(), cos[2].float(), sin[2].float())[:, 0].to(dtype)  # the scratch column
    want_values[int(slot[2]), :, context] = v[2, :, 0]
    written = max(off(keys, want_keys.float()), off(values, want_values.float()))
    return max(error, written)


def non_finite_kv_error(rotary: bool) -> float:
    """A float16 row whose new K/V overflowed: the cache holds them finite, as SlotKVCache.write
    stores them (a later owner of the slot attends past them with weight 0, and 0 * inf = NaN)."""
    heads, kv_heads, dim, context = 4, 2, 16, 20
    keys, values = torch.zeros(2, kv_heads, context + 1, dim).half(), torch.zeros(2, kv_heads, context + 1, dim).half()
    q = torch.randn(1, heads, 1, dim).half()
    k, v = torch.randn(1, kv_heads, 1, dim).half(), torch.randn(1, kv_heads, 1, dim).half()
    k[0, 0, 0, :3] = v[0, 1, 0, 4:7] = torch.tensor([float("inf"), float("-inf"), float("nan")]).half()
    cos, sin = torch.ones(1, 1, dim).half(), torch.zeros(1, 1, dim).half()  # rotary that changes nothing
    slot_decode_attention(q, k, v, keys, values, torch.tensor([1]), torch.tensor([5]), torch.tensor([1]), context,
                          dim ** -0.5, rotary=(cos, sin) if rotary else None)
    return max(off(keys[1, :, 5], torch.nan_to_num(k[0, :, 0]).float()),
               off(values[1, :, 5], torch.nan_to_num(v[0, :, 0]).float()))


def prefill_attention_error(dtype: torch.dtype, heads: int, rows: list[tuple[int, int, int]]) -> float:
    """Prefill attention for `rows` (slot, position, length) over caches already written, 2 K/V
    heads, against torch row by row (padding rows, length 0, are discarded by the callers)."""
    kv_heads, dim, slots, context = 2, 16, 4, 300
    keys = torch.randn(slots, kv_heads, context + 1, dim).to(dtype)
    values = torch.randn(slots, kv_heads, context + 1, dim).to(dtype)
    q = torch.randn(len(rows), heads, 1, dim).to(dtype)
    slot, start, length = (torch.tensor(column) for column in zip(*rows))
    got = slot_prefill_attention(q, keys, values, slot, start, length, dim ** -0.5).float()
    error = 0.0
    for row, (s, p, n) in enumerate(rows):
        if n:
            ks = keys[s, :, :p + 1].float().repeat_interleave(heads // kv_heads, 0)  # [H, p + 1, D]
            vs = values[s, :, :p + 1].float().repeat_interleave(heads // kv_heads, 0)
            want = F.scaled_dot_product_attention(q[row].float(), ks, vs).reshape(1, heads * dim)
            error = max(error, off(got[row], want))
    return error


def main() -> int:
    torch.manual_seed(0)
    failures = []

    def check(name: str, error: float, counters: torch.Tensor | None = None) -> None:
        if not error < 1e-2 or (counters is not None and counters.any()):
            left = f", counters left {counters.tolist()}" if counters is not None else ""
            failures.append(f"{name}: off by {error:.2e}{left}")

    for dtype in (torch.float32, torch.float16):
        for rows, k, n, tiles in INT4_CASES:
            linear = random_linear(4, n, k, 128, dtype, "cpu")
            for launch in range(2):  # the second reuses the counters the first left
                x = torch.randn(rows, k).to(dtype)
                got = int4_matmul(x, linear.weight, linear.scale, linear.zero, 128, tiles, linear.counters)
                check(f"int4 {dtype} {rows}x{k}x{n} {tiles} launch {launch}",
                      off(got, F.linear(x.float(), linear.dequantized_by_torch())), linear.counters)
        for rows, k, n, tiles in INT8_CASES:
            linear = random_linear(8, n, k, 0, dtype, "cpu")
            x = torch.randn(rows, k).to(dtype)
            want = F.linear(x.float(), linear.dequantized_by_torch())
            check(f"int8 {dtype} {rows}x{k}x{n} {tiles}", off(int8_matmul(x, linear.weight, linear.scale, tiles,
                                                                           linear.counters), want), linear.counters)
            check(f"int8 {dtype} {rows}x{k}x{n} {tiles}, counters made per launch",
                  off(int8_matmul(x, linear.weight, linear.scale, tiles), want))
            check(f"int8 dequantize {dtype}", off(dequantize(linear.weight, linear.scale, None, 8, 0, k),
                                                  linear.dequantized_by_torch()))
        for group, k in ((128, 512), (96, 576)):  # a power of two: a group a block; 96: each value's byte gathered
            linear = random_linear(4, 70, k, group, dtype, "cpu")
            check(f"int4 dequantize {dtype} group {group}",
                  off(dequantize(linear.weight, linear.scale, linear.zero, 4, group, k), linear.dequantized_by_torch()))
        for rotary in (False, True):
            check(f"slot attention {dtype} rotary {rotary}", attention_error(dtype, rotary))
            if dtype == torch.float16:
                check(f"slot attention float16 non-finite K/V stored finite, rotary {rotary}", non_finite_kv_error(rotary))
        # blocks of 16 rows (8 query heads over 2 K/V heads: 4 a K/V head, 64 a tile): a prompt of
        # 40 tokens (two whole blocks of one slot, tiled, and a part block), then a decode row, a
        # later chunk of another prompt and padding in blocks attended row by row
        prompt = [(2, p, 1) for p in range(40)]
        mixed = prompt + [(1, 50, 1)] + [(3, p, 1) for p in range(30, 47)] + [(0, 0, 0)] * 2
        # a later chunk past several key blocks of 64, its blocks of 16 rows across their edges
        later = [(1, p, 1) for p in range(120, 250)]
        for name, rows in (("one prompt", prompt), ("mixed", mixed), ("a later chunk", later)):
            check(f"prefill attention {dtype} {name}", prefill_attention_error(dtype, 8, rows))
        check(f"prefill attention {dtype} 3 query heads a K/V head", prefill_attention_error(dtype, 6, mixed))
    for failure in failures:
        print(failure)
    print(f"{len(failures)} failing case(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
