"""The leader's own work per decode step, without sockets or a model: what a step costs the
leader's event loop beside the stages' compute.

For R requests decoding together (one micro-batch of R rows), times, median over `--steps`:
  - result -> next send: decoding the last stage's StepResult, recording its tokens and
    choosing and building the next micro-batch (one stage, decode-ahead on, as served: the stage
    computes the micro-batch queued behind this one meanwhile, so the stages wait only where this
    takes longer than a step's compute);
  - whole step: the above plus detokenizing and streaming the R tokens (done after the send,
    while the stages compute);
  - the header codec: encoding the R-row Step the leader sends and decoding it (what every host
    does on receipt).

    .venv/bin/python benchmarks/leader_step.py [--model smollm2-135m] [--rows 1,8,64] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import time

from transformers import AutoTokenizer

from hetserve.config import Limits
from hetserve.leader.engine import Engine
from hetserve.model.resolve import resolve_model
from hetserve.wire.codec import decode, encode
from hetserve.wire.messages import Step, StepResult
from hetserve.wire.tensors import to_frame

PROMPT = list(range(100, 164))  # 64 prompt tokens per request


def median_us(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(tokenizer, rows: int, steps: int) -> dict[str, float]:
    sent: dict[int, Step] = {}
    sent_at: list[float] = []

    def send(step, ids):
        sent_at.append(time.perf_counter())
        to_frame(ids)
        encode(step)
        sent[step.mb] = step

    engine = Engine(Limits(max_seqs=rows, max_context=4096, decode_seqs=rows, prefill_seqs=rows,
                           prefill_tokens=rows * len(PROMPT)),
                    set(), lambda ids: tokenizer.decode(ids, skip_special_tokens=True), send, vocab_size=len(tokenizer))
    engine.pipeline_ready(1, gpu=True)  # one GPU stage: decode-ahead on, as served there
    for i in range(rows):
        engine.new_request(f"r{i}", lambda event: None, PROMPT, 100_000, 0.0, 0, 1.0, 1, (), True)

    def result() -> bytes:
        step = sent[min(engine.in_flight)]  # the stage returns micro-batches in send order
        return encode(StepResult(step.mb, [1000 + (k * 7 + step.mb) % 500 for k in range(len(step.slots))], [5.0],
                                 step.epoch))

    while any(r.prompt_left for r in engine.requests.values()) or len(sent[max(sent)].slots) < rows:
        engine.on_result(decode(result(), expect=(StepResult,)))
    critical, whole = [], []
    for _ in range(steps):
        raw = result()
        start = time.perf_counter()
        engine.on_result(decode(raw, expect=(StepResult,)))
        whole.append(time.perf_counter() - start)
        critical.append(sent_at[-1] - start)
    last = sent[max(sent)]
    header = encode(last)
    return {"critical_ms": statistics.median(critical) * 1e3, "step_ms": statistics.median(whole) * 1e3,
            "encode_us": median_us(lambda: encode(last), steps),
            "decode_us": median_us(lambda: decode(header, expect=(Step,)), steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m", help="a model name or directory (its tokenizer is used)")
    parser.add_argument("--rows", default="1,8,64")
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model).path)
    print(f"{'rows':>5} {'result -> send ms':>17} {'whole step ms':>13} {'Step encode us':>14} {'Step decode us':>14}")
    for rows in (int(r) for r in args.rows.split(",")):
        m = measure(tokenizer, rows, args.steps)
        print(f"{rows:>5} {m['critical_ms']:17.3f} {m['step_ms']:13.3f} {m['encode_us']:14.1f} {m['decode_us']:14.1f}")


if __name__ == "__main__":
    main()
