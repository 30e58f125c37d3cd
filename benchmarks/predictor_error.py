"""How well a profile predicted from another device or layer shape matches a measured one.

    .venv/bin/python benchmarks/predictor_error.py

Uses the measured profiles in examples/profiles/ (H100, two Llama shapes, bf16; this repo's CPU,
SmolLM2, fp32). For each pair: predict the target from the reference with
`hetserve.plan.cost.predict_profile` (roofline ratio above a fixed floor) and compare every grid
measured point of the target (predictions interpolated), per precision.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from hetserve.plan.cost import DEVICE_SPECS, CostModel, LayerShape, predict_profile
from hetserve.plan.device_profile import DeviceProfile

PROFILES = Path(__file__).resolve().parent.parent / "examples" / "profiles"
CASES = [
    ("H100 Llama-3-8B layer -> H100 Llama-3.2-3B layer (shape)", "h100-llama-3-8b-bf16.json", "H100",
     "h100-llama-3.2-3b-bf16.json", "H100"),
    ("H100 Llama-3.2-3B layer -> H100 Llama-3-8B layer (shape)", "h100-llama-3.2-3b-bf16.json", "H100",
     "h100-llama-3-8b-bf16.json", "H100"),
    ("H100 Llama-3.2-3B -> 2-core CPU SmolLM2 fp32 (device and shape)", "h100-llama-3.2-3b-bf16.json", "H100",
     "cpu-2t-smollm2-135m-fp32.json", "CPU"),
]


def compare(predicted: DeviceProfile, measured: DeviceProfile) -> dict[str, tuple[int, float]]:
    """precision -> (points, mean |predicted / measured - 1|) over the measured grid points."""
    cost = CostModel(predicted)
    errors: dict[str, list[float]] = {}
    for phase in ("prefill", "decode"):
        grid = measured.prefill if phase == "prefill" else measured.decode
        for p in set(predicted.layer_ms[phase]) & set(measured.layer_ms[phase]):
            for bi, b in enumerate(grid.batches):
                for ti, t in enumerate(grid.tokens):
                    want = measured.layer_ms[phase][p][bi][ti]
                    errors.setdefault(p, []).append(abs(cost.layer_ms(p, phase, b, t) / want - 1))
    return {p: (len(e), statistics.mean(e)) for p, e in errors.items()}


def main() -> None:
    print(f"{'prediction':64} mean |error| by precision (points)")
    for name, ref_file, ref_spec, target_file, target_spec in CASES:
        ref, target = DeviceProfile.load(PROFILES / ref_file), DeviceProfile.load(PROFILES / target_file)
        predicted = predict_profile(ref, DEVICE_SPECS[ref_spec], DEVICE_SPECS[target_spec], LayerShape.of(target))
        errs = compare(predicted, target)
        print(f"{name:64} " + ", ".join(f"{p} {e:.0%} ({n})" for p, (n, e) in sorted(errs.items())))


if __name__ == "__main__":
    main()
