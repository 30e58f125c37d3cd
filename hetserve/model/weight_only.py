"""Weight-only quantized linears (W8A16, W4A16) with matmuls of our own, as Triton kernels (GPU).

Why: a decode step reads every weight once, so a quantized step should cost its weights' bytes,
but quanto's CUDA kernels are far from that at decode shapes on Hopper (H200, Llama-3-8B shape,
docs/benchmarks.md): its int8 weight-only matmul took ~34 ms a step whatever the batch (18x its
bytes' floor, 7x slower than bf16 at half the bytes) and its int4 kernel (tinygemm) grows with
rows (33.5 ms at 64 rows). Here one kernel per linear loads int8 tiles, or two int4 values per
byte, converts them to the activations' dtype in registers, multiplies on tensor cores with fp32
accumulation, and applies the scales once per group instead of per weight:
    sum_k x_k * (q_k * s - z) = s * sum_k x_k * q_k - z * sum_k x_k      (within one group)
so dequantization costs [rows x N] work per group rather than [K x N].

The quantization stays quanto's (same values, groups and scales: quality measured on any device
holds here); `replace_quanto_linears` swaps a frozen layer's quanto QLinear modules for
WeightOnlyLinear. int8 weights are quanto's own tensors (shared, not copied); int4 ones are
repacked two per byte along K (q[2j] in the low nibble, q[2j + 1] in the high one) from quanto's
tinygemm layout. Activation-quantized layers (w8a8) and fp8 (quanto's Marlin kernel, on par with
bf16) keep quanto's modules.

Shapes: x [..., K] in the compute dtype; int8 weight [N, K] with scale [N]; int4 weight [N, K/2]
uint8 with scale and zero [N, K/G] (G = quanto's group size); out [..., N].
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: quanto's modules stay
    triton = None


# Products of more rows than this (prefill chunks) are bound by arithmetic, where cuBLAS on the
# weights dequantized into the compute dtype beats a kernel that converts them tile by tile: on an
# H200, a 2048-row int8 gate|up product took 1.18 ms through the kernel against 0.71 ms in bf16
# (docs/benchmarks.md), and dequantizing costs reading the weights once and writing them twice.
DEQUANTIZE_ROWS = 128


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # programs along K, each summing every split_k-th block; partials summed after
    warps: int
    stages: int


def tile_config(rows: int, n: int, k: int, bits: int, group: int) -> TileConfig:
    """Tiles for an [rows, k] x [k, n] product of up to DEQUANTIZE_ROWS rows, bound by reading the
    weights. From a sweep on an H200 (Llama-3-8B shapes; benchmarks/weight_only_sweep.py,
    docs/benchmarks.md): narrow column blocks streaming long K blocks at 1-16 rows, wider ones
    at more; a K past 4096 (the MLP's down projection) split among programs, partials summed."""
    block_m = max(16, 1 << (rows - 1).bit_length())  # tl.dot takes 16 rows at least
    if block_m > 64:
        return TileConfig(64, 64, _group_block(128, bits, group), 1, 4, 4)
    few = block_m == 16
    block_n = 32 if few and k <= 4096 else 64
    block_k = _group_block(256 if few else 128, bits, group)
    split = min(8, 1 << (-(-k // 4096) - 1).bit_length())
    return TileConfig(block_m, block_n, block_k, split, 4, 4)


def _group_block(block_k: int, bits: int, group: int) -> int:
    """int4: a K block must lie within one scale group (and hold >= 32 values: two halves of 16)."""
    if bits == 8:
        return block_k
    while group % block_k:
        block_k //= 2
    if block_k < 32:
        raise ValueError(f"int4 group size {group} is not a multiple of 32")
    return block_k


if triton is not None:
    @triton.jit
    def _weight_only_matmul(
        x_ptr, w_ptr, scale_ptr, zero_ptr, out_ptr,
        M, N, K, stride_xm, stride_wn, stride_sn, stride_os, stride_om,
        BITS: tl.constexpr, GROUP: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    ):
        rm = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        split = tl.program_id(2)
        m_ok, n_ok = rm < M, rn < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        if BITS == 8:
            rk = tl.arange(0, BLOCK_K)
            for first in range(0, tl.cdiv(K, BLOCK_K), SPLIT_K):
                k = (first + split) * BLOCK_K + rk
                k_ok = k < K
                x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                            other=0.0)  # [BLOCK_M, BLOCK_K]
                q = tl.load(w_ptr + rn[None, :] * stride_wn + k[:, None], mask=n_ok[None, :] & k_ok[:, None],
                            other=0)  # [BLOCK_K, BLOCK_N] int8
                acc += tl.dot(x, q.to(x.dtype), input_precision=PRECISION)
            acc *= tl.load(scale_ptr + rn * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        else:
            # A K block of BLOCK_K values is BLOCK_K / 2 bytes of each weight row: the low nibbles
            # are the block's even k, the high ones its odd k, so x's columns split the same way.
            rk = tl.arange(0, BLOCK_K)
            half = tl.arange(0, BLOCK_K // 2)
            for first in range(0, tl.cdiv(K, BLOCK_K), SPLIT_K):
                block = first + split  # past the last block where SPLIT_K does not divide the blocks
                k = block * BLOCK_K + rk
                x = tl.load(x_ptr + rm[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & (k < K)[None, :],
                            other=0.0)  # [BLOCK_M, BLOCK_K]
                x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_K // 2, 2)))  # [BLOCK_M, BLOCK_K / 2]
                byte = block * (BLOCK_K // 2) + half
                packed = tl.load(w_ptr + rn[None, :] * stride_wn + byte[:, None],
                                 mask=n_ok[None, :] & (2 * byte < K)[:, None], other=0)  # [BLOCK_K / 2, BLOCK_N] uint8
                low, high = (packed & 0xF).to(x.dtype), (packed >> 4).to(x.dtype)
                dot = (tl.dot(x_even, low, input_precision=PRECISION)
                       + tl.dot(x_odd, high, input_precision=PRECISION))  # [BLOCK_M, BLOCK_N]: sum x * q
                x_sum = tl.sum(x.to(tl.float32), 1)  # [BLOCK_M]
                group = block * BLOCK_K // GROUP
                in_k = n_ok & (block * BLOCK_K < K)
                s = tl.load(scale_ptr + rn * stride_sn + group, mask=in_k, other=0.0).to(tl.float32)
                z = tl.load(zero_ptr + rn * stride_sn + group, mask=in_k, other=0.0).to(tl.float32)
                acc += dot * s[None, :] - x_sum[:, None] * z[None, :]
        tl.store(out_ptr + split * stride_os + rm[:, None] * stride_om + rn[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


    @triton.jit
    def _dequantize_int4(w_ptr, scale_ptr, zero_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                         GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """int4 [N, K / 2] bytes -> [N, K] in out's dtype, w = q * scale - zero; a block lies in one group."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        byte = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
        n_ok = rn < N
        packed = tl.load(w_ptr + rn[:, None] * stride_wn + byte[None, :], mask=n_ok[:, None], other=0)
        group = tl.program_id(1) * BLOCK_K // GROUP
        s = tl.load(scale_ptr + rn * stride_sn + group, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        z = tl.load(zero_ptr + rn * stride_sn + group, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        low, high = (packed & 0xF).to(tl.float32) * s - z, (packed >> 4).to(tl.float32) * s - z
        w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))  # k = 2j (low), 2j + 1 (high)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + rn[:, None] * stride_on + k[None, :], w.to(out_ptr.dtype.element_ty), mask=n_ok[:, None])


def weight_only_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                       bits: int, group: int, config: TileConfig | None = None) -> torch.Tensor:
    """x [M, K] (compute dtype, K contiguous) -> [M, N] in x's dtype. int8: weight [N, K], scale
    [N]; int4: weight [N, K / 2] uint8, scale and zero [N, K / group]."""
    rows, k = x.shape
    n = weight.shape[0]
    config = config or tile_config(rows, n, k, bits, group)
    if config.split_k == 1:
        out = torch.empty((1, rows, n), dtype=x.dtype, device=x.device)
    else:  # float32 partials, one per split, summed below
        out = torch.empty((config.split_k, rows, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(rows, config.block_m), config.split_k)
    _weight_only_matmul[grid](
        x, weight, scale, zero if zero is not None else scale, out,
        rows, n, k, x.stride(0), weight.stride(0), scale.stride(0), out.stride(0), out.stride(1),
        BITS=bits, GROUP=group,
        # float32 stages keep float32 products (tl.dot would round them to tf32)
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        num_warps=config.warps, num_stages=config.stages,
    )
    return out[0] if config.split_k == 1 else out.sum(0).to(x.dtype)


class WeightOnlyLinear(torch.nn.Module):
    """A linear with int8 or int4 weights and activations in the compute dtype: x [..., K] -> [..., N]."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group: int, in_features: int):
        super().__init__()
        self.bits, self.group = bits, group
        self.in_features, self.out_features = in_features, weight.shape[0]
        self.register_buffer("weight", weight)  # int8 [N, K] or uint8 [N, K / 2]
        self.register_buffer("scale", scale)  # [N] (int8) or [N, K / group] (int4)
        self.register_buffer("zero", zero)  # None (int8) or [N, K / group]
        self.register_buffer("bias", bias)

    def dequantized(self) -> torch.Tensor:
        """The weight in the compute dtype [N, K]: what prefill-sized products multiply by, and
        the reference the matmul kernel is tested against."""
        if self.bits == 8:
            return self.weight * self.scale[:, None]  # int8 x scale's dtype -> scale's dtype, one kernel
        if available(self.weight.device):
            out = torch.empty((self.out_features, self.in_features), dtype=self.scale.dtype, device=self.weight.device)
            block_k = _group_block(128, 4, self.group)
            grid = (triton.cdiv(self.out_features, 32), self.in_features // block_k)
            _dequantize_int4[grid](self.weight, self.scale, self.zero, out, self.out_features, self.in_features,
                                   self.weight.stride(0), self.scale.stride(0), out.stride(0),
                                   GROUP=self.group, BLOCK_N=32, BLOCK_K=block_k)
            return out
        q = torch.stack([self.weight & 0xF, self.weight >> 4], dim=-1).view(self.out_features, -1)  # [N, K]
        q = q.view(self.out_features, -1, self.group).to(torch.float32)  # [N, K / group, group]
        w = q * self.scale[..., None].float() - self.zero[..., None].float()
        return w.view(self.out_features, self.in_features).to(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cuda" or triton is None:
            return F.linear(x, self.dequantized(), self.bias)
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > DEQUANTIZE_ROWS:  # arithmetic-bound: cuBLAS on the weights dequantized
            return F.linear(x, self.dequantized(), self.bias)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        out = weight_only_matmul(flat, self.weight, self.scale, self.zero, self.bits, self.group)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def fuse(*linears: WeightOnlyLinear) -> WeightOnlyLinear:
    """One linear computing all of `linears` side by side (q|k|v, gate|up); their buffers become
    row views of its, so nothing is stored twice."""
    first = linears[0]
    parts = {name: [getattr(m, name) for m in linears] for name in ("weight", "scale", "zero", "bias")}
    fused = WeightOnlyLinear(*(torch.cat(parts[name]) if parts[name][0] is not None else None
                               for name in ("weight", "scale", "zero", "bias")),
                             bits=first.bits, group=first.group, in_features=first.in_features)
    row = 0
    for m in linears:
        rows = m.out_features
        for name in ("weight", "scale", "zero", "bias"):
            if getattr(fused, name) is not None:
                setattr(m, name, getattr(fused, name)[row:row + rows])
        row += rows
    return fused


def fusable(*linears: torch.nn.Module) -> bool:
    """WeightOnlyLinear of one kind (bits, group, dtype), all with or all without bias."""
    first = linears[0]
    return all(isinstance(m, WeightOnlyLinear) and (m.bits, m.group, m.scale.dtype, m.in_features) ==
               (first.bits, first.group, first.scale.dtype, first.in_features)
               and (m.bias is None) == (first.bias is None) for m in linears)


def from_quanto(module: torch.nn.Module) -> WeightOnlyLinear | None:
    """The WeightOnlyLinear computing what a frozen quanto QLinear computes, or None where that
    module is not weight-only int8 or int4 (activation-quantized, fp8, not frozen)."""
    from optimum.quanto import QBytesTensor, qint4, qint8
    from optimum.quanto.tensor.weights import WeightQBitsTensor

    if getattr(module, "activation_qtype", None) is not None:
        return None
    weight = module.weight
    bias = module.bias.data if module.bias is not None else None
    if isinstance(weight, QBytesTensor) and weight.qtype == qint8 and weight.axis == 0:
        return WeightOnlyLinear(weight._data, weight._scale.reshape(-1), None, bias, 8, weight.shape[1],
                                weight.shape[1])
    if isinstance(weight, WeightQBitsTensor) and weight.qtype == qint4 and weight.axis == 0:
        plain = weight if type(weight) is WeightQBitsTensor else weight.weight_qbits_tensor()
        n, k = plain.shape
        group = plain._group_size or k  # None: one group per row (K at most quanto's group size)
        if group % 32:  # the kernel's K blocks hold 32 values at least, within one group
            return None
        data = plain._data.unpack() if hasattr(plain._data, "unpack") else plain._data
        q = data.reshape(n, k).to(torch.uint8)
        scale = plain._scale.reshape(n, k // group)
        shift = plain._shift.reshape(n, k // group)
        # quanto: w = (q - shift) * scale for an integer shift, q * scale - shift for a float one
        zero = shift if shift.dtype.is_floating_point else shift.to(scale.dtype) * scale
        packed = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K / 2]
        return WeightOnlyLinear(packed.contiguous(), scale.contiguous(), zero.to(scale.dtype).contiguous(),
                                bias, 4, group, k)
    return None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


def replace_quanto_linears(module: torch.nn.Module) -> int:
    """Swap every weight-only int8 / int4 quanto QLinear under `module` for a WeightOnlyLinear
    (frozen modules only). -> how many were swapped."""
    from optimum.quanto import QModuleMixin

    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QModuleMixin):
                replacement = from_quanto(child)
                if replacement is not None:
                    setattr(parent, name, replacement)
                    swapped += 1
    return swapped
