"""Weight-only quantized linears on a GPU: int8 (W8A16) and int4 (W4A16) layers run matmuls of our
own (Triton kernels, weight_only_kernels.py) at decode sizes, and cuBLAS on weights dequantized by
one kernel where that is faster (DEQUANTIZE_ROWS).

Why: a decode step reads every weight once, so a quantized step should cost its weights' bytes,
but quanto's int8 weight-only matmul is kernel-bound at decode shapes on Hopper (H200, Llama-3-8B
shape, docs/benchmarks.md): ~34 ms a step whatever the batch, 18x its bytes' floor and 7x slower
than bf16 at half the bytes. quanto's int4 kernel (tinygemm) grows with rows (9x its floor at 16
rows, 29x at 64, ~2k tokens/s of prefill) and its layout is opaque, so int4 weights are repacked
into ours (weight_only_kernels.py says how and why).

The quantization stays quanto's (same values, groups and scales: quality measured on any device
holds here); `replace_quanto_linears` swaps a frozen layer's QLinear modules where the kernels
compile, run and sum right on the device (`kernel_failure`). int8 weights are quanto's own
tensors, not copies (fusing q|k|v and gate|up copies them once into one tensor, as for bf16
weights). Activation-quantized layers (w8a8) and fp8 (quanto's Marlin kernel, on par with bf16)
keep quanto's modules.

Shapes: x [..., K] in the compute dtype; int8 weight [N, K] with scale [N]; int4 weight [N, K/2]
uint8 with scale and zero [N, K/G] (G = quanto's group size, 128 where K allows), w = q * scale -
zero; out [..., N].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hetserve.model.weight_only_kernels import (dequantize, int4_kernel_fits, int4_matmul, int8_matmul, split_counters,
                                                triton)

# Products of more rows than this (prefill chunks) run as cuBLAS on the weights dequantized into
# the compute dtype: arithmetic-bound, where the kernels, converting tile by tile, fall behind. On
# an H200 (Llama-3-8B shapes, docs/benchmarks.md) a layer's four int8 products took 194 us with
# the kernel's 128-row tiles against 325 us dequantized at 128 rows, 305 against 362 us at 256
# and 572 against 481 us at 512; int4's (weights dequantized in registers by PTX) 204 against 310 us
# at 128 rows and 348 against 346 us at 256.
DEQUANTIZE_ROWS = {8: 256, 4: 128}  # by weight bits


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
        # split-K products' tile counters, zero between products (weight_only_kernels._finish)
        self.register_buffer("counters", split_counters(self.out_features, weight.device), persistent=False)

    def dequantized(self) -> torch.Tensor:
        """The weight in the compute dtype [N, K] (one kernel on a GPU): what products of many rows
        multiply by, and the reference the int8 kernel is tested against."""
        if available(self.weight.device):
            return dequantize(self.weight, self.scale, self.zero, self.bits, self.group, self.in_features)
        return self.dequantized_by_torch().to(self.scale.dtype)

    def dequantized_by_torch(self) -> torch.Tensor:
        """The weight [N, K] in float32 by torch ops: the CPU's path, and the probe's reference
        (independent of the kernels' layout code)."""
        n, k = self.out_features, self.in_features
        if self.bits == 8:
            return self.weight.float() * self.scale[:, None].float()
        halves = self.weight.view(n, k // self.group, self.group // 2)  # [N, K / G, G / 2]
        q = torch.cat([halves & 0xF, halves >> 4], dim=-1)  # [N, K / G, G]: the group's values in order
        w = q.to(torch.float32) * self.scale[..., None].float() - self.zero[..., None].float()
        return w.view(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        if flat.shape[0] > DEQUANTIZE_ROWS[self.bits] or not available(x.device) or (
                self.bits == 4 and not int4_kernel_fits(self.group)):
            return F.linear(x, self.dequantized(), self.bias)
        if flat.stride(-1) != 1:
            flat = flat.contiguous()
        if self.bits == 8:
            out = int8_matmul(flat, self.weight, self.scale, counters=self.counters)
        else:
            out = int4_matmul(flat, self.weight, self.scale, self.zero, self.group, counters=self.counters)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


_BUFFERS = ("weight", "scale", "zero", "bias")


def fuse(*linears: WeightOnlyLinear) -> WeightOnlyLinear:
    """One linear computing all of `linears` side by side (q|k|v, gate|up); their buffers become
    row views of its, so nothing is stored twice."""
    first = linears[0]

    def joined(name: str) -> torch.Tensor | None:
        parts = [getattr(m, name) for m in linears]
        if parts[0] is None:
            return None
        if first.bits == 4 and name in ("scale", "zero"):
            return group_major(torch.cat(parts))
        return torch.cat(parts)

    fused = WeightOnlyLinear(*(joined(name) for name in _BUFFERS), bits=first.bits, group=first.group,
                             in_features=first.in_features)
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
    """The WeightOnlyLinear of a quanto int4 weight in any of its layouts (plain, tinygemm, AWQ;
    groups along K, w = q * scale - shift for a float shift, (q - shift) * scale for an integer
    one), repacked into ours."""
    from optimum.quanto import WeightQBitsTensor

    plain = weight if type(weight) is WeightQBitsTensor else weight.weight_qbits_tensor()  # tinygemm, AWQ
    n, k = plain.shape
    group = plain._group_size
    q = _unpacked(plain._data).reshape(n, k // group, group)  # [N, K / G, G], 0..15
    packed = q[..., :group // 2] | (q[..., group // 2:] << 4)  # [N, K / G, G / 2]
    scale = plain._scale.reshape(n, k // group)
    zero = plain._shift.reshape(n, k // group)
    if not zero.dtype.is_floating_point:  # an integer zero point: w = (q - shift) * scale
        zero = (zero.float() * scale.float()).to(scale.dtype)
    return WeightOnlyLinear(packed.reshape(n, k // 2).contiguous(), group_major(scale), group_major(zero), bias,
                            4, group, k)


def _unpacked(packed) -> torch.Tensor:
    """quanto's PackedTensor of 4-bit values -> its uint8 values, as quanto's default unpack
    computes them (two halves along dim 0: low nibbles, then high ones). quanto's CUDA unpack is a
    kernel of its extension, which the first call builds with nvcc (~90 s on an H200 machine, and
    a failed load where the host has no CUDA toolchain)."""
    from optimum.quanto.tensor.packed import PackedTensor

    if not isinstance(packed, PackedTensor):  # quanto also keeps unpacked uint8 values
        return packed.to(torch.uint8)
    data = packed._data
    return torch.cat([data & 0xF, data >> 4])[: packed.shape[0]]


def group_major(groups: torch.Tensor) -> torch.Tensor:
    """[N, K / G] scales or zeros stored group by group ([K / G, N] in memory): a kernel's program
    reads one group's values for its consecutive output rows, which then coalesce."""
    return groups.T.contiguous().T


def from_quanto(module: torch.nn.Module) -> WeightOnlyLinear | None:
    """What replaces a frozen quanto QLinear on a GPU, or None where quanto's module stays:
    weight-only int8 and group-wise int4 (any layout); never activation-quantized or fp8 layers."""
    from optimum.quanto import QBytesTensor, qint4, qint8
    from optimum.quanto.tensor.qbits import QBitsTensor

    if getattr(module, "activation_qtype", None) is not None:
        return None
    weight = module.weight
    bias = module.bias.data if module.bias is not None else None
    if isinstance(weight, QBytesTensor) and weight.qtype == qint8 and weight.axis == 0:
        return WeightOnlyLinear(weight._data, weight._scale.reshape(-1), None, bias, 8, 0, weight.shape[1])
    if (isinstance(weight, QBitsTensor) and weight.qtype == qint4 and weight.axis == 0
            and weight._group_size is not None and weight._group_size % 2 == 0):
        return int4_from_quanto(weight, bias)
    return None


def available(device: torch.device) -> bool:
    return triton is not None and device.type == "cuda"


_FAILURES: dict[tuple[torch.device, torch.dtype], str | None] = {}


# Products the probe runs: (bits, rows, K, N, group). Between them they compile every tile shape
# tile_config / int4_tile_config choose (1-16 rows, 17-64, int8's 65-256 and int4's 65-128, split or
# not; a long K; an N past 4096 and past 16384), the dequantize paths (int8 past 256 rows, int4 past
# 128; a group of 96, not a power of two), and N and rows that do not fill their tiles, so the masks run.
_PROBES = [(8, rows, k, n, 0) for rows, k, n in ((1, 8192, 200), (5, 4096, 200), (40, 4096, 200), (64, 8192, 200),
                                                 (40, 512, 16500), (200, 1024, 200), (200, 512, 16500),
                                                 (200, 512, 8300), (300, 512, 200))]
_PROBES += [(4, rows, k, n, 128) for rows in (1, 5, 40) for k, n in ((512, 200), (4608, 200), (512, 16500))]
_PROBES += [(4, rows, 512, n, 128) for rows in (40, 100) for n in (8300, 16500)]
_PROBES += [(4, 100, 512, 200, 128), (4, 200, 512, 200, 128), (4, 5, 576, 200, 96)]


def kernel_failure(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why the kernels cannot serve a stage on `device` in `dtype`, or None where they can: every
    tile shape a stage uses (int8 and int4, _PROBES) compiled, run once on small random weights
    in the layout a stage stores (int4 scales group-major) and checked against torch on the same
    weights. Tiles come from an H200 sweep; another GPU may lack their shared memory (float32 at
    64 rows needs more than sm_86's 99 KB) or bf16 products (before sm_80). A kernel that faults
    (an illegal address) leaves the device unusable, quanto's kernels included: the probe cannot
    help there."""
    key = (device, dtype)
    if key not in _FAILURES:
        try:
            generator = torch.Generator(device).manual_seed(0)
            for bits, rows, k, n, group in _PROBES:
                linear = random_linear(bits, n, k, group, dtype, device, generator)
                x = torch.randn(rows, k, device=device, generator=generator).to(dtype)
                got = linear(x).float()
                want = F.linear(x.float(), linear.dequantized_by_torch())
                error = (got - want).abs().max().item()
                if not error <= 0.02 * want.abs().max().item():
                    raise ArithmeticError(f"int{bits} kernel at {rows} rows of {k} x {n} is off by {error:.3g}")
            _FAILURES[key] = None
        except Exception as exc:  # a compile error, too little shared memory, an unsupported GPU, wrong sums
            _FAILURES[key] = f"{type(exc).__name__}: {exc}"
    return _FAILURES[key]


def random_linear(bits: int, n: int, k: int, group: int, dtype: torch.dtype, device: torch.device | str,
                  generator: torch.Generator | None = None) -> WeightOnlyLinear:
    """A linear of random int8 or int4 weights [n, k] in the layout a stage stores (int4: groups of
    `group`, scales and zeros group-major), scales and zeros in [0, 1/64) of `dtype`: what the
    probe and the kernels' tests multiply by."""
    def floats(*shape: int) -> torch.Tensor:
        return torch.rand(shape, device=device, generator=generator).to(dtype) / 64

    if bits == 8:
        weight = torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device, generator=generator)
        return WeightOnlyLinear(weight, floats(n), None, None, 8, 0, k)
    weight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device=device, generator=generator)
    return WeightOnlyLinear(weight, group_major(floats(n, k // group)), group_major(floats(n, k // group)), None, 4,
                            group, k)


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
