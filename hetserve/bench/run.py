"""`hetserve bench` from start to end: check the server, build the workload, run it, the baseline, the report."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..client import ClientError, LineClient
from ..model.resolve import ModelError, resolve_model
from .baseline import BaselineSpec, HFBaseline, check_device
from .load import LoadResult, LoadSpec, run_load, warm_up
from .report import document, format_table, headline
from .stats import RequestResult, Summary, ratios, summarize
from .workload import RequestSpec, WorkloadError, load_prompts, synthetic_workload, token_count

SYNTHETIC_POOL = 256  # distinct synthetic prompts at most; longer runs cycle through them
REQUESTS_PER_CLIENT = 4  # default run length without --requests, --duration or a prompts file
BASELINES = ("hf",)


class BenchError(Exception):
    """Bad input or a server that cannot be benchmarked; the message says which."""


@dataclass(frozen=True)
class BenchConfig:
    server: str
    concurrency: int = 1
    requests: int | None = None  # None and no duration: each file prompt once, or 4 per client
    duration_s: float | None = None
    prompt_tokens: int = 128  # synthetic prompts only
    output_tokens: int = 128  # max_tokens of synthetic prompts and of file prompts without one
    prompts_file: str | None = None
    model: str | None = None  # tokenizer and baseline model; None = the model the server reports
    temperature: float = 0.0
    warmup: int = 1
    baseline: str | None = None  # "hf" or None
    device: str = "cpu"  # the baseline's
    dtype: str | None = None  # the baseline's; None: the server's
    precision: str = "native"  # the baseline's decoder layers: native, int8 or int4 (quanto, weights only)
    threads: int | None = None  # the baseline's torch threads
    wait_s: float = 0.0  # for the server to come up and serve
    progress: bool = True
    token: str | None = None  # the server's client token; left out of every report
    reply_timeout_s: float = 600.0  # a request (or the server's status) silent this long fails as `timeout`


@dataclass(frozen=True)
class BenchReport:
    table: str
    document: dict
    hetserve: Summary
    notes: list[str]  # lines to show after the table (output shorter than asked, errors)


async def _server_status(server: str, wait_s: float, token: str | None, reply_timeout_s: float) -> dict:
    deadline = time.monotonic() + wait_s  # one --wait for both: the server listening, then serving
    client = await LineClient.connect(server, wait_s, token, reply_timeout_s)
    try:
        status = await (client.wait_serving(max(0.0, deadline - time.monotonic()), reply_timeout_s) if wait_s
                        else client.status(reply_timeout_s))
    finally:
        await client.close()
    if status.get("state") != "serving":
        raise BenchError(f"the cluster at {server} is not serving (state: {status.get('state')}); "
                         "wait for it or pass --wait SECONDS")
    return status


def _server_info(status: dict) -> dict:
    hosts = [{k: h.get(k) for k in ("name", "device", "device_name", "layers", "precision")} for h in status["hosts"]]
    return {"model": status.get("model"), "dtype": status.get("dtype"), "hosts": hosts, "limits": status.get("limits")}


def _model_dir(config: BenchConfig, status: dict) -> Path:
    spec = config.model or status.get("model")
    try:
        return resolve_model(spec).path
    except ModelError as exc:
        hint = "" if config.model else f" (the server's model {spec!r}; pass --model with a local copy)"
        raise BenchError(f"cannot load the tokenizer{hint}: {exc}") from None


def _file_workload(config: BenchConfig) -> list[RequestSpec]:
    try:
        return load_prompts(Path(config.prompts_file), config.output_tokens)
    except WorkloadError as exc:
        raise BenchError(str(exc)) from None


def _synthetic_workload(config: BenchConfig, status: dict, model_dir: Path) -> list[RequestSpec]:
    context = (status.get("limits") or {}).get("max_context")
    if context is not None and config.prompt_tokens + config.output_tokens > context:
        raise BenchError(f"--prompt-tokens {config.prompt_tokens} + --output-tokens {config.output_tokens} do not fit "
                         f"the server's context of {context} tokens")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:  # weights without tokenizer files (random_model.py without --tokenizer)
        raise BenchError(f"cannot load a tokenizer from {model_dir} to build prompts ({exc}); give --prompts "
                         "FILE, or --model with a tokenizer") from None
    count = min(config.requests or SYNTHETIC_POOL, SYNTHETIC_POOL)
    specs = synthetic_workload(tokenizer, count, config.prompt_tokens, config.output_tokens)
    if token_count(tokenizer, specs[0].prompt) != config.prompt_tokens:
        raise BenchError(f"cannot build a prompt of {config.prompt_tokens} tokens with this tokenizer")
    return specs


def _request_limit(config: BenchConfig, specs: list[RequestSpec]) -> int | None:
    if config.requests is not None or config.duration_s is not None:
        return config.requests
    return len(specs) if config.prompts_file else REQUESTS_PER_CLIENT * config.concurrency


def _progress(total: int | None, desc: str, enabled: bool):
    """A progress bar on stderr that shows output tokens/s; returns (callback, close)."""
    from tqdm import tqdm

    # disable=None: off when stderr is not a terminal (logs, tests), where a bar is only noise.
    bar = tqdm(total=total, desc=desc, unit="req", disable=None if enabled else True, file=sys.stderr, leave=False)
    tokens = [0]

    def update(result: RequestResult) -> None:
        tokens[0] += result.output_tokens
        elapsed = bar.format_dict["elapsed"]
        bar.set_postfix_str(f"{tokens[0] / elapsed:.1f} tok/s" if elapsed else "", refresh=False)
        bar.update()

    return update, bar.close


def _notes(name: str, summary: Summary, asked: float | None, short: dict[str, int]) -> list[str]:
    """Errors by code with the first message of each, and output shorter than `asked` (mean
    max_tokens of the completed requests); short: the requests ended early, by finish reason."""
    notes = []
    for code, count in summary.error_codes.items():
        message = summary.error_messages.get(code)
        notes.append(f"{name}: {count} request(s) failed with {code}" + (f": {message}" if message else ""))
    if asked is not None and summary.mean_output_tokens is not None and summary.mean_output_tokens < asked - 0.5:
        why = []
        if short.get("stop"):
            why.append(f"the model ended {short['stop']} with its end-of-sequence token or a stop string (the "
                       "protocol cannot ignore them)")
        if short.get("length"):
            why.append(f"{short['length']} filled the server's context (prompt + max_tokens past it)")
        notes.append(f"{name}: {summary.mean_output_tokens:.1f} output tokens per request on average, fewer than the "
                     f"{asked:.0f} asked for: " + "; ".join(why or ["requests were cancelled"]))
    return notes


def _run_hf(config: BenchConfig, model_dir: Path, sent: list[tuple[int, RequestSpec]]) -> tuple[str, Summary, dict]:
    spec = BaselineSpec(model_dir, config.device, config.dtype, config.temperature, config.threads, config.precision)
    try:
        hf = HFBaseline(spec, sent[0][1].prompt, min(config.concurrency, len(sent)))
        update, close = _progress(len(sent), "transformers", config.progress)
        try:
            run = hf.run(sent, config.concurrency, update)
        finally:
            close()
    except Exception as exc:  # device out of memory, unloadable weights (SafetensorError is no OSError), ...
        raise BenchError(f"the transformers baseline failed: {type(exc).__name__}: {exc}") from None
    summary = summarize(run.results, run.duration_s)
    precision = "" if config.precision == "native" else f", {config.precision} layers"
    label = f"transformers generate ({config.device}, {config.dtype}{precision})"
    return label, summary, {"name": "hf", "label": label, "device": config.device, "dtype": config.dtype,
                            "precision": config.precision,
                            "batch": config.concurrency, "threads": config.threads, "summary": asdict(summary)}


def baseline_work(completed: list[tuple[RequestResult, RequestSpec]]) -> list[tuple[int, RequestSpec]]:
    """What the baseline generates: the work hetserve did. The requests it completed (failed ones
    would give the baseline work hetserve never did), each up to the tokens hetserve produced:
    where the server's context cut a request short, or sampling drew end-of-sequence early,
    `generate` would otherwise go on to max_tokens."""
    return [(r.index, RequestSpec(spec.prompt, min(spec.max_tokens, max(1, r.output_tokens)))) for r, spec in completed]


def run_bench(config: BenchConfig) -> BenchReport:
    if config.baseline is not None and config.baseline not in BASELINES:
        raise BenchError(f"unknown baseline {config.baseline!r}; known: {', '.join(BASELINES)}")
    # Local input first: a bad file or device is reported without waiting for a server.
    if config.baseline is not None:
        try:
            check_device(config.device)
        except ValueError as exc:
            raise BenchError(str(exc)) from None
    specs = _file_workload(config) if config.prompts_file else None
    try:
        status = asyncio.run(_server_status(config.server, config.wait_s, config.token, config.reply_timeout_s))
    except ClientError as exc:
        raise BenchError(str(exc)) from None
    needs_model = config.prompts_file is None or config.baseline is not None
    model_dir = _model_dir(config, status) if needs_model else None
    specs = specs or _synthetic_workload(config, status, model_dir)
    limit = _request_limit(config, specs)
    load = LoadSpec(config.server, config.concurrency, limit, config.duration_s, config.temperature, config.token,
                    config.reply_timeout_s)
    try:
        if config.warmup:
            asyncio.run(warm_up(config.server, specs, config.warmup, config.token, config.reply_timeout_s))
        update, close = _progress(limit, "hetserve", config.progress)
        try:
            measured: LoadResult = asyncio.run(run_load(load, specs, update))
        finally:
            close()
    except ClientError as exc:
        raise BenchError(str(exc)) from None
    ours = summarize(measured.results, measured.duration_s)
    completed = [(r, specs[r.index % len(specs)]) for r in measured.results if r.error is None]
    asked = sum(spec.max_tokens for _, spec in completed) / len(completed) if completed else None
    short = Counter(r.finish_reason for r, spec in completed if r.output_tokens < spec.max_tokens)
    sent = baseline_work(completed)
    rows, notes = [("hetserve", ours)], _notes("hetserve", ours, asked, short)
    baseline = ratio = None
    if config.baseline == "hf" and sent:
        if config.dtype is None:  # the server's compute dtype, unless told otherwise
            config = replace(config, dtype=status.get("dtype") or "float32")
        try:
            label, theirs, baseline = _run_hf(config, model_dir, sent)
        except BenchError as exc:  # hetserve's numbers still stand: reported, with the failure
            baseline = {"name": "hf", "error": str(exc)}
            notes.append(f"no baseline: {exc}")
        else:
            ratio = ratios(ours, theirs)
            rows.append((label, theirs))
            if ours.errors:
                notes.append(f"hetserve / hf: hetserve's {ours.errors} failed request(s) took time in its run and "
                             "none in the baseline's, which generates what hetserve completed: the ratios understate "
                             "hetserve")
    server = _server_info(status)
    settings = {k: v for k, v in asdict(config).items() if k != "token"}
    table = headline(settings, server, ours) + "\n" + format_table(rows, ratio, "hetserve / hf")
    return BenchReport(table, document(settings, server, ours, baseline, ratio), ours, notes)
