"""Cost model: stage times from a profile, interpolated; predicted for unprofiled devices.

Interpolation is bilinear in (log batch, log tokens, log time) between profiled points, and the
same power law carries on beyond them. For a device without a profile, each profiled
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


# Public datasheet figures (dense, no sparsity).
DEVICE_SPECS = {spec.name: spec for spec in [
    DeviceSpec("T4", 16, 320, 65),
    DeviceSpec("P100", 16, 732, 18.7),
    DeviceSpec("V100-32G", 32, 900, 125),
    DeviceSpec("A10", 24, 600, 125),
    DeviceSpec("L4", 24, 300, 121),
    DeviceSpec("A100-40G", 40, 1555, 312),
    DeviceSpec("A100-80G", 80, 2039, 312),
    DeviceSpec("H100", 80, 3350, 989),
    DeviceSpec("H200", 141, 4800, 989),
    DeviceSpec("CPU", 64, 50, 1.5),
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
        return interpolate(grid.batches, grid.tokens, self.profile.fixed_ms[phase], batch, tokens)

    def head_ms(self, phase: str, batch: float) -> float:
        grid = self._grid(phase)
        return interpolate(grid.batches, [1], [[v] for v in self.profile.head_ms[phase]], batch, 1)


def _roofline_ms(profile: DeviceProfile, spec: DeviceSpec, precision: str, phase: str, batch: int, tokens: int) -> float:
    weights = profile.layer_bytes[precision]
    params = profile.layer_bytes["native"] / (4 if profile.dtype == "float32" else 2)
    new = tokens if phase == "prefill" else 1
    kv = batch * tokens * profile.kv_bytes_per_token
    flops = 2 * params * batch * new + 4 * batch * new * tokens * profile.hidden_size
    return max((weights + kv) / (spec.bandwidth_gbs * 1e6), flops / (spec.tflops * 1e9))


def predict_profile(reference: DeviceProfile, reference_spec: DeviceSpec, target: DeviceSpec) -> DeviceProfile:
    """A profile for `target` made by scaling the reference's measured times point by point."""
    layer_ms: dict[str, dict[str, list[list[float]]]] = {}
    for phase, by_precision in reference.layer_ms.items():
        grid = reference.prefill if phase == "prefill" else reference.decode
        layer_ms[phase] = {
            p: [[ms * _roofline_ms(reference, target, p, phase, b, t) / _roofline_ms(reference, reference_spec, p, phase, b, t)
                 for ms, t in zip(row, grid.tokens)] for row, b in zip(table, grid.batches)]
            for p, table in by_precision.items()}
    # Fixed costs are launch/Python overhead: they follow the host, not the accelerator's roofline.
    return replace(reference, device=f"predicted:{target.name}", device_name=target.name, layer_ms=layer_ms)
