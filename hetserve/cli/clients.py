"""Verbs that talk to a running cluster: `generate`, `status`, `bench`."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from ..config import DEFAULT_SERVE
from ..settings_file import config_option
from .group import main
from .options import CLIENT_TOKEN_HELP, DTYPES, read_token, token_option


@main.command()
@config_option
@click.argument("prompt")
@click.option("--server", default=DEFAULT_SERVE, show_default=True, help="HOST:PORT of the leader's client port.")
@click.option("--max-tokens", default=None, type=click.IntRange(1), help="Completion length (default: the server's).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0), help="0 = greedy.")
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Nucleus sampling: keep the most likely tokens up to this probability mass.")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(0), help="0 = off.")
@click.option("--seed", default=None, type=click.IntRange(0), help="Same seed, same text.")
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--raw", is_flag=True, help="Send PROMPT as raw text instead of a chat message.")
@click.option("--wait", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to wait for the cluster to come up and serve.")
@token_option(CLIENT_TOKEN_HELP)
def generate(prompt, server, max_tokens, temperature, top_p, top_k, seed, stop, raw, wait, token_file):
    """Stream a completion of PROMPT (a chat message unless --raw)."""
    from ..client import ClientError, LineClient

    body = {"prompt": prompt} if raw else {"messages": [{"role": "user", "content": prompt}]}
    body.update({"temperature": temperature, "top_p": top_p, "top_k": top_k, "stop": list(stop)})
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if seed is not None:
        body["seed"] = seed

    async def stream() -> int:
        client = await LineClient.connect(server, wait, read_token(token_file))
        try:
            if wait:
                await client.wait_serving(max(1.0, wait))
            async for event in client.request(body):
                if event["event"] == "token":
                    click.echo(event["text"], nl=False)
                elif event["event"] == "done":
                    usage = event["usage"]
                    click.echo()
                    click.echo(f"[{event['finish_reason']}: {usage['prompt_tokens']} prompt + "
                               f"{usage['completion_tokens']} completion tokens]", err=True)
                else:
                    click.echo(f"\nerror: {event['error']['code']}: {event['error']['message']}", err=True)
                    return 1
            return 0
        finally:
            await client.close()

    try:
        sys.exit(asyncio.run(stream()))
    except ClientError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)


@main.command()
@config_option
@click.option("--server", default=DEFAULT_SERVE, show_default=True, help="HOST:PORT of the leader's client port.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status object.")
@token_option(CLIENT_TOKEN_HELP)
def status(server, as_json, token_file):
    """Show the cluster: hosts, their slices and health, queue and batches."""
    from ..client import ClientError, LineClient

    async def fetch() -> dict:
        client = await LineClient.connect(server, token=read_token(token_file))
        try:
            return await client.status()
        finally:
            await client.close()

    try:
        info = asyncio.run(fetch())
    except ClientError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    for line in status_lines(info):
        click.echo(line)


def status_lines(info: dict) -> list[str]:
    """`hetserve status` as text: the cluster, batching, a table of hosts, then what else is known
    of each host (its link, the weights it fetched, why it is unused) and the live plan."""
    lines = [f"{info['model']} ({info['layers']} layers, {info['dtype']}): {info['state']}, up {info['uptime_s']} s",
             f"requests: {info['running']} running, {info['queued']} queued, {info['free_slots']} free slots, "
             f"{info['in_flight']} micro-batches in flight; {info['generated_tokens']} tokens generated, "
             f"{info['tokens_per_s']} tokens/s now"]
    if batching := info.get("batching"):
        lines.append(f"batching ({batching['regime'] or 'idle'}): prefill chunks of {batching['prefill_tokens']} "
                     f"tokens, {batching['max_in_flight']} micro-batches in flight"
                     + (" (+1 each, decode-ahead)" if batching.get("decode_ahead") else "") + ", decode round trip "
                     f"{batching['decode_round_ms']} ms, prefill {batching['prefill_ms_per_token']} ms/token"
                     + (f" (fit {fit[0]} ms + {fit[1]} ms/token)" if (fit := batching.get("prefill_ms_fit")) else ""))
    if plan := info.get("plan"):
        lines.append(f"plan: predicted {plan['predicted_tokens_per_s']:.1f} tokens/s, perplexity "
                     f"{plan['predicted_ppl']:.3f} (base {plan['base_ppl']:.3f}, at most "
                     f"+{plan['max_ppl_increase']:.1%})")
    rows = [("STAGE", "HOST", "DEVICE", "MEM GiB", "LAYERS", "PRECISION", "STATE", "HEALTH", "LOAD", "STEPS",
             "PREFILL ms", "DECODE ms")]
    for h in info["hosts"]:
        layers = f"{h['layers'][0]}-{h['layers'][1] - 1}" if h["layers"] else "-"
        rows.append((str(h["stage"] if h["stage"] is not None else "-"), h["name"],
                     f"{h['device']} ({h['device_name']})", str(h["usable_gib"]), layers, h["precision"], h["state"],
                     f"{h['health']} ({h['last_seen_s']} s)", f"{h['load']:.0%}", str(h["steps"]),
                     str(h["prefill_ms"]), str(h["decode_ms"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
    for h in info["hosts"]:
        facts = [f"link {h['link_ms']} ms, {h['link_gbps']} Gbit/s"] if h.get("link_ms") is not None else []
        if h.get("fetched_bytes"):
            facts.append(f"{h['fetched_bytes'] / 2**20:.1f} MiB of weights fetched from the leader")
        if h.get("note"):
            facts.append(h["note"])
        if facts:
            lines.append(f"{h['name']}: " + "; ".join(facts))
    return lines


@main.command()
@config_option
@click.option("--server", default=DEFAULT_SERVE, show_default=True, help="HOST:PORT of the leader's client port.")
@click.option("-c", "--concurrency", default=1, show_default=True, type=click.IntRange(1),
              help="Clients at once, each with its own connection, sending its next request when one is done.")
@click.option("--requests", default=None, type=click.IntRange(1),
              help="Stop after this many requests (default without --duration: each --prompts line once, "
                   "else 4 per client).")
@click.option("--duration", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Stop sending after this many seconds; running requests are finished.")
@click.option("--prompt-tokens", default=128, show_default=True, type=click.IntRange(1),
              help="Tokens per synthetic prompt (English text cut to this length with the model's tokenizer).")
@click.option("--output-tokens", default=128, show_default=True, type=click.IntRange(1),
              help="max_tokens of each request (of a --prompts line without its own).")
@click.option("--prompts", "prompts_file", default=None, type=click.Path(dir_okay=False),
              help='JSONL file of {"prompt": ..., "max_tokens": ...} (max_tokens optional) instead of '
                   "synthetic prompts; sent in order, cycling.")
@click.option("--model", default=None,
              help="Model for the tokenizer and the baseline (default: the model the server reports).")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0, 100),
              help="0 = greedy; above, request i samples with seed i.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0),
              help="Short untimed requests sent first.")
@click.option("--baseline", type=click.Choice(["hf"]), default=None,
              help="Also run the same requests through transformers generate in this process (batched "
                   "by --concurrency, left-padded) and print hetserve / hf.")
@click.option("--device", default="cpu", show_default=True, help="Device of the --baseline (cpu, cuda, cuda:N).")
@click.option("--dtype", type=DTYPES, default=None, help="Dtype of the --baseline (default: the server's).")
@click.option("--baseline-precision", type=click.Choice(["native", "int8", "int4"]), default="native",
              show_default=True,
              help="Quantize the --baseline's decoder layers with quanto as a stage would (weights only; "
                   "the embedding and head stay in --dtype): compare with a cluster serving that precision.")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads of the --baseline (default: torch's).")
@click.option("--json", "json_file", default=None, type=click.Path(dir_okay=False),
              help="Also write the results here as JSON.")
@click.option("--wait", default=0.0, show_default=True, type=click.FloatRange(0),
              help="Seconds to wait for the cluster to come up and serve.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar on stderr.")
@click.option("--reply-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Seconds a request may go without a reply event before it fails as `timeout` and its client "
                   "stops: a stalled server ends the run instead of hanging it.")
@token_option(CLIENT_TOKEN_HELP)
def bench(server, concurrency, requests, duration, prompt_tokens, output_tokens, prompts_file, model, temperature,
          warmup, baseline, device, dtype, baseline_precision, threads, json_file, wait, progress, reply_timeout,
          token_file):
    """Load a cluster with concurrent clients; report tokens/s, requests/s, TTFT and TPOT."""
    from ..bench.run import BenchConfig, BenchError, run_bench

    config = BenchConfig(server, concurrency, requests, duration, prompt_tokens, output_tokens, prompts_file, model,
                         temperature, warmup, baseline, device, dtype, baseline_precision, threads, wait, progress,
                         read_token(token_file), reply_timeout)
    try:
        report = run_bench(config)
    except BenchError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    click.echo(report.table)
    for note in report.notes:
        click.echo(note, err=True)
    if json_file:
        try:
            Path(json_file).write_text(json.dumps(report.document, indent=2) + "\n")
        except OSError as exc:
            click.echo(f"error: cannot write {json_file}: {exc.strerror}", err=True)
            sys.exit(1)
        click.echo(f"wrote {json_file}", err=True)
    if report.hetserve.completed == 0:
        click.echo("error: no request completed", err=True)
        sys.exit(1)
    if (report.document["baseline"] or {}).get("error"):
        sys.exit(1)  # the run is reported above; the comparison asked for is not
