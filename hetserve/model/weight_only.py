"""Weight-only quantized linears on a GPU: an int8 (W8A16) matmul of our own as a Triton kernel,
and cuBLAS on weights dequantized by one kernel where that is faster.

Why: a decode step reads every weight once, so a quantized step should cost its weights' bytes,
but quanto's int8 weight-only matmul is kernel-bound at decode shapes on Hopper (H200, Llama-3-8B
shape, docs/benchmarks.md): ~34 ms a step whatever the batch, 18x its bytes' floor and 7x slower
than bf16 at half the bytes. Here one kernel per linear loads int8 tiles, converts them to the
activations' dtype in registers, multiplies on tensor cores with fp32 accumulation and applies
the per-channel scale once at the end. Products of more rows (prefill chunks) are bound by
arithmetic: there the weights are dequantized by one kernel into the compute dtype and multiplied
by cuBLAS (DEQUANTIZE_ROWS).

int4: quanto's own kernels are kept (tinygemm for bf16: at 1-16 rows it was 1.2-4.3x faster than
an int4 kernel written like the int8 one and than dequantize + cuBLAS, docs/benchmarks.md). Only
where quanto would run its AWQ kernel (fp16 int4 on CUDA), which fails with an illegal memory
access on Hopper (../shared/notes/platform.md), are int4 layers converted: repacked two values a
byte along K (q[2j] in the low nibble, q[2j + 1] in the high one) and run as dequantize + cuBLAS.

The quantization stays quanto's (same values, groups and scales: quality measured on any device
holds here); `replace_quanto_linears` swaps a frozen layer's QLinear modules where the kernels
compile and run on the device (`kernel_failure`). int8 weights are quanto's own tensors, not
copies (fusing q|k|v and gate|up copies them once into one tensor, as for bf16 weights).
Activation-quantized layers (w8a8) and fp8 (quanto's Marlin kernel, on par with bf16) keep
quanto's modules.

Shapes: x [..., K] in the compute dtype; int8 weight [N, K] with scale [N]; int4 weight [N, K/2]
uint8 with scale and zero [N, K/G] (G = quanto's group size), w = q * scale - zero; out [..., N].
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

# Products of more rows than this (prefill chunks) run as cuBLAS on the weights dequantized into
# the compute dtype: arithmetic-bound, where the int8 kernel, converting tile by tile, falls behind.
# On an H200 (Llama-3-8B shapes, docs/benchmarks.md) the four products of a layer took 258 us
# with the kernel against 324 us dequantized at 128 rows, and 472 against 362 us at 256.
DEQUANTIZE_ROWS = 128


class TileConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # programs along K, each summing every split_k-th block; partials summed after
    warps: int
    stages: int
    swap: bool = False  # compute out^T = w @ x^T (the kernel says why)


def tile_config(rows: int, k: int, n: int) -> TileConfig:
    """Tiles for an int8 [rows, k] x [k, n] product, bound by reading the weights. From sweeps on
    an H200 (Llama-3-8B shapes; benchmarks/weight_only_sweep.py --sweep, docs/benchmarks.md):
    narrow column blocks streaming long K blocks at 1-16 rows, wider ones at more; a K past 4096
    (the MLP's down projection) split among programs, their partials summed. At 17-64 rows and
    K <= 4096 the transposed product was 4-23 % faster, split in 4 where N alone gives few programs."""
    block_m = min(64, max(16, 1 << (rows - 1).bit_length()))  # tl.dot takes 16 rows at least
    few = block_m == 16
    split = min(8, 1 << (-(-k // 4096) - 1).bit_length())
    if rows <= 64 and not few and k <= 4096:
        return TileConfig(64, 64, 128, 4 if n <= 4096 else 1, 4, 4, swap=True)
    return TileConfig(block_m, 32 if few and k <= 4096 else 64, 256 if few else 128, split, 4, 4)


if triton is not None:
    @triton.jit
    def _int8_matmul(x_ptr, w_ptr, scale_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_os, stride_om,
                     PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, SWAP: tl.constexpr):
        """out[split] [M, N] = x [M, K] @ (q [N, K] * scale [N])^T over the K blocks of this split.
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
        out = out_ptr + split * stride_os
        if SWAP:
            acc *= scale[:, None]
            tl.store(out + rm[None, :] * stride_om + rn[:, None], acc.to(out_ptr.dtype.element_ty),
                     mask=m_ok[None, :] & n_ok[:, None])
        else:
            acc *= scale[None, :]
            tl.store(out + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def _dequantize(w_ptr, scale_ptr, zero_ptr, out_ptr, N, K, stride_wn, stride_sn, stride_on,
                    BITS: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """-> out [N, K] in its dtype. int8: w = q * scale[n]; int4 (K a multiple of BLOCK_K, a
        block within one group): w = q * scale[n, g] - zero[n, g]."""
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        n_ok = rn < N
        if BITS == 8:
            q = tl.load(w_ptr + rn[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & (k < K)[None, :], other=0)
            w = q.to(tl.float32) * tl.load(scale_ptr + rn * stride_sn, mask=n_ok, other=0.0).to(tl.float32)[:, None]
        else:
            byte = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
            packed = tl.load(w_ptr + rn[:, None] * stride_wn + byte[None, :], mask=n_ok[:, None], other=0)
            group = tl.program_id(1) * BLOCK_K // GROUP
            s = tl.load(scale_ptr + rn * stride_sn + group, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            z = tl.load(zero_ptr + rn * stride_sn + group, mask=n_ok, other=0.0).to(tl.float32)[:, None]
            low, high = (packed & 0xF).to(tl.float32) * s - z, (packed >> 4).to(tl.float32) * s - z
            w = tl.reshape(tl.join(low, high), (BLOCK_N, BLOCK_K))  # k = 2j (low), 2j + 1 (high)
        tl.store(out_ptr + rn[:, None] * stride_on + k[None, :], w.to(out_ptr.dtype.element_ty),
                 mask=n_ok[:, None] & (k < K)[None, :])


def int8_matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                config: TileConfig | None = None) -> torch.Tensor:
    """x [M, K] (compute dtype, K contiguous), weight [N, K] int8, scale [N] -> [M, N] in x's dtype."""
    rows, k = x.shape
    n = weight.shape[0]
    config = config or tile_config(rows, k, n)
    if config.split_k == 1:
        out = torch.empty((1, rows, n), dtype=x.dtype, device=x.device)
    else:  # float32 partials, one per split, summed below
        out = torch.empty((config.split_k, rows, n), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(rows, config.block_m), config.split_k)
    _int8_matmul[grid](
        x, weight, scale, out, rows, n, k, x.stride(0), weight.stride(0), out.stride(0), out.stride(1),
        # float32 stages keep float32 products (tl.dot would round them to tf32)
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, SPLIT_K=config.split_k,
        SWAP=config.swap, num_warps=config.warps, num_stages=config.stages,
    )
    return out[0] if config.split_k == 1 else out.sum(0).to(x.dtype)


class WeightOnlyLinear(torch.nn.Module):
    """A linear with int8 or int4 weights and activations in the compute dtype: x [..., K] -> [..., N]."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None,
                 bias: torch.Tensor | None, bits: int, group: int, in_features: int):
        super().__init__()
        self.bits, self.group = bits, group  # group: values per int4 scale along K (0 for int8)
        self.in_features, self.out_features = in_features, weight.shape[0]
        self.register_buffer("weight", weight)  # int8 [N, K] or uint8 [N, K / 2]
        self.register_buffer("scale", scale)  # [N] (int8) or [N, K / group] (int4)
        self.register_buffer("zero", zero)  # None (int8) or [N, K / group]
        self.register_buffer("bias", bias)

    def dequantized(self) -> torch.Tensor:
        """The weight in the compute dtype [N, K] (one kernel on a GPU): what products of many rows
        multiply by, and the reference the int8 kernel is tested against."""
        n, k = self.out_features, self.in_features
        if available(self.weight.device):
            out = torch.empty((n, k), dtype=self.scale.dtype, device=self.weight.device)
            # int4: a 128-value K block is one group (quanto's AWQ and tinygemm layouts have 128)
            _dequantize[(triton.cdiv(n, 32), triton.cdiv(k, 128))](
                self.weight, self.scale, self.zero if self.zero is not None else self.scale, out, n, k,
                self.weight.stride(0), self.scale.stride(0), out.stride(0),
                BITS=self.bits, GROUP=self.group, BLOCK_N=32, BLOCK_K=128)
            return out
        if self.bits == 8:
            return self.weight * self.scale[:, None]
        q = torch.stack([self.weight & 0xF, self.weight >> 4], dim=-1).view(n, -1, self.group)  # [N, K / G, G]
        w = q.to(torch.float32) * self.scale[..., None].float() - self.zero[..., None].float()
        return w.view(n, k).to(self.scale.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if self.bits == 4 or flat.shape[0] > DEQUANTIZE_ROWS or not available(x.device):
            return F.linear(x, self.dequantized(), self.bias)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        out = int8_matmul(flat, self.weight, self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


_BUFFERS = ("weight", "scale", "zero", "bias")


def fuse(*linears: WeightOnlyLinear) -> WeightOnlyLinear:
    """One linear computing all of `linears` side by side (q|k|v, gate|up); their buffers become
    row views of its, so nothing is stored twice."""
    first = linears[0]
    parts = {name: [getattr(m, name) for m in linears] for name in _BUFFERS}
    fused = WeightOnlyLinear(*(torch.cat(parts[name]) if parts[name][0] is not None else None for name in _BUFFERS),
                             bits=first.bits, group=first.group, in_features=first.in_features)
    row = 0
    for m in linears:
        rows = m.out_features
        for name in _BUFFERS:
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


def int4_from_quanto(weight, bias: torch.Tensor | None) -> WeightOnlyLinear:
    """The WeightOnlyLinear of a quanto int4 weight in its AWQ or tinygemm layout (groups of 128
    along K, a float shift: w = q * scale - shift)."""
    plain = weight.weight_qbits_tensor()
    n, k = plain.shape
    group = plain._group_size
    q = plain._data.unpack().reshape(n, k).to(torch.uint8)  # [N, K], 0..15
    scale = plain._scale.reshape(n, k // group)
    zero = plain._shift.reshape(n, k // group)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)  # [N, K / 2]
    return WeightOnlyLinear(packed.contiguous(), scale.contiguous(), zero.contiguous(), bias, 4, group, k)


def from_quanto(module: torch.nn.Module) -> WeightOnlyLinear | None:
    """What replaces a frozen quanto QLinear on a GPU, or None where quanto's module stays:
    weight-only int8 always; int4 only in quanto's AWQ layout (its other layouts keep quanto's
    kernels: tinygemm, faster at decode); never activation-quantized or fp8 layers."""
    from optimum.quanto import QBytesTensor, qint8
    from optimum.quanto.tensor.weights.awq import AWQWeightQBitsTensor

    if getattr(module, "activation_qtype", None) is not None:
        return None
    weight = module.weight
    bias = module.bias.data if module.bias is not None else None
    if isinstance(weight, QBytesTensor) and weight.qtype == qint8 and weight.axis == 0:
        return WeightOnlyLinear(weight._data, weight._scale.reshape(-1), None, bias, 8, 0, weight.shape[1])
    if isinstance(weight, AWQWeightQBitsTensor):
        return int4_from_quanto(weight, bias)
    return None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


_FAILURES: dict[tuple[torch.device, torch.dtype], str | None] = {}


def kernel_failure(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot serve a stage on `device` in `dtype`, or None where they can: each
    tile shape a stage uses and both dequantizations compiled and run once on small weights. Tiles
    come from an H200 sweep; another GPU may lack their shared memory (float32 at 64 rows needs
    more than sm_86's 99 KB) or bf16 products (before sm_80)."""
    key = (device, dtype)
    if key not in _FAILURES:
        try:
            for rows, k in ((1, 8192), (32, 4096), (64, 8192)):
                int8 = WeightOnlyLinear(torch.ones(64, k, dtype=torch.int8, device=device),
                                        torch.ones(64, dtype=dtype, device=device), None, None, 8, 0, k)
                int8(torch.randn(rows, k, dtype=dtype, device=device))
            int8.dequantized()  # one shape serves: the dequantize kernel's blocks do not depend on it
            groups = torch.ones(64, 1, dtype=dtype, device=device)
            WeightOnlyLinear(torch.ones(64, 64, dtype=torch.uint8, device=device), groups, groups, None, 4, 128,
                             128).dequantized()
            torch.cuda.synchronize(device)
            _FAILURES[key] = None
        except Exception as exc:  # a compile error, too little shared memory, an unsupported GPU
            _FAILURES[key] = f"{type(exc).__name__}: {exc}"
    return _FAILURES[key]


def replace_quanto_linears(module: torch.nn.Module) -> int:
    """Swap the quanto QLinear modules under `module` that from_quanto replaces (frozen modules
    only). -> how many were swapped."""
    from optimum.quanto import QLinear

    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, QLinear):
                replacement = from_quanto(child)
                if replacement is not None:
                    setattr(parent, name, replacement)
                    swapped += 1
    return swapped
