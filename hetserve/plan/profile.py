"""Measure what a decoder layer costs on this device, per precision and phase (`hetserve profile`).

Per precision: time of one decoder layer for prefill over (batch, prompt length) and for decode
over (batch, context length); the layer's weight bytes; and the fixed per-step cost of a stage
(mask, rotary) and of the head (norm + lm_head on one row per request). A stage of n layers is
then fixed + n x layer. Both are separated by timing stages of 1 and 3 layers, in turns so that
the machine's busy spells slow both alike: layer = (t3 - t1) / 2.

Profiles are JSON under $HETSERVE_HOME/profiles/, keyed by device, model, software versions and
the precisions measured, and reused when present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..model.precision import ACTIVATIONS_QUANTIZED, GPU_ONLY, PRECISIONS
from ..model.resolve import hetserve_home
from ..model.stage import StageModel, StageSpec, load_config
from ..model.w8a8 import calibrated_scales
from .device_profile import DeviceProfile, Grid
from .quality import model_key

log = logging.getLogger(__name__)

PROFILE_LAYERS = 3  # a stage of this many layers against one of 1: the difference is per-layer cost
# Measurement grids (prefill: batch x prompt; decode: batch x context). The CPU grid is small
# enough for ~1 minute on 2 cores; the GPU grid covers serving batch sizes and long prompts.
CPU_GRIDS = (Grid([1, 4], [32, 128]), Grid([1, 4, 8], [64, 512]))
GPU_GRIDS = (Grid([1, 8], [128, 512, 2048]), Grid([1, 16, 64], [512, 2048]))


# In every cached profile's key: raised whenever what a profile times changes with no library
# version to show it (our kernels, how a stage runs, how the profiler measures), so a profile of
# the old code is measured again, not reused. 2: CUDA-graph decode, int8/int4 kernels of ours,
# CPU linears choosing their product, 1- and 3-layer stages timed in turns (2026-12-01..05).
PROFILE_FORMAT = 2


def software_versions() -> dict[str, str]:
    import optimum.quanto
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "quanto": getattr(optimum.quanto, "__version__", "?")}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu-{platform.machine()}-{torch.get_num_threads()}t"


def profile_path(model_dir: Path, device: torch.device, dtype: str) -> Path:
    key = hashlib.sha256(json.dumps([device_name(device), model_key(model_dir), dtype, software_versions(),
                                     supported_precisions(device), PROFILE_FORMAT]).encode()).hexdigest()[:16]
    return hetserve_home() / "profiles" / f"{device_name(device).replace(' ', '_')}-{key}.json"


def supported_precisions(device: torch.device) -> list[str]:
    return [p for p in PRECISIONS if device.type == "cuda" or p not in GPU_ONLY]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastest_ms(fns, device: torch.device, repeats: int) -> list[float]:
    """Fastest of `repeats` runs of each of `fns`, after 3 warm-ups each, run in turn (f0, f1, f0,
    f1, ...): on a shared machine the minimum is the run least disturbed by others (the median
    moved by 2-3x between runs here), and taking turns exposes every function to the same
    disturbances, so that a difference of two (profile layers) is not one function's quiet spell
    against the other's busy one (interleaved, a 2-core CPU's int8 layer at batch 1 measured
    1.67-1.94 ms in four tries, one after the other 2.28-2.74)."""
    for _ in range(3):
        for fn in fns:
            fn()  # warm-up (and quanto's first-use kernel build)
    samples: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, times in zip(fns, samples):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times.append((time.perf_counter() - start) * 1000)
    return [min(times) for times in samples]


def stage_for_profile(model_dir: Path, layers: int, precision: str, dtype: str, device: str, slots: int, context: int,
           last: bool = False) -> StageModel:
    spec = StageSpec(0, layers, first=False, last=last, dtype=dtype, max_seqs=slots, max_context=context,
                     precisions=(precision,) * layers)
    if precision in ACTIVATIONS_QUANTIZED:
        # Scales calibrated on random hidden states: an int8 x int8 product costs the same
        # whatever the numbers, and a host has no real inputs for its layers.
        native = StageModel(model_dir, replace(spec, precisions=()), device)
        dev, tokens = native.device, min(32, context)
        hidden = torch.randn(1, tokens, native.hidden_size, dtype=native.dtype, device=dev)  # [1, T, H]
        zero = torch.zeros(1, dtype=torch.long, device=dev)
        scales = calibrated_scales(native.layers, lambda: native.hidden_states(zero, zero, zero + tokens, hidden))
        spec = replace(spec, input_scales=tuple(scales))
    return StageModel(model_dir, spec, device)


def step_ms(stage: StageModel, phase: str, batch: int, tokens: int, repeats: int) -> float:
    """One micro-batch by the path serving takes (StageModel.run: on a GPU, decode and prefill
    up to MAX_GRAPH_TOKENS replay CUDA graphs, captured in the warm-ups)."""
    return _fastest_ms([_step(stage, phase, batch, tokens)], stage.device, repeats)[0]


def _step(stage: StageModel, phase: str, batch: int, tokens: int):
    """A function running one micro-batch of `batch` rows through `stage`: the prompts' `tokens`
    (prefill), or one token each after `tokens` of context (decode)."""
    slots = list(range(batch))
    if phase == "prefill":
        starts, lengths, steps = [0] * batch, [tokens] * batch, tokens
    else:
        starts, lengths, steps = [tokens - 1] * batch, [1] * batch, 1
    hidden = torch.randn(batch, steps, stage.hidden_size, dtype=stage.dtype, device=stage.device)
    return lambda: stage.run(slots, starts, lengths, hidden)


def measure_profile(model_dir: Path, device: str = "cpu", dtype: str = "float32", precisions: list[str] | None = None,
                    repeats: int = 10, progress: bool = True, grids: tuple[Grid, Grid] | None = None,
                    budget_s: float = 0.0) -> DeviceProfile:
    """Per-layer times over the grids for each precision. With `budget_s`, a precision that would
    end past the budget (judged by the native one's time) is left out of the profile, so the
    planner does not use it on this device: a host joins in bounded time, and a profile that
    lacks a precision is never cached (the next join measures again)."""
    from tqdm import tqdm

    started = time.perf_counter()

    dev = torch.device(device)
    config = load_config(model_dir)
    precisions = precisions or supported_precisions(dev)
    prefill, decode = grids or (GPU_GRIDS if dev.type == "cuda" else CPU_GRIDS)
    slots = max(prefill.batches + decode.batches)
    context = max(prefill.tokens + decode.tokens) + 1
    phases = {"prefill": prefill, "decode": decode}
    points = sum(len(g.batches) * len(g.tokens) for g in phases.values())
    bar = tqdm(total=len(precisions) * points, desc=f"profile {device_name(dev)}", unit="point", disable=not progress)
    layer_ms: dict[str, dict[str, list[list[float]]]] = {phase: {} for phase in phases}
    fixed_ms: dict[str, list[list[float]]] = {}
    layer_bytes = {}
    measured = []
    for precision in precisions:
        elapsed = time.perf_counter() - started
        if budget_s and measured and elapsed + elapsed / len(measured) > budget_s:
            log.warning("profile: %s left out, it would end past the %.0f s budget", precision, budget_s)
            bar.update(points)
            continue
        measured.append(precision)
        one = stage_for_profile(model_dir, 1, precision, dtype, device, slots, context)
        three = stage_for_profile(model_dir, PROFILE_LAYERS, precision, dtype, device, slots, context)
        layer_bytes[precision] = (three.weight_bytes - one.weight_bytes) // (PROFILE_LAYERS - 1)
        for phase, grid in phases.items():
            rows, fixed_rows = [], []
            for b in grid.batches:
                row, fixed_row = [], []
                for t in grid.tokens:
                    t1, t3 = _fastest_ms([_step(one, phase, b, t), _step(three, phase, b, t)], dev, repeats)
                    layer = max((t3 - t1) / (PROFILE_LAYERS - 1), 0.5 * t1)  # noise guard: at least half a 1-layer stage
                    row.append(round(layer, 4))
                    fixed_row.append(round(max(t1 - layer, 0.0), 4))
                    bar.update()
                rows.append(row)
                fixed_rows.append(fixed_row)
            layer_ms[phase][precision] = rows
            if precision == "native":
                fixed_ms[phase] = fixed_rows
        del one, three
    bar.close()
    head_ms = _head_ms(model_dir, dtype, device, phases, repeats)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    itemsize = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    embed = config.vocab_size * config.hidden_size * itemsize
    return DeviceProfile(
        device=str(dev), device_name=device_name(dev), model=model_key(model_dir), dtype=dtype,
        versions=software_versions(), hidden_size=config.hidden_size,
        kv_bytes_per_token=2 * config.num_key_value_heads * head_dim * itemsize,
        embed_bytes=embed, head_bytes=embed + config.hidden_size * itemsize, layer_bytes=layer_bytes,
        prefill=prefill, decode=decode, layer_ms=layer_ms, fixed_ms=fixed_ms, head_ms=head_ms,
    )


def _head_ms(model_dir: Path, dtype: str, device: str, phases: dict[str, Grid], repeats: int) -> dict[str, list[float]]:
    """norm + lm_head + argmax for one row per request, by batch."""
    head = stage_for_profile(model_dir, 1, "native", dtype, device, 1, 2, last=True)
    out = {}
    for phase, grid in phases.items():
        out[phase] = []
        for b in grid.batches:
            x = torch.randn(b, head.hidden_size, dtype=head.dtype, device=head.device)
            out[phase].append(round(_fastest_ms([lambda: head.lm_head(head.norm(x)).argmax(-1)], head.device,
                                                 repeats)[0], 4))
    return out


def cached_profile(model_dir: Path, device: str = "cpu", dtype: str = "float32", progress: bool = True,
                   remeasure: bool = False, budget_s: float = 0.0) -> tuple[DeviceProfile, Path]:
    path = profile_path(model_dir, torch.device(device), dtype)
    if path.is_file() and not remeasure:
        try:
            return DeviceProfile.load(path), path
        except (ValueError, KeyError, TypeError) as exc:  # damaged or edited by hand: measure again
            log.warning("the cached profile %s cannot be used (%s): measuring again", path, exc)
    profile = measure_profile(model_dir, device, dtype, progress=progress, budget_s=budget_s)
    if set(profile.layer_bytes) == set(supported_precisions(torch.device(device))):
        profile.save(path)
    return profile, path
