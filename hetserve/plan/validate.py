"""How well the cost model predicts points it was not given (`hetserve profile --validate`)."""

from __future__ import annotations

from pathlib import Path

from .cost import CostModel
from .profile import DeviceProfile, _stage, _step_ms

# Between the default grid points (profile.py), in both phases.
HELD_OUT = {"prefill": [(2, 64)], "decode": [(2, 128), (6, 256)]}


def validate_cost_model(model_dir: Path, profile: DeviceProfile, repeats: int = 10):
    """[(phase, precision, batch, tokens, predicted ms, measured ms)] for a 2-layer stage."""
    cost = CostModel(profile)
    rows = []
    for precision in profile.layer_bytes:
        stage = _stage(model_dir, 2, precision, profile.dtype, profile.device, 8, 1024)
        for phase, points in HELD_OUT.items():
            for batch, tokens in points:
                predicted = cost.fixed_ms(phase, batch, tokens) + 2 * cost.layer_ms(precision, phase, batch, tokens)
                rows.append((phase, precision, batch, tokens, predicted, _step_ms(stage, phase, batch, tokens, repeats)))
    return rows
