"""How well per-layer sensitivities predict a mixed-precision model's perplexity (SmolLM2, CPU).

    .venv/bin/python benchmarks/quality_prediction.py [--tokens 512] [--plans 4]

Measures (or loads the cached) per-layer loss increases, then for uniform int8, uniform int4 and
random per-layer mixes prints the predicted perplexity (exp(base + sum of increases), negative
increases counted as 0) beside the measured one on the calibration text.
"""

from __future__ import annotations

import argparse

from hetserve.model.resolve import resolve_model
from hetserve.plan.quality import measure_ppl, sensitivity, validate_prediction


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--plans", type=int, default=4)
    args = parser.parse_args()
    model_dir = resolve_model("smollm2-135m").path
    sens = sensitivity(model_dir, ["int4", "int8"], args.tokens)
    layers = len(sens.delta["int8"])
    rows = [(f"uniform {p}", [p] * layers) for p in ("int8", "int4")]
    results = [(name, sens.predicted_ppl(precs), measure_ppl(model_dir, precs, args.tokens)) for name, precs in rows]
    for i, (precs, predicted, measured) in enumerate(validate_prediction(model_dir, sens, args.plans)):
        mix = ", ".join(f"{precs.count(p)} {p}" for p in ("native", "int8", "int4"))
        results.append((f"random mix {i + 1} ({mix})", predicted, measured))
    print(f"base perplexity {sens.base_ppl:.3f} on {args.tokens} calibration tokens")
    print(f"{'precisions':44} {'predicted':>9} {'measured':>9} {'error':>6}")
    for name, predicted, measured in results:
        print(f"{name:44} {predicted:9.3f} {measured:9.3f} {predicted / measured - 1:+6.1%}")


if __name__ == "__main__":
    main()
