"""Pipeline overhead on CPU: hetserve (1 and 2 loopback stages) vs transformers `generate`.

Measures, in one run, for SmolLM2-135M in fp32 (decoder layers at --precision):
  - batch 1: time per output token (decode step, median of repeats) and tokens/s;
  - batch 8: output tokens/s with 8 concurrent requests of different prompts.
transformers runs in this process; each hetserve configuration is a real `hetserve up` cluster on
127.0.0.1 driven through the line protocol. Both are timed by `hetserve bench`'s code
(hetserve/bench/): the same per-token clock, and requests end at their first end-of-sequence
token on both sides. Prints a table, writes JSON.

    .venv/bin/python benchmarks/pipeline_cpu.py [--tokens 64] [--repeats 3] [--threads T] [--model M]
        [--precision native|int8|int4] [--out bench-results/pipeline_cpu.json]

--threads T gives transformers and every stage T threads, as if each host had T cores of its own
(default: this machine's cores, and also a run with the cores split between the stages).
--precision int8 (or int4) serves every decoder layer at that quanto precision (a plan file with
the cluster's default limits, layers split evenly) and quantizes transformers' layers the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from hetserve.bench.baseline import BaselineSpec, HFBaseline
from hetserve.bench.load import LoadSpec, run_load, warm_up
from hetserve.bench.stats import Summary, summarize
from hetserve.bench.workload import RequestSpec
from hetserve.client import LineClient
from hetserve.config import Limits
from hetserve.model.resolve import resolve_model
from hetserve.plan.planner import Workload
from uniform_plan import uniform_plan  # benchmarks/, this script's folder

PROMPTS = [
    "1, 2, 3, 4, 5,", "a, b, c, d,", "Monday, Tuesday,", "10, 20, 30,",
    "January, February, March,", "red, orange, yellow,", "2, 4, 6, 8,", "one, two, three,",
]


MAX_CONTEXT = 512  # tokens per request the clusters allocate KV cache for

EXTRA_ENV = dict(kv.split("=", 1) for kv in os.environ.get("BENCH_ENV", "").split() if "=" in kv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def requests(prompts: list[str], tokens: int) -> list[RequestSpec]:
    return [RequestSpec(p, tokens) for p in prompts]


def medians(runs: list[tuple[Summary, Summary]]) -> dict:
    """(batch 1, batch 8) summaries of each repeat -> the table's three numbers."""
    for one, eight in runs:
        if one.errors or eight.errors:
            raise RuntimeError(f"requests failed: {one.error_codes or eight.error_codes}")
    return {"batch1_ms_per_token": statistics.median(one.tpot_ms_p50 for one, _ in runs),
            "batch1_tokens_per_s": statistics.median(one.output_tokens_per_s for one, _ in runs),
            "batch8_tokens_per_s": statistics.median(eight.output_tokens_per_s for _, eight in runs)}


def bench_transformers(model_dir: Path, tokens: int, repeats: int, threads: int, precision: str) -> dict:
    hf = HFBaseline(BaselineSpec(model_dir, "cpu", "float32", threads=threads, precision=precision), PROMPTS[0])
    runs = []
    for _ in range(repeats):
        one = hf.run(list(enumerate(requests(PROMPTS[:1], tokens))), 1)
        eight = hf.run(list(enumerate(requests(PROMPTS, tokens))), len(PROMPTS))
        runs.append((summarize(one.results, one.duration_s), summarize(eight.results, eight.duration_s)))
    return medians(runs)


async def drive(serve: str, tokens: int, repeats: int) -> dict:
    client = await LineClient.connect(serve, wait=300)
    await client.wait_serving(300)
    await client.close()
    await warm_up(serve, requests(PROMPTS[:1], tokens), 1)
    runs = []
    for _ in range(repeats):
        one = await run_load(LoadSpec(serve, 1, 1, None), requests(PROMPTS[:1], tokens))
        eight = await run_load(LoadSpec(serve, len(PROMPTS), len(PROMPTS), None), requests(PROMPTS, tokens))
        runs.append((summarize(one.results, one.duration_s), summarize(eight.results, eight.duration_s)))
    return medians(runs)


def bench_hetserve(model: str, workers: int, threads: int, tokens: int, repeats: int, precision: str,
                   extra: tuple[str, ...] = ()) -> dict:
    serve, listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    plan = []
    if precision != "native":
        # A plan sets the cluster's limits: the same as without one (hetserve up's defaults, this
        # benchmark's context), MAX_CONTEXT split as prompt + output.
        limits = Limits()
        workload = Workload(MAX_CONTEXT - tokens, tokens, limits.max_seqs)
        path = uniform_plan(model, workers, precision, Path(tempfile.mkdtemp()) / "plan.json", "float32", workload,
                            limits.prefill_seqs, limits.decode_seqs, "benchmarks/pipeline_cpu.py")
        plan = ["--plan", str(path)]
    cmd = [sys.executable, "-m", "hetserve", "up", "--model", model, "--workers", str(workers), "--threads", str(threads),
           "--serve", serve, "--listen", listen, "--log-level", "warning", "--max-context", str(MAX_CONTEXT), *plan,
           *extra]
    proc = subprocess.Popen(cmd, start_new_session=True, env={**os.environ, **EXTRA_ENV})
    try:
        return asyncio.run(drive(serve, tokens, repeats))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="output tokens per request")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measurement (median)")
    parser.add_argument("--threads", type=int, default=None, help="threads for transformers and for each stage")
    parser.add_argument("--model", default="smollm2-135m", help="model spec (a directory works, e.g. random weights)")
    parser.add_argument("--precision", default="native", choices=("native", "int8", "int4"),
                        help="quanto precision of every decoder layer, in hetserve and transformers alike")
    parser.add_argument("--out", default="bench-results/pipeline_cpu.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    threads = args.threads or cores
    model_dir = resolve_model(args.model).path
    rows = {f"transformers generate (1 process, {threads} threads)":
            bench_transformers(model_dir, args.tokens, args.repeats, threads, args.precision)}
    run = dict(tokens=args.tokens, repeats=args.repeats, precision=args.precision)
    rows[f"hetserve 1 stage ({threads} threads)"] = bench_hetserve(args.model, 1, threads, **run)
    rows[f"hetserve 1 stage ({threads} threads), --decode-ahead on"] = bench_hetserve(
        args.model, 1, threads, **run, extra=("--decode-ahead", "on"))
    rows[f"hetserve 2 stages ({threads} threads each)"] = bench_hetserve(args.model, 2, threads, **run)
    if args.threads is None and cores > 1:
        rows[f"hetserve 2 stages ({cores // 2} thread(s) each)"] = bench_hetserve(args.model, 2, cores // 2, **run)
    base = next(iter(rows.values()))
    print(f"{args.model} fp32, layers {args.precision}, CPU ({cores} cores), {args.tokens} output tokens, "
          f"median of {args.repeats}")
    print(f"{'configuration':52} {'b1 ms/token':>12} {'vs HF':>7} {'b1 tok/s':>9} {'b8 tok/s':>9} {'vs HF':>7}")
    for name, r in rows.items():
        print(f"{name:52} {r['batch1_ms_per_token']:12.1f} {r['batch1_ms_per_token'] / base['batch1_ms_per_token']:6.2f}x"
              f" {r['batch1_tokens_per_s']:9.1f} {r['batch8_tokens_per_s']:9.1f}"
              f" {r['batch8_tokens_per_s'] / base['batch8_tokens_per_s']:6.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "repeats": args.repeats, "cores": cores,
                               "precision": args.precision, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
