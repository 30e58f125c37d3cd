"""How well two per-layer quality indicators predict a mixed-precision model's perplexity (SmolLM2, CPU).

    .venv/bin/python benchmarks/quality_prediction.py [--tokens 512] [--plans 8] [--same-mix 6]

Indicators: ours, the measured loss increase of quantizing one layer at a time (plan/quality.py;
a plan's perplexity predicted as exp(base + sum of increases), negative increases counted as 0),
and LLM-PQ's ω = s_w²·Var(x) (plan/omega.py; a plan scored by Σω, which ranks but predicts no
perplexity). Plans: uniform int8, int4 and w8a8; random mixes whose precision shares are drawn per
plan (how much to quantize varies); and plans of one fixed mix whose layers are shuffled (only
which layers get which precision varies: the choice a planner makes under a budget). Prints each
plan's prediction, Σω and measured perplexity, then per indicator the Spearman rank correlation
with measured perplexity and, for ours, the error of the predicted perplexity.
"""

from __future__ import annotations

import argparse
import random

from hetserve.model.resolve import resolve_model
from hetserve.plan.omega import omega
from hetserve.plan.quality import measure_ppl, sensitivity

QUANTIZED = ["int8", "int4", "w8a8"]
CHOICES = ["native", *QUANTIZED]
SAME_MIX = {"native": 14, "int8": 4, "int4": 6, "w8a8": 6}  # 30 layers


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in order[i: j + 1]:
            out[k] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(a: list[float], b: list[float]) -> float:
    """Pearson correlation of the ranks."""
    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = (sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb)) ** 0.5
    return cov / var if var else float("nan")


def plans(layers: int, random_mixes: int, same_mix: int, seed: int) -> list[tuple[str, str, list[str]]]:
    """(group, name, precisions) for every plan measured."""
    rng = random.Random(seed)
    out = [("uniform", f"uniform {p}", [p] * layers) for p in QUANTIZED]
    for i in range(random_mixes):
        weights = [rng.random() for _ in CHOICES]
        out.append(("random", f"random mix {i + 1}", rng.choices(CHOICES, weights, k=layers)))
    for i in range(same_mix):
        fixed = [p for p, n in SAME_MIX.items() for _ in range(n)]
        rng.shuffle(fixed)
        out.append(("same mix", f"same mix, shuffled {i + 1}", fixed))
    return out


def describe(precisions: list[str]) -> str:
    return ", ".join(f"{precisions.count(p)} {p}" for p in CHOICES if p in precisions)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--plans", type=int, default=8, help="random mixes of random shares")
    parser.add_argument("--same-mix", type=int, default=6, help="shuffles of one fixed mix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    model_dir = resolve_model("smollm2-135m").path
    sens = sensitivity(model_dir, QUANTIZED, args.tokens)
    om = omega(model_dir, QUANTIZED, args.tokens)
    layers = len(sens.delta["int8"])
    rows = []
    for group, name, precs in plans(layers, args.plans, args.same_mix, args.seed):
        rows.append((group, name, precs, sens.predicted_ppl(precs), om.total(precs),
                     measure_ppl(model_dir, precs, args.tokens)))

    print(f"base perplexity {sens.base_ppl:.3f} on {args.tokens} calibration tokens")
    print(f"{'plan':28} {'precisions':38} {'predicted':>9} {'measured':>9} {'error':>6} {'Σω':>9}")
    for _, name, precs, predicted, total, measured in rows:
        print(f"{name:28} {describe(precs):38} {predicted:9.3f} {measured:9.3f} "
              f"{predicted / measured - 1:+6.1%} {total:9.3g}")

    print()
    print(f"{'indicator':32} {'ρ all plans':>11} {'ρ random mixes':>14} {'ρ same mix':>10} "
          f"{'mean |error|':>12} {'max |error|':>11}")
    subsets = {"all": rows, "random": [r for r in rows if r[0] == "random"],
               "same mix": [r for r in rows if r[0] == "same mix"]}
    for label, column in (("measured loss increase (ours)", 3), ("LLM-PQ ω (Σω)", 4)):
        rho = {k: spearman([r[column] for r in rs], [r[5] for r in rs]) for k, rs in subsets.items()}
        errors = [abs(r[3] / r[5] - 1) for r in rows]
        error = f"{sum(errors) / len(errors):12.1%} {max(errors):11.1%}" if column == 3 else f"{'-':>12} {'-':>11}"
        print(f"{label:32} {rho['all']:11.3f} {rho['random']:14.3f} {rho['same mix']:10.3f} {error}")
    print()
    print("per layer, Spearman ρ of ω with the measured loss increase: "
          + ", ".join(f"{p} {spearman(om.values[p], sens.delta[p]):.3f}" for p in QUANTIZED))


if __name__ == "__main__":
    main()
