"""Cost model: stage times from a profile, interpolated; predicted for unprofiled devices.

Interpolation is bilinear in (log batch, log tokens, log time) between profiled points, and the
same power law carries on beyond them. A stage's fixed cost per step is no power law (it is
measured as 0 where it is within the noise): it is bilinear in the time itself and held at the
grid's edges. For a device without a profile, each profiled
time of a reference device is scaled by the ratio of the two devices' roofline times for that
point (max of bytes / bandwidth and FLOPs / peak) — the idea of QSync's and CDMPP's cross-device
predictors: kernel efficiency carries over, the hardware bound changes.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, replace

from .device_profile import DeviceProfile


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    memory_gb: float
    bandwidth_gbs: float  # memory bandwidth
    tflops: float  # dense fp16/bf16 (fp32 for CPUs) peak
    dtypes: tuple[str, ...] = ("bfloat16", "float16")  # compute dtypes it runs at full rate
    precisions: tuple[str, ...] = ("native", "int8", "int4")  # per-layer weight precisions it runs


ALL = ("native", "int8", "fp8", "int4")
FP16 = ("float16",)  # before Ampere: no bf16

# Public datasheet figures (dense, no sparsity). fp8 needs Ada or Hopper (quanto's fp8 path is
# Marlin on CUDA); CPUs run no fp8 (emulated, very slow). "CPU" is one with AVX512-BF16 or AMX, as
# this repo's: there a bf16 linear took 0.42-0.58x of fp32's time at 8 and 512 rows of a SmolLM2
# MLP and at 1 and 8 rows of a Llama-3-8B one (1.37x at one SmolLM2 row); without them 16-bit
# matmuls run slower than fp32 and a cluster with such a CPU is planned too fast.
DEVICE_SPECS = {spec.name: spec for spec in [
    DeviceSpec("T4", 16, 320, 65, FP16),
    DeviceSpec("P100", 16, 732, 18.7, FP16),
    DeviceSpec("V100-32G", 32, 900, 125, FP16),
    DeviceSpec("A10", 24, 600, 125),
    DeviceSpec("L4", 24, 300, 121, precisions=ALL),
    DeviceSpec("A100-40G", 40, 1555, 312),
    DeviceSpec("A100-80G", 80, 2039, 312),
    DeviceSpec("H100", 80, 3350, 989, precisions=ALL),
    DeviceSpec("H200", 141, 4800, 989, precisions=ALL),
    DeviceSpec("CPU", 64, 50, 1.5, ("float32", "bfloat16", "float16")),
]}


EPS_MS = 1e-3  # keeps log() finite for zero-cost entries


def _axis(values: list[int], x: float) -> tuple[int, int, float]:
    """Bracketing indices and weight along one log-scaled axis (extrapolating at the ends)."""
    if len(values) == 1:
        return 0, 0, 0.0
    i = min(max(bisect.bisect_right(values, x) - 1, 0), len(values) - 2)
    lo, hi = values[i], values[i + 1]
    return i, i + 1, (math.log(x) - math.log(lo)) / (math.log(hi) - math.log(lo))


def interpolate(batches: list[int], tokens: list[int], table: list[list[float]], batch: float, length: float) -> float:
    """Bilinear in (log batch, log tokens, log time): costs follow power laws in batch and length."""
    bi, bj, bw = _axis(batches, batch)
    ti, tj, tw = _axis(tokens, length)

    def at(i: int, j: int) -> float:
        return math.log(table[i][j] + EPS_MS)

    low = at(bi, ti) * (1 - tw) + at(bi, tj) * tw
    high = at(bj, ti) * (1 - tw) + at(bj, tj) * tw
    return max(0.0, math.exp(low * (1 - bw) + high * bw) - EPS_MS)


def interpolate_held(batches: list[int], tokens: list[int], table: list[list[float]], batch: float,
                     length: float) -> float:
    """Bilinear in (log batch, log tokens) on the time itself, held at the grid's edges. In log time
    a 0 entry beside 2.9 ms made a power law of exponent ~5.7: 60 s of fixed cost predicted for a
    CPU prefill of 8 prompts, where the layer itself took 37 ms."""
    bi, bj, bw = _axis(batches, batch)
    ti, tj, tw = _axis(tokens, length)
    bw, tw = min(max(bw, 0.0), 1.0), min(max(tw, 0.0), 1.0)
    low = table[bi][ti] * (1 - tw) + table[bi][tj] * tw
    high = table[bj][ti] * (1 - tw) + table[bj][tj] * tw
    return max(0.0, low * (1 - bw) + high * bw)


class CostModel:
    """Milliseconds for stages on one device, from its profile."""

    def __init__(self, profile: DeviceProfile):
        self.profile = profile

    @property
    def precisions(self) -> list[str]:
        return list(self.profile.layer_bytes)

    def _grid(self, phase: str):
        return self.profile.prefill if phase == "prefill" else self.profile.decode

    def layer_ms(self, precision: str, phase: str, batch: float, tokens: float) -> float:
        grid = self._grid(phase)
        return interpolate(grid.batches, grid.tokens, self.profile.layer_ms[phase][precision], batch, tokens)

    def fixed_ms(self, phase: str, batch: float, tokens: float) -> float:
        grid = self._grid(phase)
        return interpolate_held(grid.batches, grid.tokens, self.profile.fixed_ms[phase], batch, tokens)

    def head_ms(self, phase: str, batch: float) -> float:
        grid = self._grid(phase)
        return interpolate(grid.batches, [1], [[v] for v in self.profile.head_ms[phase]], batch, 1)


@dataclass(frozen=True)
class LayerShape:
    """What the roofline needs of a decoder layer."""

    params: float  # weight parameters of one layer
    hidden_size: int
    kv_bytes_per_token: int
    weight_bytes: dict[str, float]  # precision -> bytes of one layer

    @classmethod
    def of(cls, profile: DeviceProfile) -> "LayerShape":
        itemsize = 4 if profile.dtype == "float32" else 2
        return cls(profile.layer_bytes["native"] / itemsize, profile.hidden_size, profile.kv_bytes_per_token,
                   dict(profile.layer_bytes))


def roofline_ms(shape: LayerShape, spec: DeviceSpec, precision: str, phase: str, batch: int, tokens: int) -> float:
    new = tokens if phase == "prefill" else 1
    moved = shape.weight_bytes[precision] + batch * tokens * shape.kv_bytes_per_token
    flops = 2 * shape.params * batch * new + 4 * batch * new * tokens * shape.hidden_size
    return max(moved / (spec.bandwidth_gbs * 1e6), flops / (spec.tflops * 1e9))


def predict_profile(reference: DeviceProfile, reference_spec: DeviceSpec, target: DeviceSpec,
                    target_shape: LayerShape | None = None) -> DeviceProfile:
    """A profile for `target` (and optionally another layer shape) from a measured reference.

    Each measured layer time is split into a floor that does not scale (launch and dispatch
    overhead: the smallest measured time minus its roofline) and the rest, which is scaled by the
    ratio of the two roofline times at that point: kernel efficiency carries over, the hardware
    bound changes.
    """
    ref_shape = LayerShape.of(reference)
    shape = target_shape or ref_shape
    layer_ms: dict[str, dict[str, list[list[float]]]] = {}
    for phase, by_precision in reference.layer_ms.items():
        grid = reference.prefill if phase == "prefill" else reference.decode
        layer_ms[phase] = {}
        for p, table in by_precision.items():
            if p not in shape.weight_bytes:
                continue
            ref_roof = [[roofline_ms(ref_shape, reference_spec, p, phase, b, t) for t in grid.tokens] for b in grid.batches]
            floor = max(0.0, min(ms - roof for row, roofs in zip(table, ref_roof) for ms, roof in zip(row, roofs)))
            layer_ms[phase][p] = [
                [round(floor + (ms - floor) * roofline_ms(shape, target, p, phase, b, t) / roof, 4)
                 for ms, roof, t in zip(row, roofs, grid.tokens)]
                for row, roofs, b in zip(table, ref_roof, grid.batches)]
    # Fixed per-step costs are launch/Python overhead: they follow the host software, not the chip.
    return replace(reference, device=f"predicted:{target.name}", device_name=target.name, layer_ms=layer_ms,
                   hidden_size=shape.hidden_size, kv_bytes_per_token=shape.kv_bytes_per_token,
                   layer_bytes={p: int(b) for p, b in shape.weight_bytes.items() if p in reference.layer_bytes})



def head_roofline_ms(head_bytes: float, head_params: float, spec: DeviceSpec, batch: int) -> float:
    """norm + lm_head on one row per request: every head weight read once, 2 FLOPs per weight and row."""
    return max(head_bytes / (spec.bandwidth_gbs * 1e6), 2 * head_params * batch / (spec.tflops * 1e9))


def predict_head_ms(reference: DeviceProfile, reference_spec: DeviceSpec, target: DeviceSpec,
                    head_bytes: float, head_params: float) -> dict[str, list[float]]:
    """The head of another model on another device, the way predict_profile scales layers: a floor
    that does not scale, the rest by the ratio of the roofline times."""
    ref_params = reference.head_bytes / (4 if reference.dtype == "float32" else 2)
    out = {}
    for phase, times in reference.head_ms.items():
        batches = (reference.prefill if phase == "prefill" else reference.decode).batches
        roofs = [head_roofline_ms(reference.head_bytes, ref_params, reference_spec, b) for b in batches]
        floor = max(0.0, min(ms - roof for ms, roof in zip(times, roofs)))
        out[phase] = [round(floor + (ms - floor) * head_roofline_ms(head_bytes, head_params, target, b) / roof, 4)
                      for ms, roof, b in zip(times, roofs, batches)]
    return out
