"""Decode attention that reads the slot KV cache where it lies: one Triton kernel per layer (GPU).

Why: with transformers' attention a decode step gathers each row's keys and values out of its
slot (index_select: a copy of all the K/V the rows read), builds a [B, 1, 1, L] mask and then
runs SDPA over a context bucket, then writes the new K/V with two index_put kernels. Measured on
an H200 (Llama-3-8B shape, docs/benchmarks.md) that was 5-6 of the ~21 kernels per layer left
after fusing the elementwise ones, and at 16 of 64 rows the gather made the step slower than at
64. Here one program per (row, K/V head):
  - applies rotary to the row's query and new key where the caller passes cos and sin (two
    torch.compile'd kernels a layer before, 0.29 ms of a 64-row step on the H200),
  - writes the row's new key and value at its position in its slot (padding rows, length 0,
    write the cache's scratch column, as StepLayout does),
  - attends the query heads of that K/V head to keys 0..position of the slot, in blocks, with an
    online softmax (a row's own length bounds the loop, so no mask and no context padding).
The query heads of one K/V head form the rows of a [BLOCK_G, D] tile (padded to 16, the
smallest tile tl.dot takes), so grouped-query attention reads each key once.

Prefill steps run their prompt tokens as rows of the same kernel (static_steps.py). Rows of one
prompt share a slot and programs run in no order, so there the caller writes every row's K/V
first and the kernel only attends (`write=False`). Each row rereads its prompt's keys: fine for
serving chunks, but at 2048 tokens in one step it is slower than a query-tiled kernel
(docs/benchmarks.md).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decode_layers.py falls back to gather + SDPA
    triton = None

BLOCK_N = 64  # keys per block of the online softmax


def available(device: torch.device, head_dim: int) -> bool:
    """Whether the kernel can serve a stage on `device` (a power-of-two head dim, for tl.arange)."""
    return triton is not None and device.type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0


if triton is not None:
    @triton.jit
    def _slot_decode_attention(
        q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, out_ptr, slots_ptr, starts_ptr, lengths_ptr,
        cos_ptr, sin_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_cs, stride_ch, stride_cl, stride_ob, stride_oh, stride_rb,
        scratch, scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        WRITE: tl.constexpr, ROTARY: tl.constexpr, PRECISION: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        slot = tl.load(slots_ptr + row)
        position = tl.load(starts_ptr + row)
        real = tl.load(lengths_ptr + row) > 0
        d = tl.arange(0, HEAD_DIM)
        cache = slot * stride_cs + kv_head * stride_ch
        if ROTARY:  # x * cos + rotate_half(x) * sin, rotate_half(x)[d] = -x[d + D/2] below D/2, x[d - D/2] above
            partner = (d + HEAD_DIM // 2) % HEAD_DIM
            sign = tl.where(d < HEAD_DIM // 2, -1.0, 1.0)
            cos = tl.load(cos_ptr + row * stride_rb + d).to(tl.float32)  # [D]
            sin = tl.load(sin_ptr + row * stride_rb + d).to(tl.float32) * sign

        if WRITE:
            write_at = tl.where(real, position, scratch)
            k_new = k_new_ptr + row * stride_kb + kv_head * stride_kh
            key = tl.load(k_new + d)
            if ROTARY:  # in float32, rounded once, as the torch.compile'd rotary it replaces
                key = (key.to(tl.float32) * cos + tl.load(k_new + partner).to(tl.float32) * sin).to(key.dtype)
            tl.store(k_cache_ptr + cache + write_at * stride_cl + d, key)
            tl.store(v_cache_ptr + cache + write_at * stride_cl + d,
                     tl.load(v_new_ptr + row * stride_vb + kv_head * stride_vh + d))
            tl.debug_barrier()  # the key just written is read below, by other threads of this program

        g = tl.arange(0, BLOCK_G)
        heads = kv_head * GROUP + g
        q_rows = q_ptr + row * stride_qb + heads[:, None] * stride_qh
        q = tl.load(q_rows + d[None, :], mask=(g < GROUP)[:, None], other=0.0)  # [BLOCK_G, D]
        if ROTARY:
            q_partner = tl.load(q_rows + partner[None, :], mask=(g < GROUP)[:, None], other=0.0)
            q = (q.to(tl.float32) * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]).to(q.dtype)
        keys = tl.where(real, position + 1, 1)  # padding rows attend to key 0 only: finite, discarded
        best = tl.full([BLOCK_G], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for first in range(0, keys, BLOCK_N):
            n = first + tl.arange(0, BLOCK_N)
            valid = n < keys
            offsets = cache + n[:, None] * stride_cl + d[None, :]
            k = tl.load(k_cache_ptr + offsets, mask=valid[:, None], other=0.0)  # [BLOCK_N, D]
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [BLOCK_G, BLOCK_N] float32
            scores = tl.where(valid[None, :], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            rescale = tl.exp(best - new_best)
            p = tl.exp(scores - new_best[:, None])
            total = total * rescale + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + offsets, mask=valid[:, None], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            best = new_best
        out = acc / total[:, None]
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(g < GROUP)[:, None])


def slot_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
                          lengths: torch.Tensor, scratch: int, scale: float, write: bool = True,
                          rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [b, Hq, 1, D], new k and v [b, Hkv, 1, D], caches [slots, Hkv, max_context + 1, D],
    slots/starts/lengths [b] int64 -> attention output [b, 1, Hq*D]; k and v land in the caches
    (unless `write` is off: rows that share a slot, whose K/V the caller wrote before, since
    programs run in no order). `rotary`: cos and sin [b, 1, D] to apply to q and k first (with
    `write` only: keys the caller wrote are already rotated)."""
    rows, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and key_cache.is_contiguous() and value_cache.is_contiguous()
    assert rotary is None or write
    cos, sin = rotary if rotary is not None else (q, q)  # unread without ROTARY
    assert cos.stride(-1) == 1 and cos.stride() == sin.stride()
    group = heads // kv_heads
    out = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)
    _slot_decode_attention[(rows, kv_heads)](
        q, k, v, key_cache, value_cache, out, slots, starts, lengths, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), out.stride(0), out.stride(1), cos.stride(0),
        scratch, scale,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N, HEAD_DIM=dim, WRITE=write,
        ROTARY=rotary is not None,
        # float32 stages keep float32 products (tl.dot would round them to tf32, and greedy tokens
        # would drift from transformers'); 16-bit inputs multiply exactly either way.
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return out.view(rows, 1, heads * dim)
