"""Per-layer precisions a stage can run, applied with optimum-quanto.

"native" keeps the stage's compute dtype. int8, fp8 and int4 quantize the layer's linear weights
only (activations stay in the compute dtype). w8a8 quantizes weights and each linear's input to
int8 and multiplies int8 x int8 (model/w8a8.py); its static activation scales are data the
caller passes in, one dict per layer. What each costs in time is measured, never assumed: on
CPUs every weight-only quanto precision decodes slower than fp32, and on Hopper quanto's int8
kernel is kernel-bound and its int4 prefill slow, which is why GPU stages run weight-only int8 and
int4 layers through kernels of ours (model/weight_only.py; docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .resolve import ModelError
from .w8a8 import set_input_scales

PRECISIONS = ("native", "int8", "fp8", "int4", "w8a8")
GPU_ONLY = {"fp8"}  # quanto's fp8 path is Marlin on CUDA; on CPU it is emulated and very slow
ACTIVATIONS_QUANTIZED = {"w8a8"}  # these need per-layer input scales (model/w8a8.py)


def quanto_weights(precision: str):
    from optimum.quanto import qfloat8, qint4, qint8

    return {"int8": qint8, "fp8": qfloat8, "int4": qint4, "w8a8": qint8}[precision]


def quanto_activations(precision: str):
    from optimum.quanto import qint8

    return qint8 if precision in ACTIVATIONS_QUANTIZED else None


def check_precisions(precisions: list[str], layers: int, device: torch.device) -> None:
    if len(precisions) != layers:
        raise ModelError(f"{len(precisions)} precisions for {layers} layers")
    unknown = set(precisions) - set(PRECISIONS)
    if unknown:
        raise ModelError(f"unknown precision(s) {sorted(unknown)}; use {', '.join(PRECISIONS)}")
    if device.type != "cuda" and set(precisions) & GPU_ONLY:
        raise ModelError(f"precision(s) {sorted(set(precisions) & GPU_ONLY)} need a CUDA device")


def apply_precisions(layers: torch.nn.ModuleList, precisions: list[str], device: torch.device,
                     input_scales: Sequence[dict[str, float]] = ()) -> None:
    """Quantize each layer in place; layers share one freeze.

    input_scales: per layer of `layers`, the activation scales of a w8a8 layer (linear name ->
    scale); entries of other layers are ignored, and () is fine when no layer is w8a8.
    """
    from optimum.quanto import freeze, quantize

    check_precisions(precisions, len(layers), device)
    scaled = [i for i, p in enumerate(precisions) if p in ACTIVATIONS_QUANTIZED]
    if scaled and (len(input_scales) != len(layers) or not all(input_scales[i] for i in scaled)):
        raise ModelError(f"layers {scaled} are w8a8 and need their activation scales")
    groups: dict[str, list[int]] = {}
    for i, precision in enumerate(precisions):
        if precision != "native":
            groups.setdefault(precision, []).append(i)
    if not groups:
        return
    # One quantize() per precision with disjoint include patterns: a QLinear is an nn.Linear and
    # would be quantized again by a later call that matched it.
    for precision, indices in groups.items():
        quantize(layers, weights=quanto_weights(precision), activations=quanto_activations(precision),
                 include=[f"{i}.*" for i in indices])
    for i in scaled:
        set_input_scales(layers[i], input_scales[i])
    freeze(layers)


def module_bytes(*modules: torch.nn.Module) -> int:
    """Bytes the modules' weights occupy, quantized tensors counted by their stored parts and a
    tensor that two of them share (a tied embedding and lm_head) once."""
    seen = {}
    for module in modules:
        for t in module.state_dict().values():
            # plain tensors by the memory they view; quanto's tensors, which are never shared, by identity
            key = (t.data_ptr(), t.storage_offset(), t.shape) if type(t) in (torch.Tensor, torch.nn.Parameter) \
                else id(t)
            seen[key] = t.numel() * t.element_size()
    return sum(seen.values())
