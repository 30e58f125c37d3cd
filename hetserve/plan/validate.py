"""How well the cost model predicts points it was not given (`hetserve profile --validate`)."""

from __future__ import annotations

import math
from pathlib import Path

from .cost import CostModel
from .device_profile import DeviceProfile, Grid
from .profile import stage_for_profile, step_ms


def held_out(grid: Grid) -> list[tuple[int, int]]:
    """Geometric midpoints between neighbouring grid points."""
    def mids(values: list[int]) -> list[int]:
        return [round(math.sqrt(a * b)) for a, b in zip(values, values[1:])] or values
    return [(b, t) for b in mids(grid.batches) for t in mids(grid.tokens)]


def validate_cost_model(model_dir: Path, profile: DeviceProfile, repeats: int = 10):
    """[(phase, precision, batch, tokens, predicted ms, measured ms)] for a 2-layer stage."""
    cost = CostModel(profile)
    points = {"prefill": held_out(profile.prefill), "decode": held_out(profile.decode)}
    slots = max(b for pts in points.values() for b, _ in pts)
    context = max(t for pts in points.values() for _, t in pts) + 1
    rows = []
    for precision in profile.layer_bytes:
        stage = stage_for_profile(model_dir, 2, precision, profile.dtype, profile.device, slots, context)
        for phase, pts in points.items():
            for batch, tokens in pts:
                predicted = cost.fixed_ms(phase, batch, tokens) + 2 * cost.layer_ms(precision, phase, batch, tokens)
                rows.append((phase, precision, batch, tokens, predicted, step_ms(stage, phase, batch, tokens, repeats)))
    return rows
