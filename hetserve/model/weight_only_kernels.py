"""Triton kernels for weight-only int8 (W8A16) and int4 (W4A16) matmuls on a GPU, their tile
choices and launchers; the modules that use them are in weight_only.py.

int8: one program loads int8 weight tiles, converts them to the activations' dtype in registers,
multiplies on tensor cores with fp32 accumulation and applies the per-channel scale once at the end.

int4 layout: per group of G values along K, byte j holds q[j] in its low nibble and q[G/2 + j] in
its high one. Each nibble half then multiplies a contiguous half of x's group, so no kernel
shuffles: per group, the bytes are dequantized in registers (w = q * scale - zero, by PTX doing
two values an instruction: _dequantize_ptx) and multiplied on tensor cores as two products into
one accumulator. An earlier kernel applied scale and zero to each group's sums of the nibbles
(offset into floats by a bit trick) and summed x per group in every program: bound by those
instructions, 1.2x slower a decode step (docs/benchmarks.md). One on the interleaved layout
(q[2j], q[2j + 1] in a byte) had to split x into even and odd columns and lost to quanto's
tinygemm. Scales and zeros are [N, K/G] of any strides; stored group-major their reads coalesce.

Products split along K write float32 partials [split, M, N]; the last program of a tile to finish
(a counter per tile) sums them into the output and resets the counter, so no second kernel runs.
Shapes: x [M, K] in the compute dtype (K contiguous); int8 weight [N, K] with scale [N]; int4
weight [N, K/2] uint8 with scale and zero [N, K/G], w = q * scale - zero; out [M, N].
"""

from __future__ import annotations

from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: quanto's modules stay
    triton = None


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # programs along K, each summing every split_k-th block; partials summed after
    warps: int
    stages: int
    swap: bool = False  # compute out^T = w @ x^T (the kernel says why)


SMS_FILLED = 128  # programs below which a prefill-sized int8 product splits along K (an H200 has 132 SMs)


def _block_m(rows: int) -> int:
    """Rows a program's tensor-core product covers: a power of two, 16 (tl.dot's least) to 64."""
    return min(64, max(16, 1 << (rows - 1).bit_length()))


def tile_config(rows: int, k: int, n: int) -> TileConfig:
    """Tiles for an int8 [rows, k] x [k, n] product. From sweeps on an H200 (Llama-3-8B shapes;
    benchmarks/weight_only_sweep.py --sweep, docs/benchmarks.md): at 1-16 rows narrow column
    blocks streaming long K blocks, a K past 4096 (the MLP's down projection) split among programs;
    from 17 rows K blocks of 64 (8-16 % faster a layer than 128 at 64 rows, the plain product
    ahead of the transposed one with them); past 64 rows (up to DEQUANTIZE_ROWS) blocks of 128
    rows, so each weight is converted for more rows, split in 2 where the tiles alone give few
    programs (SMS_FILLED). Gate|up's long N (> 16384) takes wider column blocks."""
    block_m = _block_m(rows)
    if block_m == 16:
        split = min(8, 1 << (-(-k // 4096) - 1).bit_length())
        return TileConfig(16, 32 if k <= 4096 else 64, 256, split, 4, 4)
    if rows <= 64:
        return TileConfig(block_m, 128, 64, 1, 4, 4) if n > 16384 else TileConfig(block_m, 64, 64, 4, 4, 4)
    if n > 16384:
        return TileConfig(128, 128, 64, 1, 8, 4)
    few = -(-n // 64) * -(-rows // 128) <= SMS_FILLED
    return TileConfig(128, 64, 64, 2 if few else 1, 4, 4)


def int4_tile_config(rows: int, k: int, n: int, group: int) -> TileConfig:
    """Tiles for an int4 [rows, k] x [k, n] product; block_k is a whole number of groups. From an
    int4 sweep on an H200 with the weights dequantized in registers by PTX (Llama-3-8B shapes,
    benchmarks/weight_only_sweep.py --bits 4 --sweep, docs/benchmarks.md): at 1-16 rows the plain
    product over two groups a step, narrow column blocks for a long K (the MLP's down projection),
    split in 4 along K but for gate|up's long N (> 16384), whose column blocks alone fill the GPU;
    from 17 rows the transposed product, one group a step, over 64 weight rows, split in 4 where N
    gives few column blocks; past 64 rows (up to DEQUANTIZE_ROWS) blocks of 128 x 128 for N > 4096.
    At 17-64 rows three stages of copies in flight, and gate|up's tile 128 weight rows wide on 8
    warps: from a sweep of warps and pipelining depth on an H100 (`--sweep pipe`; gate|up 50.5
    against 69.1 us at 64 rows, q|k|v 17.2 against 21.4 split in 4 rather than 2; a decode step at
    batch 64 11 % faster). Three stages at 1-16 rows made the step at 16 rows 5 % slower."""
    if _block_m(rows) == 16:
        return TileConfig(16, 32 if k > 4096 else 64, 2 * group, 1 if n > 16384 else 4, 4, 4)
    if rows <= 64:
        if n > 16384:
            return TileConfig(64, 128, group, 1, 8, 3, swap=True)
        return TileConfig(64, 64, group, 4, 4, 3, swap=True)
    if n <= 4096:
        return TileConfig(64, 64, group, 2, 4, 4, swap=True)
    return TileConfig(128, 128, group, 1 if n > 16384 else 2, 8, 4, swap=True)


def int4_kernel_fits(group: int) -> bool:
    """The int4 kernel takes groups of a power of two >= 32 values (a half group is one tl.dot's
    K, >= 16); other group sizes (quanto picks 96 for K = 576) run dequantize + cuBLAS."""
    return group >= 32 and group & (group - 1) == 0


def _dequantize_ptx(fma: str, offset: int, one: int, pack: int) -> str:
    """PTX dequantizing `pack` (2 or 4) bytes of 4-bit values, two values a 32-bit register. With
    p = pack / 2 pairs of bytes: in $2p the bytes; in $2p+1.. their scales, then p registers of
    their negated zeros (byte i's in half i % 2 of register i // 2) -> $0.. the low nibbles' w (p
    registers), then the high nibbles' (p). A byte permute puts a pair's bytes in the two halves of
    a register; an OR-AND sets a nibble as the low mantissa bits of `offset` (a float whose
    mantissa steps by 1 there), giving offset + q exactly; an fma subtracts the offset exactly and
    a second computes q * s - z rounded once."""
    pairs = pack // 2
    base = f"0x{offset:04X}{offset:04X}"
    lines = [".reg .b32 b<2>, h<2>, one, neg;", f"mov.b32 one, 0x{one:04X}{one:04X};",
             f"mov.b32 neg, 0x{offset | 0x8000:04X}{offset | 0x8000:04X};"]
    for i in range(pairs):
        lo, hi, scale, zero = f"${i}", f"${pairs + i}", f"${2 * pairs + 1 + i}", f"${3 * pairs + 1 + i}"
        lines += [f"prmt.b32 b{i}, ${2 * pairs}, 0, {('0x4140', '0x4342')[i]};", f"shr.u32 h{i}, b{i}, 4;",
                  f"lop3.b32 {lo}, b{i}, 0x000F000F, {base}, 0xEA;", f"lop3.b32 {hi}, h{i}, 0x000F000F, {base}, 0xEA;",
                  f"{fma} {lo}, {lo}, one, neg;", f"{fma} {hi}, {hi}, one, neg;",
                  f"{fma} {lo}, {lo}, {scale}, {zero};", f"{fma} {hi}, {hi}, {scale}, {zero};"]
    return "{\n" + "\n".join(lines) + "\n}"


if triton is not None:
    @triton.jit
    def _finish(acc, out_ptr, offsets, mask, partials_ptr, numel, counters_ptr, SPLIT_K: tl.constexpr):
        """Write a program's fp32 sums `acc` (any shape; `offsets` and `mask` of the same into the
        [M, N] output). Split along K: the program stores its partial ([SPLIT_K, M, N] float32,
        numel = M * N apart); the tile's counter (one int32 a tile of the grid's first two axes,
        zero between launches) says which program of the tile is last, and that one sums every
        split's partial, in split order, into out and sets the counter back to zero. A barrier and
        an acquire-release atomic at device scope order the partials' stores before the last
        program's loads, which bypass L1 (.cg)."""
        if SPLIT_K == 1:
            tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(partials_ptr + tl.program_id(2) * numel + offsets, acc, mask=mask)
            tl.debug_barrier()
            counter = counters_ptr + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
            if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == SPLIT_K - 1:
                total = tl.load(partials_ptr + offsets, mask=mask, other=0.0, cache_modifier=".cg")
                for split in tl.static_range(1, SPLIT_K):
                    total += tl.load(partials_ptr + split * numel + offsets, mask=mask, other=0.0,
                                     cache_modifier=".cg")
                tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")

    @triton.jit
    def _int8_matmul(x_ptr, w_ptr, scale_ptr, out_ptr, partials_ptr, counters_ptr, M, N, K, stride_xm, stride_wn,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr):
        """out [M, N] = x [M, K] @ (q [N, K] * scale [N])^T, this split's K blocks (_finish sums splits).
        SWAP computes the transpose, out^T = q @ x^T: the converted weights are then the product's
        first operand, which Hopper's wgmma takes from registers (the second must be in shared memory)."""
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        split = tl.program_id(2)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), tl.float32)
        for first in range(0, tl.cdiv(K, BLOCK_K), SPLIT_K):
            k = (first + split) * BLOCK_K + rk  # past K where SPLIT_K does not divide the blocks: masked
            k_ok = k < K
            if SWAP:
                q = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                            other=0)  # [BLOCK_N, BLOCK_K] int8
                x = tl.load(x_ptr + rm[None, :] * stride_xm + k[:, None], mask=m_ok[None, :] & k_ok[:, None],
                            other=0.0)  # [BLOCK_K, BLOCK_M]
                acc += tl.dot(q.to(x.dtype), x, input_precision=PRECISION)
            else:
                x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                            other=0.0)  # [BLOCK_M, BLOCK_K]
                q = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                            other=0)  # [BLOCK_K, BLOCK_N] int8
                acc += tl.dot(x, q.to(x.dtype), input_precision=PRECISION)
        scale = tl.load(scale_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
        if SWAP:  # out is [M, N] contiguous
            _finish(acc * scale[:, None], out_ptr, rm[None, :] * N + rn[:, None], m_ok[None, :] & n_ok[:, None],
                    partials_ptr, M * N, counters_ptr, SPLIT_K)
        else:
            _finish(acc * scale[None, :], out_ptr, rm[:, None] * N + rn[None, :], m_ok[:, None] & n_ok[None, :],
                    partials_ptr, M * N, counters_ptr, SPLIT_K)

    @triton.jit
    def _dequantize_bytes(packed, s, nz, PTX: tl.constexpr, PACK: tl.constexpr):
        """Bytes of 4-bit values [..] uint8 and their rows' scale and negated zero (broadcast to
        packed's shape, in the compute dtype) -> (low nibbles' w, high nibbles' w) in that dtype,
        w = q * s - z: by PTX (_dequantize_ptx), PACK bytes an instance; without (float32, or
        Triton's interpreter, which runs no PTX) in float32 arithmetic."""
        if PTX == "":
            lo = (packed & 0xF).to(tl.float32) * s.to(tl.float32) + nz.to(tl.float32)
            hi = (packed >> 4).to(tl.float32) * s.to(tl.float32) + nz.to(tl.float32)
            return lo.to(s.dtype), hi.to(s.dtype)
        elif PACK == 2:  # 16-bit pairs out, bytes, scales and zeros in
            return tl.inline_asm_elementwise(PTX, "=r,=r,r,r,r", [packed, s, nz], (s.dtype, s.dtype), is_pure=True,
                                             pack=2)
        else:
            return tl.inline_asm_elementwise(PTX, "=r,=r,=r,=r,r,r,r,r,r", [packed, s, nz], (s.dtype, s.dtype),
                                             is_pure=True, pack=4)

    @triton.jit
    def _int4_matmul(x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr, partials_ptr, counters_ptr, M, N, K, stride_xm,
                     stride_wn, stride_sn, stride_sg, PTX: tl.constexpr, PRECISION: tl.constexpr, GROUP: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr, SPLIT_K: tl.constexpr,
                     SWAP: tl.constexpr, PACK: tl.constexpr):
        """out [M, N] = x [M, K] @ w^T over this split's groups (_finish sums splits), w = q *
        scale[g] - zero[g] [N, K], dequantized in registers (_dequantize_bytes). A group's bytes hold
        its first half's values in their low nibbles and its second half's in their high ones, so
        each nibble half multiplies a contiguous half of x's group: two tensor-core products a group
        into one accumulator. SWAP computes out^T (the weights as the first operand, as in _int8_matmul)."""
        HALF: tl.constexpr = GROUP // 2
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        j = tl.arange(0, HALF)
        split = tl.program_id(2)
        m_ok, n_ok = rm < M, rn < N
        groups = K // GROUP
        acc = tl.zeros((BLOCK_N, BLOCK_M) if SWAP else (BLOCK_M, BLOCK_N), tl.float32)
        for first in range(0, tl.cdiv(groups, GROUPS), SPLIT_K):
            for a in tl.static_range(GROUPS):
                g = (first + split) * GROUPS + a  # past the last group where the splits do not divide them
                g_ok = g < groups
                k = g * GROUP + j  # the group's first half; the second is k + HALF
                # (the offsets written out in both loads: one shared offset tensor costs the 1-16-row
                # tile 12 more instructions a step in offline SASS)
                s = tl.load(scale_ptr + rn * stride_sn + g * stride_sg, mask=n_ok & g_ok,
                            other=0.0).to(x_ptr.dtype.element_ty)
                nz = -tl.load(zero_ptr + rn * stride_sn + g * stride_sg, mask=n_ok & g_ok,
                              other=0.0).to(x_ptr.dtype.element_ty)
                if SWAP:
                    packed = tl.load(w_ptr + rn[:, None] * stride_wn + (g * HALF + j)[None, :],
                                     mask=n_ok[:, None] & g_ok, other=0)  # [BLOCK_N, HALF] uint8
                    x_lo = tl.load(x_ptr + rm[None, :] * stride_xm + k[:, None], mask=m_ok[None, :] & g_ok,
                                   other=0.0)  # [HALF, BLOCK_M]
                    x_hi = tl.load(x_ptr + rm[None, :] * stride_xm + HALF + k[:, None], mask=m_ok[None, :] & g_ok,
                                   other=0.0)
                    w_lo, w_hi = _dequantize_bytes(packed, tl.broadcast_to(s[:, None], packed.shape),
                                                   tl.broadcast_to(nz[:, None], packed.shape), PTX, PACK)
                    acc = tl.dot(w_lo, x_lo, acc, input_precision=PRECISION)
                    acc = tl.dot(w_hi, x_hi, acc, input_precision=PRECISION)
                else:
                    packed = tl.load(w_ptr + rn[None, :] * stride_wn + (g * HALF + j)[:, None],
                                     mask=n_ok[None, :] & g_ok, other=0)  # [HALF, BLOCK_N] uint8
                    x_lo = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & g_ok,
                                   other=0.0)  # [BLOCK_M, HALF]
                    x_hi = tl.load(x_ptr + rm[:, None] * stride_xm + HALF + k[None, :], mask=m_ok[:, None] & g_ok,
                                   other=0.0)
                    w_lo, w_hi = _dequantize_bytes(packed, tl.broadcast_to(s[None, :], packed.shape),
                                                   tl.broadcast_to(nz[None, :], packed.shape), PTX, PACK)
                    acc = tl.dot(x_lo, w_lo, acc, input_precision=PRECISION)
                    acc = tl.dot(x_hi, w_hi, acc, input_precision=PRECISION)
        if SWAP:  # out is [M, N] contiguous
            _finish(acc, out_ptr, rm[None, :] * N + rn[:, None], m_ok[None, :] & n_ok[:, None], partials_ptr, M * N,
                    counters_ptr, SPLIT_K)
        else:
            _finish(acc, out_ptr, rm[:, None] * N + rn[None, :], m_ok[:, None] & n_ok[None, :], partials_ptr, M * N,
                    counters_ptr, SPLIT_K)

    @triton.jit
    def _dequantize(w_ptr, scale_ptr, zero_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_sg, stride_on,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """-> out [N, K] in its dtype. int8: w = q * scale[n]; int4 (the module docstring's layout):
        w = q * scale[n, g] - zero[n, g], a block of BLOCK_K = GROUP values one group, read once
        and written as two halves; other group sizes (not a power of two) gather each value's byte."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = rn < N
        if BITS == 8:
            k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
            q = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0)
            w = q.to(tl.float32) * tl.load(scale_ptr + rn * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            tl.store(out_ptr + rn[:, None] * stride_on + k[None, :], w.to(out_ptr.dtype.element_ty),
                     mask=n_ok[:, None] & (k < K)[None, :])
        elif BLOCK_K == GROUP:
            g = tl.program_id(1)
            j = tl.arange(0, GROUP // 2)
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + (g * (GROUP // 2) + j)[None, :], mask=n_ok[:, None],
                             other=0)  # [BLOCK_N, GROUP / 2]
            s = tl.load(scale_ptr + rn * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            z = tl.load(zero_ptr + rn * stride_sn + g * stride_sg, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            out = out_ptr + rn[:, None] * stride_on + (g * GROUP + j)[None, :]
            tl.store(out, ((packed & 0xF).to(tl.float32) * s - z).to(out_ptr.dtype.element_ty), mask=n_ok[:, None])
            tl.store(out + GROUP // 2, ((packed >> 4).to(tl.float32) * s - z).to(out_ptr.dtype.element_ty),
                     mask=n_ok[:, None])
        else:
            k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
            group, j = k // GROUP, k % GROUP
            byte = group * (GROUP // 2) + j % (GROUP // 2)  # each byte read for both its nibbles
            ok = n_ok[:, None] & (k < K)[None, :]
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + byte[None, :], mask=ok, other=0)
            q = tl.where((j < GROUP // 2)[None, :], packed & 0xF, packed >> 4)
            groups = rn[:, None] * stride_sn + group[None, :] * stride_sg
            s = tl.load(scale_ptr + groups, mask=ok, other=0.0).to(tl.float32)
            z = tl.load(zero_ptr + groups, mask=ok, other=0.0).to(tl.float32)
            w = q.to(tl.float32) * s - z
            tl.store(out_ptr + rn[:, None] * stride_on + k[None, :], w.to(out_ptr.dtype.element_ty), mask=ok)


def split_counters(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed tile counters for products of n columns split along K (_finish), as many as the chosen
    tiles can need: one row block of 16 or 64 rows with columns in blocks of 32 or more, or two
    of 128 rows (up to DEQUANTIZE_ROWS' 256) with blocks of 64. A launch needing more (a swept
    tile) gets fresh ones. Each counter is back to zero after every launch, so a module's products
    may share its counters, and graphs capture them, as long as two of its products never run at
    once (a stage runs one stream)."""
    return torch.zeros(2 * -(-n // 32), dtype=torch.int32, device=device)


def _outputs(x: torch.Tensor, n: int, config: TileConfig, counters: torch.Tensor | None):
    """out [rows, n] in x's dtype; split along K also float32 partials [split_k, rows, n] and zeroed
    counters, one a tile (`counters` where it has enough); out stands in for both otherwise."""
    rows = x.shape[0]
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    if config.split_k == 1:
        return out, out, out
    partials = torch.empty((config.split_k, rows, n), dtype=torch.float32, device=x.device)
    tiles = triton.cdiv(n, config.block_n) * triton.cdiv(rows, config.block_m)
    if counters is None or counters.numel() < tiles:
        counters = torch.zeros(tiles, dtype=torch.int32, device=x.device)
    return out, partials, counters


def fitting_stages(config: TileConfig, bits: int, itemsize: int, shared_bytes: int) -> TileConfig:
    """`config` with as many software-pipelined stages (up to its own) as the device's shared memory
    per program holds. A stage holds a K step's weight bytes and its x tile(s) in the compute dtype:
    the tiles above were swept in bf16 on Hopper (227 KB a program); float32 stages, and GPUs of
    less shared memory (99 KB on an RTX 4090), would fail to launch them (a float32 int4 128 x 128
    tile at 4 stages needs 283 KB)."""
    weights = config.block_k * config.block_n * bits // 8
    per_stage = weights + config.block_m * config.block_k * itemsize
    fit = (shared_bytes - UNSTAGED_SHARED_BYTES) // per_stage
    return config._replace(stages=max(1, min(config.stages, fit)))


UNSTAGED_SHARED_BYTES = 16 << 10  # what a program keeps in shared memory besides its stages (layout changes)
_SHARED_BYTES: dict[int, int] = {}  # CUDA device index -> shared memory a program may take


def _fitted(config: TileConfig, bits: int, x: torch.Tensor) -> TileConfig:
    """fitting_stages for x's GPU (Triton's interpreter, on the CPU, has no such limit)."""
    if not x.is_cuda:
        return config
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    if index not in _SHARED_BYTES:
        _SHARED_BYTES[index] = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return fitting_stages(config, bits, x.element_size(), _SHARED_BYTES[index])


def _grid(rows: int, n: int, config: TileConfig) -> tuple[int, int, int]:
    return triton.cdiv(n, config.block_n), triton.cdiv(rows, config.block_m), config.split_k


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for inputs of `dtype`: float32 stages keep float32 products (tf32
    would round them, and greedy tokens would drift from transformers'); 16-bit inputs multiply
    exactly either way."""
    return "ieee" if dtype == torch.float32 else "tf32"


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, config: TileConfig | None = None,
                counters: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (compute dtype, K contiguous), weight [N, K] int8, scale [N] -> [M, N] in x's dtype.
    counters: split_counters(N) to reuse (else zeroed ones are made where a product splits)."""
    rows, k = x.shape
    n = weight.shape[0]
    config = _fitted(config or tile_config(rows, k, n), 8, x)
    out, partials, counters = _outputs(x, n, config, counters)
    _int8_matmul[_grid(rows, n, config)](
        x, weight, scale, out, partials, counters, rows, n, k, x.stride(0), weight.stride(0),
        PRECISION=dot_precision(x.dtype),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        SWAP=config.swap, num_warps=config.warps, num_stages=config.stages,
    )
    return out


# _dequantize_bytes' PTX by compute dtype and bytes an instance: two where the weights are the
# product's first operand (SWAP: a register pair holds one row's neighbouring values; four would take
# ~56 byte permutes a group step to gather), four where they are its second (loaded four bytes a thread).
_PTX = {(dtype, pack): _dequantize_ptx(fma, offset, one, pack) for pack in (2, 4)
        for dtype, fma, offset, one in ((torch.bfloat16, "fma.rn.bf16x2", 0x4300, 0x3F80),  # 128.0, 1.0
                                        (torch.float16, "fma.rn.f16x2", 0x6400, 0x3C00))}  # 1024.0, 1.0


def _ptx(x: torch.Tensor, pack: int) -> str:
    """_dequantize_bytes' PTX for x on an NVIDIA GPU; "" (float32 arithmetic) for float32 and for the
    CPU tensors of Triton's interpreter, which cannot run PTX."""
    if not x.is_cuda or torch.version.hip is not None:
        return ""
    return _PTX.get((x.dtype, pack), "")


def int4_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int,
                config: TileConfig | None = None, counters: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] (compute dtype, K contiguous), weight [N, K / 2] uint8 in the module docstring's
    layout, scale and zero [N, K / group] (any strides; group-major reads coalesce) -> [M, N] in
    x's dtype. counters: as int8_matmul's."""
    rows, k = x.shape
    n = weight.shape[0]
    config = _fitted(config or int4_tile_config(rows, k, n, group), 4, x)
    out, partials, counters = _outputs(x, n, config, counters)
    pack = 2 if config.swap else 4  # bytes a PTX instance dequantizes (_PTX says why)
    _int4_matmul[_grid(rows, n, config)](
        x, weight, scale, zero, out, partials, counters, rows, n, k, x.stride(0), weight.stride(0), scale.stride(0),
        scale.stride(1), PTX=_ptx(x, pack), PRECISION=dot_precision(x.dtype), GROUP=group,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, GROUPS=config.block_k // group, SPLIT_K=config.split_k,
        SWAP=config.swap, PACK=pack, num_warps=config.warps, num_stages=config.stages,
    )
    return out


def dequantize(weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int, group: int,
               k: int) -> torch.Tensor:
    """The weight [N, K] in scale's dtype, by one kernel: int8 w = q * scale[n]; int4 w = q *
    scale[n, g] - zero[n, g] (group 0 for int8)."""
    n = weight.shape[0]
    out = torch.empty((n, k), dtype=scale.dtype, device=weight.device)
    block_k = group if bits == 4 and int4_kernel_fits(group) else 128
    _dequantize[(triton.cdiv(n, 32), triton.cdiv(k, block_k))](
        weight, scale, zero if zero is not None else scale, out, n, k, weight.stride(0), scale.stride(0),
        scale.stride(-1) if bits == 4 else 0, out.stride(0), BITS=bits, GROUP=group, BLOCK_N=32, BLOCK_K=block_k)
    return out
