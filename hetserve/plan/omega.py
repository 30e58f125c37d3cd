"""LLM-PQ's quality indicator ω, computed to compare with our measured one (quality.py).

LLM-PQ (arXiv 2403.01136) scores quantizing a linear layer with weight W [out, in] to b bits by
ω = s_w² · Var(x): s_w = (max W − min W) / (2^(b−1) − 1) is the step of a b-bit grid over W's
whole range and Var(x) the variance of the layer's inputs on calibration text (here over every
token and input feature). A decoder layer's ω sums its linears, the MLP's terms ×4: LLM-PQ's
constant, the ratio of FFN to attention matrix sizes in OPT and BLOOM (SmolLM2's is 2.7; kept at
4 so that the indicator compared is the published one). ω has no activation term, so it scores
w8a8 exactly as int8. A plan's score is Σω over its quantized layers; it ranks plans but does not
predict a perplexity. benchmarks/quality_prediction.py measures how well each ranks them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .quality import calibration_ids, mean_loss, model_key, whole_model

BITS = {"int8": 8, "fp8": 8, "int4": 4, "w8a8": 8}  # weight bits as LLM-PQ counts them
FFN_FACTOR = 4


@dataclass(frozen=True)
class LinearStats:
    name: str  # within the decoder layer, e.g. "mlp.down_proj"
    weight_range: float  # max W - min W over the whole matrix
    input_var: float  # Var(x) of its inputs [tokens, in], all elements, population variance

    @property
    def ffn(self) -> bool:
        return self.name.startswith("mlp.")


def linear_omega(stats: LinearStats, bits: int) -> float:
    step = stats.weight_range / (2 ** (bits - 1) - 1)  # s_w
    return step ** 2 * stats.input_var * (FFN_FACTOR if stats.ffn else 1)


def layer_omega(linears: list[LinearStats], bits: int) -> float:
    return sum(linear_omega(s, bits) for s in linears)


def linear_stats(weight: torch.Tensor, inputs: torch.Tensor, name: str) -> LinearStats:
    """weight [out, in]; inputs [.., in] as the linear saw them."""
    w, x = weight.detach().double(), inputs.detach().double()
    return LinearStats(name, float(w.max() - w.min()), float(x.var(correction=0)))


@dataclass(frozen=True)
class Omega:
    model: str  # model key (config hash)
    tokens: int  # calibration tokens the input variances were taken on
    values: dict[str, list[float]]  # precision -> per-layer ω

    def total(self, precisions: list[str]) -> float:
        """A plan's Σω over its quantized layers."""
        return sum(self.values[p][i] for i, p in enumerate(precisions) if p != "native")


def collect_stats(layers: torch.nn.ModuleList, run: Callable[[], object]) -> list[list[LinearStats]]:
    """Per layer, its linears' statistics from the inputs they see while `run()` runs the layers."""
    stats: list[list[LinearStats]] = [[] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear):
                def record(module, args, i=i, name=name):
                    stats[i].append(linear_stats(module.weight, args[0], name))
                handles.append(module.register_forward_pre_hook(record))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return stats


def measure_stats(model_dir: Path, tokens: int = 512, device: str = "cpu") -> list[list[LinearStats]]:
    """One native pass over the calibration text (the tokens the sensitivities are measured on)."""
    model = whole_model(model_dir, tokens, device)
    ids = calibration_ids(model_dir, tokens)
    return collect_stats(model.layers, lambda: mean_loss(model, ids))


def omega(model_dir: Path, precisions: list[str], tokens: int = 512, device: str = "cpu") -> Omega:
    stats = measure_stats(model_dir, tokens, device)
    return Omega(model_key(model_dir), tokens,
                 {p: [layer_omega(linears, BITS[p]) for linears in stats] for p in precisions})
