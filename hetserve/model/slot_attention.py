"""Attention that reads the slot KV cache where it lies: one Triton kernel a layer (GPU).

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

Prefill steps run their prompt tokens as rows too (static_steps.py), through a second kernel:
rows of one prompt share a slot and programs run in no order, so the caller writes every row's
K/V first and the kernel only attends. A program takes QUERY_TILE query heads' worth of
consecutive rows: where they are all one prompt's tokens, one tile of them reads each key once
(row by row, each of 2048 tokens reread its prompt's keys, and at 2048 tokens a step was slower
than transformers' eager SDPA, docs/benchmarks.md); a block across prompts, a decode row riding
in the step or padding attends row by row, as decode does.
"""

from __future__ import annotations

import torch

from .weight_only_kernels import dot_precision

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: decode_layers.py falls back to gather + SDPA
    triton = None

BLOCK_N = 64  # keys per block of the online softmax
QUERY_TILE = 64  # prefill: query heads x prompt tokens of one K/V head a program attends at once


def available(device: torch.device, head_dim: int) -> bool:
    """Whether the kernel can serve a stage on `device` (a power-of-two head dim, for tl.arange)."""
    return triton is not None and device.type == "cuda" and head_dim >= 16 and head_dim & (head_dim - 1) == 0


if triton is not None:
    @triton.jit
    def _attend(q, last, keys, k_cache_ptr, v_cache_ptr, cache, stride_cl, scale,
                ROWS: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr):
        """q [ROWS, D] of one slot's K/V head (at `cache` in the caches) attending keys 0..last[r]
        for query row r (last [ROWS]), in blocks of BLOCK_N up to `keys` (> every last), with an
        online softmax -> [ROWS, D] float32. Key 0 is in every row's range, so no row's sum is 0."""
        d = tl.arange(0, HEAD_DIM)
        best = tl.full([ROWS], float("-inf"), tl.float32)
        total = tl.zeros([ROWS], tl.float32)
        acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
        for first in range(0, keys, BLOCK_N):
            n = first + tl.arange(0, BLOCK_N)
            offsets = cache + n[:, None] * stride_cl + d[None, :]
            k = tl.load(k_cache_ptr + offsets, mask=(n < keys)[:, None], other=0.0)  # [BLOCK_N, D]
            scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # [ROWS, BLOCK_N] float32
            scores = tl.where(n[None, :] <= last[:, None], scores, float("-inf"))
            new_best = tl.maximum(best, tl.max(scores, 1))
            rescale = tl.exp(best - new_best)
            p = tl.exp(scores - new_best[:, None])
            total = total * rescale + tl.sum(p, 1)
            v = tl.load(v_cache_ptr + offsets, mask=(n < keys)[:, None], other=0.0)
            acc = acc * rescale[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            best = new_best
        return acc / total[:, None]

    @triton.jit
    def _attend_row(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, row, kv_head, slot, position, real, stride_qb, stride_qh,
                    stride_cs, stride_ch, stride_cl, stride_ob, stride_oh, scale, cos, sin, partner,
                    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
                    ROTARY: tl.constexpr, PRECISION: tl.constexpr):
        """One row's query heads of K/V head `kv_head` ([BLOCK_G, D], padded to 16 rows for
        tl.dot) attending keys 0..position of its slot; a padding row (not real) key 0 only
        (finite, discarded)."""
        d = tl.arange(0, HEAD_DIM)
        g = tl.arange(0, BLOCK_G)
        heads = kv_head * GROUP + g
        q_rows = q_ptr + row * stride_qb + heads[:, None] * stride_qh
        q = tl.load(q_rows + d[None, :], mask=(g < GROUP)[:, None], other=0.0)  # [BLOCK_G, D]
        if ROTARY:
            q_partner = tl.load(q_rows + partner[None, :], mask=(g < GROUP)[:, None], other=0.0)
            q = (q.to(tl.float32) * cos[None, :] + q_partner.to(tl.float32) * sin[None, :]).to(q.dtype)
        last = tl.where(real, position, 0)
        out = _attend(q, tl.zeros([BLOCK_G], tl.int32) + last, last + 1, k_cache_ptr, v_cache_ptr,
                      slot * stride_cs + kv_head * stride_ch, stride_cl, scale, BLOCK_G, BLOCK_N, HEAD_DIM, PRECISION)
        tl.store(out_ptr + row * stride_ob + heads[:, None] * stride_oh + d[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=(g < GROUP)[:, None])

    @triton.jit
    def _finite(x):
        """torch.nan_to_num for float16: NaN -> 0, +-inf -> +-65504."""
        y = x.to(tl.float32)
        return tl.where(y != y, 0.0, tl.minimum(tl.maximum(y, -65504.0), 65504.0)).to(x.dtype)

    @triton.jit
    def _slot_decode_attention(
        q_ptr, k_new_ptr, v_new_ptr, k_cache_ptr, v_cache_ptr, out_ptr, slots_ptr, starts_ptr, lengths_ptr,
        cos_ptr, sin_ptr,
        stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh,
        stride_cs, stride_ch, stride_cl, stride_ob, stride_oh, stride_rb,
        scratch, scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
        ROTARY: tl.constexpr, PRECISION: tl.constexpr, FINITE: tl.constexpr,
    ):
        row = tl.program_id(0)
        kv_head = tl.program_id(1)
        slot = tl.load(slots_ptr + row)
        position = tl.load(starts_ptr + row)
        real = tl.load(lengths_ptr + row) > 0
        d = tl.arange(0, HEAD_DIM)
        cache = slot * stride_cs + kv_head * stride_ch
        partner = (d + HEAD_DIM // 2) % HEAD_DIM
        cos = tl.zeros([HEAD_DIM], tl.float32)
        sin = cos
        if ROTARY:  # x * cos + rotate_half(x) * sin, rotate_half(x)[d] = -x[d + D/2] below D/2, x[d - D/2] above
            cos = tl.load(cos_ptr + row * stride_rb + d).to(tl.float32)  # [D]
            sin = tl.load(sin_ptr + row * stride_rb + d).to(tl.float32) * tl.where(d < HEAD_DIM // 2, -1.0, 1.0)

        write_at = tl.where(real, position, scratch)
        k_new = k_new_ptr + row * stride_kb + kv_head * stride_kh
        key = tl.load(k_new + d)
        if ROTARY:  # in float32, rounded once, as the torch.compile'd rotary it replaces
            key = (key.to(tl.float32) * cos + tl.load(k_new + partner).to(tl.float32) * sin).to(key.dtype)
        value = tl.load(v_new_ptr + row * stride_vb + kv_head * stride_vh + d)
        if FINITE:  # a float16 cache stores non-finite K/V finite, as SlotKVCache.write (kv_cache.py says why)
            key, value = _finite(key), _finite(value)
        tl.store(k_cache_ptr + cache + write_at * stride_cl + d, key)
        tl.store(v_cache_ptr + cache + write_at * stride_cl + d, value)
        tl.debug_barrier()  # the key just written is read below, by other threads of this program
        _attend_row(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, row, kv_head, slot, position, real, stride_qb, stride_qh,
                    stride_cs, stride_ch, stride_cl, stride_ob, stride_oh, scale, cos, sin, partner,
                    GROUP, BLOCK_G, BLOCK_N, HEAD_DIM, ROTARY, PRECISION)

    @triton.jit
    def _slot_prefill_attention(
        q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, slots_ptr, starts_ptr, lengths_ptr, rows,
        stride_qb, stride_qh, stride_cs, stride_ch, stride_cl, stride_ob, stride_oh, scale,
        GROUP: tl.constexpr, BLOCK_G: tl.constexpr, ROW_G: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, PRECISION: tl.constexpr,
    ):
        """Rows BLOCK_Q * pid .. of one K/V head. Where they are all real tokens of one slot (a
        prompt's), their query heads form one [BLOCK_Q * BLOCK_G, D] tile that reads each key
        once for all of them, row r seeing keys 0..its position; a block across prompts, decode
        rows or padding attends row by row."""
        block = tl.program_id(0)
        kv_head = tl.program_id(1)
        d = tl.arange(0, HEAD_DIM)
        r = block * BLOCK_Q + tl.arange(0, BLOCK_Q)
        in_range = r < rows
        first_slot = tl.load(slots_ptr + block * BLOCK_Q)
        slot_r = tl.load(slots_ptr + r, mask=in_range, other=0)
        real_r = tl.load(lengths_ptr + r, mask=in_range, other=1) > 0
        uniform = tl.sum(((slot_r != first_slot) & in_range) | ~real_r, 0) == 0
        if uniform:
            m = tl.arange(0, BLOCK_Q * BLOCK_G)
            row = block * BLOCK_Q + m // BLOCK_G
            g = m % BLOCK_G
            ok = (g < GROUP) & (row < rows)
            q = tl.load(q_ptr + row[:, None] * stride_qb + (kv_head * GROUP + g)[:, None] * stride_qh + d[None, :],
                        mask=ok[:, None], other=0.0)  # [BLOCK_Q * BLOCK_G, D]
            last = tl.load(starts_ptr + row, mask=row < rows, other=0)
            out = _attend(q, last, tl.max(last, 0) + 1, k_cache_ptr, v_cache_ptr,
                          first_slot * stride_cs + kv_head * stride_ch, stride_cl, scale,
                          BLOCK_Q * BLOCK_G, BLOCK_N, HEAD_DIM, PRECISION)
            tl.store(out_ptr + row[:, None] * stride_ob + (kv_head * GROUP + g)[:, None] * stride_oh + d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=ok[:, None])
        else:
            unused = tl.zeros([HEAD_DIM], tl.float32)
            for i in range(BLOCK_Q):
                row = block * BLOCK_Q + i
                if row < rows:
                    _attend_row(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, row, kv_head, tl.load(slots_ptr + row),
                                tl.load(starts_ptr + row), tl.load(lengths_ptr + row) > 0, stride_qb, stride_qh,
                                stride_cs, stride_ch, stride_cl, stride_ob, stride_oh, scale, unused, unused, d,
                                GROUP, ROW_G, BLOCK_N, HEAD_DIM, False, PRECISION)


def slot_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_cache: torch.Tensor,
                          value_cache: torch.Tensor, slots: torch.Tensor, starts: torch.Tensor,
                          lengths: torch.Tensor, scratch: int, scale: float,
                          rotary: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """q [b, Hq, 1, D], new k and v [b, Hkv, 1, D], caches [slots, Hkv, max_context + 1, D],
    slots/starts/lengths [b] int64, one row a slot -> attention output [b, 1, Hq*D]; k and v land
    in the caches. `rotary`: cos and sin [b, 1, D] to apply to q and k first."""
    rows, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and key_cache.is_contiguous() and value_cache.is_contiguous()
    cos, sin = rotary if rotary is not None else (q, q)  # unread without ROTARY
    assert cos.stride(-1) == 1 and cos.stride() == sin.stride()
    group = heads // kv_heads
    out = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)
    _slot_decode_attention[(rows, kv_heads)](
        q, k, v, key_cache, value_cache, out, slots, starts, lengths, cos, sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), out.stride(0), out.stride(1), cos.stride(0),
        scratch, scale,
        GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=BLOCK_N, HEAD_DIM=dim,
        ROTARY=rotary is not None, PRECISION=dot_precision(q.dtype), FINITE=key_cache.dtype == torch.float16,
    )
    return out.view(rows, 1, heads * dim)


def slot_prefill_attention(q: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, slots: torch.Tensor,
                           starts: torch.Tensor, lengths: torch.Tensor, scale: float) -> torch.Tensor:
    """Rows that may share a slot (a prompt's tokens, consecutive, in order; decode rows and
    padding between them), their K/V already in the caches (programs run in no order, so the
    caller writes every row's first) and rotary applied: q [b, Hq, 1, D], caches and
    slots/starts/lengths as slot_decode_attention's -> [b, 1, Hq*D]."""
    rows, heads, _, dim = q.shape
    kv_heads = key_cache.shape[1]
    assert q.stride(-1) == 1 and key_cache.is_contiguous() and value_cache.is_contiguous()
    group = heads // kv_heads
    block_g = triton.next_power_of_2(group)
    block_q = max(1, QUERY_TILE // block_g)
    out = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)
    _slot_prefill_attention[(triton.cdiv(rows, block_q), kv_heads)](
        q, key_cache, value_cache, out, slots, starts, lengths, rows,
        q.stride(0), q.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), out.stride(0),
        out.stride(1), scale,
        GROUP=group, BLOCK_G=block_g, ROW_G=max(16, block_g), BLOCK_Q=block_q, BLOCK_N=BLOCK_N, HEAD_DIM=dim,
        PRECISION=dot_precision(q.dtype),
        num_stages=1 if q.dtype == torch.float32 else 3,  # float32 tiles in 3 stages take 180 KB of shared memory, 82 KB in 1
    )
    return out.view(rows, 1, heads * dim)
