"""Quality of per-layer precisions: measured perplexity and per-layer sensitivity.

Calibration text: hetserve/data/calibration.txt, the GNU GPL v3 text, shipped verbatim (its own
terms allow verbatim copies). Sensitivity of layer l at precision p is the measured increase of
mean token loss when only that layer is quantized (Δ(l, p)); a plan's perplexity is predicted as
exp(base loss + Σ Δ(l, p_l)), i.e. layer effects are assumed additive.
benchmarks/quality_prediction.py measures how well that holds on mixed plans, beside LLM-PQ's ω
(omega.py): it ranks plans better than ω, so the planner uses it (docs/benchmarks.md).

w8a8 layers also need activation scales (model/w8a8.py): calibrated once per model on the last
SCALE_TOKENS tokens of the same text, which no perplexity here is measured on (those use its
beginning), cached beside the sensitivities and shipped to the stages that serve w8a8 layers.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..files import write_atomic
from ..model.precision import ACTIVATIONS_QUANTIZED, apply_precisions
from ..model.resolve import hetserve_home
from ..model.stage import StageModel, StageSpec
from ..model.w8a8 import calibrated_scales

CALIBRATION = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"
SCALE_TOKENS = 512  # the text has ~7,600 tokens of SmolLM2's tokenizer: perplexity windows stay clear


@dataclass(frozen=True)
class Sensitivity:
    model: str  # model directory key (config hash)
    tokens: int  # calibration tokens scored
    base_loss: float  # mean token loss at native precision
    delta: dict[str, list[float]]  # precision -> per-layer loss increase

    def predicted_ppl(self, precisions: list[str]) -> float:
        """Negative measured deltas count as 0: calibration noise is never counted as a gain."""
        return math.exp(self.base_loss + sum(max(0.0, self.delta[p][i])
                                             for i, p in enumerate(precisions) if p != "native"))

    @property
    def base_ppl(self) -> float:
        return math.exp(self.base_loss)


def calibration_text_ids(model_dir: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(CALIBRATION.read_text())["input_ids"]


def calibration_ids(model_dir: Path, tokens: int) -> list[int]:
    ids = calibration_text_ids(model_dir)
    if len(ids) < tokens + 1:
        raise ValueError(f"the calibration text has only {len(ids)} tokens")
    return ids[: tokens + 1]


def mean_loss(model: StageModel, ids: list[int]) -> float:
    """Mean next-token cross-entropy of ids[1:] given the prefix, one sequence in slot 0."""
    x = torch.tensor([ids[:-1]], device=model.device)
    zero, length = torch.tensor([0], device=model.device), torch.tensor([len(ids) - 1], device=model.device)
    with torch.no_grad():
        hidden = model.hidden_states(torch.tensor([0], device=model.device), zero, length, x)
        logits = model.lm_head(model.norm(hidden[0])).float()  # [T, V]
        return float(torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:], device=model.device)))


def whole_model(model_dir: Path, tokens: int, device: str = "cpu", precisions: list[str] | None = None) -> StageModel:
    from ..model.stage import load_config

    layers = load_config(model_dir).num_hidden_layers
    scales = activation_scales(model_dir) if set(precisions or ()) & ACTIVATIONS_QUANTIZED else []
    spec = StageSpec(0, layers, True, True, max_seqs=1, max_context=tokens + 1, precisions=tuple(precisions or ()),
                     input_scales=tuple(scales))
    return StageModel(model_dir, spec, device)


def measure_activation_scales(model_dir: Path, device: str = "cpu") -> list[dict[str, float]]:
    """Per layer: w8a8 input scales, each layer calibrated on the native model's hidden states."""
    ids = calibration_text_ids(model_dir)[-(SCALE_TOKENS + 1):]
    model = whole_model(model_dir, SCALE_TOKENS, device)
    return calibrated_scales(model.layers, lambda: mean_loss(model, ids))


def activation_scales(model_dir: Path) -> list[dict[str, float]]:
    """Cached under $HETSERVE_HOME/quality/ (quality_key); measured on CPU, once per model."""
    path = hetserve_home() / "quality" / f"{quality_key(model_dir)}-w8a8-scales-{SCALE_TOKENS}.json"
    if path.is_file():
        return json.loads(path.read_text())
    scales = measure_activation_scales(model_dir)
    write_atomic(path, json.dumps(scales))
    return scales


def measure_ppl(model_dir: Path, precisions: list[str], tokens: int = 512, device: str = "cpu") -> float:
    model = whole_model(model_dir, tokens, device, precisions)
    return math.exp(mean_loss(model, calibration_ids(model_dir, tokens)))


def model_key(model_dir: Path) -> str:
    """The model's shape (its config): what a layer's speed depends on."""
    return hashlib.sha256((Path(model_dir) / "config.json").read_bytes()).hexdigest()[:16]


def quality_key(model_dir: Path) -> str:
    """What a quality measurement depends on: the config, the weight files (name, size, time
    written: a fine-tune of the same config is another model) and the calibration text."""
    files = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(Path(model_dir).glob("*.safetensors"))]
    key = json.dumps([model_key(model_dir), files, hashlib.sha256(CALIBRATION.read_bytes()).hexdigest()])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def measure_sensitivity(model_dir: Path, precisions: list[str], tokens: int = 512, device: str = "cpu",
                        progress: bool = True) -> Sensitivity:
    """Quantize one layer at a time (a copy swapped in), measure the loss increase."""
    from tqdm import tqdm

    model = whole_model(model_dir, tokens, device)
    ids = calibration_ids(model_dir, tokens)
    base = mean_loss(model, ids)
    scales = activation_scales(model_dir) if set(precisions) & ACTIVATIONS_QUANTIZED else []
    # native's increase is 0 by definition; it is there so that every Sensitivity says how many
    # layers it covers, a plan of native layers alone included
    delta = {"native": [0.0] * len(model.layers), **{p: [] for p in precisions if p != "native"}}
    work = [(p, i) for p in precisions if p != "native" for i in range(len(model.layers))]
    for precision, i in tqdm(work, desc="layer sensitivity", unit="layer", disable=not progress):
        original = model.layers[i]
        quantized = torch.nn.ModuleList([copy.deepcopy(original)])
        apply_precisions(quantized, [precision], model.device, scales[i:i + 1])
        model.layers[i] = quantized[0]
        delta[precision].append(mean_loss(model, ids) - base)
        model.layers[i] = original
    return Sensitivity(model_key(model_dir), tokens, base, delta)


def sensitivity(model_dir: Path, precisions: list[str], tokens: int = 512, device: str = "cpu",
                progress: bool = True) -> Sensitivity:
    """Cached under $HETSERVE_HOME/quality/; measured once per model (quality_key), precision set
    and length."""
    path = hetserve_home() / "quality" / f"{quality_key(model_dir)}-{tokens}-{'-'.join(sorted(precisions))}.json"
    if path.is_file():
        cached = Sensitivity(**json.loads(path.read_text()))
        if "native" in cached.delta:  # older ones lack it (and, for no precision, the layer count)
            return cached
    result = measure_sensitivity(model_dir, precisions, tokens, device, progress)
    write_atomic(path, json.dumps(asdict(result)))
    return result
