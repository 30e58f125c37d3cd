"""A quality prior for a model without weights: per-layer loss increases carried over from a
model we did measure, labelled everywhere as a prior, not a measurement.

Source: hetserve's measured per-layer sensitivity of SmolLM2-135M (hetserve/data/
quality_prior_smollm2-135m.json, 512 calibration tokens). Layer l of an L-layer model takes the
source's increase at the same relative depth (negative, i.e. noise, counted as 0; a 3-layer moving
average against the rest of the noise), and the L values are scaled so that quantizing the whole
model costs what it cost SmolLM2. That is conservative: larger models are known to lose less to
the same weight quantization. fp8 was not measured (CPU): it takes int8's values, as fp8 e4m3 and
per-channel int8 weights lose about the same in published weight-only results.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from .quality import Sensitivity

PRIOR_FILE = Path(__file__).resolve().parent.parent / "data" / "quality_prior_smollm2-135m.json"
STAND_IN = {"fp8": "int8"}  # precision without a measurement -> the one whose values it takes
PRIOR_NOTE = ("quality: a prior, not measured: SmolLM2-135M's measured per-layer loss increases mapped by "
              "relative depth, whole-model increase kept (conservative for larger models); fp8 taken as int8")


def source_sensitivity(path: Path = PRIOR_FILE) -> Sensitivity:
    data = json.loads(path.read_text())
    return Sensitivity(f"prior:{data['model']}", data["tokens"], data["base_loss"], data["delta"])


def _smooth(values: list[float]) -> list[float]:
    return [sum(values[max(0, i - 1):i + 2]) / len(values[max(0, i - 1):i + 2]) for i in range(len(values))]


def _at_depth(values: list[float], x: float) -> float:
    """Linear interpolation at relative depth x in [0, 1] (layer centres)."""
    pos = min(max(x * len(values) - 0.5, 0.0), len(values) - 1.0)
    i = min(int(math.floor(pos)), len(values) - 2) if len(values) > 1 else 0
    w = pos - i
    return values[i] * (1 - w) + values[min(i + 1, len(values) - 1)] * w


def depth_prior(source: Sensitivity, layers: int, precisions: list[str]) -> Sensitivity:
    """Per-layer loss increases for an L-layer model. base_loss is 0: without weights there is no
    base perplexity, so predicted_ppl() is the factor by which perplexity grows."""
    delta = {"native": [0.0] * layers}  # as measure_sensitivity: the layer count, native alone included
    for p in precisions:
        if p == "native":
            continue
        measured = source.delta.get(p) or source.delta.get(STAND_IN.get(p, ""))
        if measured is None:
            raise ValueError(f"the quality prior has no values for {p!r} (has {', '.join(source.delta)})")
        clipped = [max(0.0, d) for d in measured]
        shape = _smooth(clipped)
        mapped = [_at_depth(shape, (i + 0.5) / layers) for i in range(layers)]
        scale = sum(clipped) / sum(mapped) if sum(mapped) > 0 else 0.0
        delta[p] = [d * scale for d in mapped]
    return Sensitivity(source.model, source.tokens, 0.0, delta)
