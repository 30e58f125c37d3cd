"""W8A8: int8 weights times int8 activations, with static per-tensor activation scales.

quanto's W8A8 linear quantizes its input [.., in] to int8 with one fixed scale, multiplies it by
the int8 weights (torch._int_mm on CPU; on CUDA for more than 16 rows, else dequantized) and
returns the output [.., out] in the compute dtype. The input scale is absmax / 127 of the inputs
seen under `optimum.quanto.Calibration`; an uncalibrated scale is 1, which rounds every
activation to an integer and wrecks the layer, so a w8a8 layer never runs without its scales.

Outputs are not quantized: every consumer of a linear's output in these decoder layers (rotary,
attention, SiLU, the residual add) is a float op (quanto's streamline calibration disables output
quantization for all of them as well). Calibration runs with output quantization already off, so
it sees the inputs serving will see, and a layer's scales are just {linear name: input scale}.

Where the scales come from: they need the hidden states that reach a layer, which only a process
that runs every layer before it has. A stage of a pipeline has only its own layers, so scales are
calibrated once where the whole model runs (the quality step, plan/quality.py), cached, and
shipped to each stage with its assignment; that also makes serving use exactly the scales whose
quality was measured. Each layer is calibrated on native inputs, so its scales do not depend on
which other layers are quantized.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch

from .resolve import ModelError


def _activation_quantized(layer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from optimum.quanto.nn import QModuleMixin

    return {name: m for name, m in layer.named_modules()
            if isinstance(m, QModuleMixin) and m.activation_qtype is not None}


def input_scales(layer: torch.nn.Module) -> dict[str, float]:
    """linear name (e.g. "self_attn.q_proj") -> its input scale, for a quantized w8a8 layer."""
    return {name: float(m.input_scale) for name, m in _activation_quantized(layer).items()}


def set_input_scales(layer: torch.nn.Module, scales: dict[str, float]) -> None:
    """Give a quantized (not yet frozen) w8a8 layer its calibrated scales; outputs stay float."""
    linears = _activation_quantized(layer)
    if set(linears) != set(scales):
        raise ModelError(f"activation scales are for {sorted(scales)}, the layer has {sorted(linears)}")
    bad = {name: v for name, v in scales.items() if not (isinstance(v, (int, float)) and 0 < v < float("inf"))}
    if bad:  # 0, negative, NaN or inf made every quantized input of the layer inf or NaN, silently
        raise ModelError(f"activation scales must be finite and > 0, not {bad}")
    for name, m in linears.items():
        m.input_scale.fill_(scales[name])
        m.disable_output_quantization()


def calibrated_scales(layers: torch.nn.ModuleList, run: Callable[[], object]) -> list[dict[str, float]]:
    """Per layer of `layers` (native): the input scales of a w8a8 copy of it, calibrated on the
    hidden states that reach the layer in its first call while `run()` runs the native layers.

    Each layer's copy runs just before the layer itself, on the same arguments; it writes the same
    K/V cache entries, which the native layer then overwrites.
    """
    from optimum.quanto import Calibration, qint8, quantize

    scales: list[dict[str, float]] = [{} for _ in layers]
    handles = []

    def calibrate(i: int):
        def hook(module, args, kwargs):
            handles[i].remove()  # first call only; and the copy must not inherit the hook
            twin = copy.deepcopy(module)
            quantize(twin, weights=qint8, activations=qint8)
            for m in _activation_quantized(twin).values():
                m.disable_output_quantization()
            with torch.no_grad(), Calibration():
                twin(*args, **kwargs)
            scales[i] = input_scales(twin)
        return hook

    handles.extend(layer.register_forward_pre_hook(calibrate(i), with_kwargs=True) for i, layer in enumerate(layers))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    if not all(scales):
        raise ModelError("calibration did not reach every layer")
    return scales
