"""A plan file of every decoder layer at one precision, split evenly over hosts worker-0, worker-1, ...

Not planned: for benchmarks that serve one precision through `hetserve up --plan` (a plan is how
hosts get per-layer precisions). The workload and micro-batch sizes become the cluster's limits
(cli/options.py apply_plan): batch = --max-seqs, prompt + output = --max-context.

    python benchmarks/uniform_plan.py MODEL HOSTS PRECISION OUT [--dtype bfloat16] [--prompt 896]
        [--output 128] [--batch 64] [--prefill-microbatch 8] [--decode-microbatch 64]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hetserve.model.resolve import resolve_model
from hetserve.model.stage import load_config
from hetserve.plan.planner import Plan, PlannedStage, Workload


def uniform_plan(model: str, hosts: int, precision: str, path: Path, dtype: str, workload: Workload,
                 prefill_microbatch: int, decode_microbatch: int, writer: str) -> Path:
    layers = load_config(resolve_model(model).path).num_hidden_layers
    bounds = [layers * i // hosts for i in range(hosts + 1)]
    stages = [PlannedStage(f"worker-{i}", a, b, [precision] * (b - a), 0.0, 0.0, 0, 0)
              for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]
    Plan(model, dtype, workload, 0.0, 0.0, 0.0, stages, prefill_microbatch, decode_microbatch, 0.0,
         notes=[f"written by {writer}: every layer {precision}, not planned"]).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model")
    parser.add_argument("hosts", type=int)
    parser.add_argument("precision")
    parser.add_argument("out", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompt", type=int, default=896)
    parser.add_argument("--output", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--prefill-microbatch", type=int, default=8)
    parser.add_argument("--decode-microbatch", type=int, default=64)
    parser.add_argument("--writer", default="benchmarks/uniform_plan.py", help="named in the plan's notes")
    args = parser.parse_args()
    print(uniform_plan(args.model, args.hosts, args.precision, args.out, args.dtype,
                       Workload(args.prompt, args.output, args.batch), args.prefill_microbatch,
                       args.decode_microbatch, args.writer))


if __name__ == "__main__":
    main()
