"""Pipeline overhead on CPU: hetserve (1 and 2 loopback stages) vs transformers `generate`.

Measures, in one run, for SmolLM2-135M in fp32:
  - batch 1: time per output token (decode step, median of repeats) and tokens/s;
  - batch 8: output tokens/s with 8 concurrent requests of different prompts.
transformers runs in this process; each hetserve configuration is a real `hetserve up` cluster on
127.0.0.1 driven through the line protocol. Prints a table, writes JSON.

    .venv/bin/python benchmarks/pipeline_cpu.py [--tokens 64] [--repeats 3] [--threads T] [--model M]
        [--out bench-results/pipeline_cpu.json]

--threads T gives transformers and every stage T threads, as if each host had T cores of its own
(default: this machine's cores, and also a run with the cores split between the stages).
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
import time
from pathlib import Path

import torch

from hetserve.client import LineClient
from hetserve.model.resolve import resolve_model

PROMPTS = [
    "1, 2, 3, 4, 5,", "a, b, c, d,", "Monday, Tuesday,", "10, 20, 30,",
    "January, February, March,", "red, orange, yellow,", "2, 4, 6, 8,", "one, two, three,",
]


EXTRA_ENV = dict(kv.split("=", 1) for kv in os.environ.get("BENCH_ENV", "").split() if "=" in kv)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_transformers(model_dir: Path, tokens: int, repeats: int, threads: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def timed(prompts: list[str], n: int) -> float:
        enc = tok(prompts, return_tensors="pt", padding=True)
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_token_id)
        return time.perf_counter() - start

    timed(PROMPTS[:1], 4)  # warm-up
    step_ms, tps1, tps8 = [], [], []
    for _ in range(repeats):
        one, full = timed(PROMPTS[:1], 1), timed(PROMPTS[:1], tokens)
        step_ms.append((full - one) / (tokens - 1) * 1000)
        tps1.append(tokens / full)
        tps8.append(8 * tokens / timed(PROMPTS, tokens))
    return {"batch1_ms_per_token": statistics.median(step_ms), "batch1_tokens_per_s": statistics.median(tps1),
            "batch8_tokens_per_s": statistics.median(tps8)}


async def one_request(client: LineClient, prompt: str, tokens: int) -> tuple[list[float], int]:
    stamps = []
    async for event in client.request({"prompt": prompt, "max_tokens": tokens}):
        if event["event"] == "token":
            stamps.append(time.perf_counter())
        elif event["event"] == "error":
            raise RuntimeError(event["error"])
    return stamps, len(stamps)


async def drive(serve: str, tokens: int, repeats: int) -> dict:
    client = await LineClient.connect(serve, wait=300)
    await client.wait_serving(300)
    await one_request(client, PROMPTS[0], 4)  # warm-up
    step_ms, tps1, tps8 = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        stamps, n = await one_request(client, PROMPTS[0], tokens)
        step_ms.append((stamps[-1] - stamps[0]) / (n - 1) * 1000)
        tps1.append(n / (stamps[-1] - start))
        start = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, p, tokens) for p in PROMPTS))
        tps8.append(sum(n for _, n in results) / (time.perf_counter() - start))
    await client.close()
    return {"batch1_ms_per_token": statistics.median(step_ms), "batch1_tokens_per_s": statistics.median(tps1),
            "batch8_tokens_per_s": statistics.median(tps8)}


def bench_hetserve(model: str, workers: int, threads: int, tokens: int, repeats: int) -> dict:
    serve, listen = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    cmd = [sys.executable, "-m", "hetserve", "up", "--model", model, "--workers", str(workers), "--threads", str(threads),
           "--serve", serve, "--listen", listen, "--log-level", "warning", "--max-context", "512"]
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
    parser.add_argument("--out", default="bench-results/pipeline_cpu.json")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    threads = args.threads or cores
    model_dir = resolve_model(args.model).path
    rows = {f"transformers generate (1 process, {threads} threads)":
            bench_transformers(model_dir, args.tokens, args.repeats, threads)}
    rows[f"hetserve 1 stage ({threads} threads)"] = bench_hetserve(args.model, 1, threads, args.tokens, args.repeats)
    rows[f"hetserve 2 stages ({threads} threads each)"] = bench_hetserve(args.model, 2, threads, args.tokens, args.repeats)
    if args.threads is None and cores > 1:
        rows[f"hetserve 2 stages ({cores // 2} thread(s) each)"] = bench_hetserve(args.model, 2, cores // 2, args.tokens,
                                                                                 args.repeats)
    base = next(iter(rows.values()))
    print(f"{args.model} fp32, CPU ({cores} cores), {args.tokens} output tokens, median of {args.repeats}")
    print(f"{'configuration':46} {'b1 ms/token':>12} {'vs HF':>7} {'b1 tok/s':>9} {'b8 tok/s':>9} {'vs HF':>7}")
    for name, r in rows.items():
        print(f"{name:46} {r['batch1_ms_per_token']:12.1f} {r['batch1_ms_per_token'] / base['batch1_ms_per_token']:6.2f}x"
              f" {r['batch1_tokens_per_s']:9.1f} {r['batch8_tokens_per_s']:9.1f}"
              f" {r['batch8_tokens_per_s'] / base['batch8_tokens_per_s']:6.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"tokens": args.tokens, "repeats": args.repeats, "cores": cores, "results": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
