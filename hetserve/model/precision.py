"""Per-layer weight precisions a stage can run, applied with optimum-quanto.

"native" keeps the stage's compute dtype; the others quantize the layer's linear weights
(weight-only; activations stay in the compute dtype). What each costs in time is measured, never
assumed: on CPUs every quanto precision decodes slower than fp32, and on Hopper int8 is
kernel-bound and int4 prefill is slow (docs/benchmarks.md, ../shared/notes/platform.md).
"""

from __future__ import annotations

import torch

from .resolve import ModelError

PRECISIONS = ("native", "int8", "fp8", "int4")
GPU_ONLY = {"fp8"}  # quanto's fp8 path is Marlin on CUDA; on CPU it is emulated and very slow


def quanto_weights(precision: str):
    from optimum.quanto import qfloat8, qint4, qint8

    return {"int8": qint8, "fp8": qfloat8, "int4": qint4}[precision]


def check_precisions(precisions: list[str], layers: int, device: torch.device) -> None:
    if len(precisions) != layers:
        raise ModelError(f"{len(precisions)} precisions for {layers} layers")
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ModelError(f"unknown precision(s) {sorted(unknown)}; use {', '.join(PRECISIONS)}")
    if device.type != "cuda" and set(precisions) & GPU_ONLY:
        raise ModelError(f"precision(s) {sorted(set(precisions) & GPU_ONLY)} need a CUDA device")


def apply_precisions(layers: torch.nn.ModuleList, precisions: list[str], device: torch.device) -> None:
    """Quantize each layer's weights in place; layers share one freeze."""
    from optimum.quanto import freeze, quantize

    check_precisions(precisions, len(layers), device)
    groups: dict[str, list[int]] = {}
    for i, precision in enumerate(precisions):
        if precision != "native":
            groups.setdefault(precision, []).append(i)
    if not groups:
        return
    # One quantize() per precision with disjoint include patterns: a QLinear is an nn.Linear and
    # would be quantized again by a later call that matched it.
    for precision, indices in groups.items():
        quantize(layers, weights=quanto_weights(precision), include=[f"{i}.*" for i in indices])
    freeze(layers)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes a module's weights occupy, quantized tensors counted by their stored parts."""
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())
