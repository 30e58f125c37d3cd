"""The benchmark's table and JSON document. Pure: summaries in, text and dicts out."""

from __future__ import annotations

from dataclasses import asdict

from .stats import RATIO_FIELDS, Summary

COLUMNS = (  # (header, Summary field, format)
    ("requests", "requests", "{:d}"),
    ("errors", "errors", "{:d}"),
    ("out tok/s", "output_tokens_per_s", "{:.1f}"),
    ("req/s", "requests_per_s", "{:.2f}"),
    ("TTFT p50 ms", "ttft_ms_p50", "{:.1f}"),
    ("TTFT p99 ms", "ttft_ms_p99", "{:.1f}"),
    ("TPOT p50 ms", "tpot_ms_p50", "{:.1f}"),
    ("TPOT p99 ms", "tpot_ms_p99", "{:.1f}"),
    ("out tok/req", "mean_output_tokens", "{:.1f}"),
)


def _cell(value, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def format_table(rows: list[tuple[str, Summary]], ratio: dict[str, float | None] | None = None,
                 ratio_label: str = "ratio") -> str:
    """One row per run; with `ratio`, a last row of first-run / second-run for the compared columns."""
    lines = [[""] + [header for header, _, _ in COLUMNS]]
    for name, summary in rows:
        lines.append([name] + [_cell(getattr(summary, field), fmt) for _, field, fmt in COLUMNS])
    if ratio is not None:
        lines.append([ratio_label] + [_cell(ratio.get(field), "{:.2f}x") if field in RATIO_FIELDS else ""
                                      for _, field, _ in COLUMNS])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    return "\n".join(_aligned(line, widths) for line in lines)


def _aligned(cells: list[str], widths: list[int]) -> str:
    """Names left-aligned, numbers right-aligned."""
    padded = [cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
    return "  ".join(padded).rstrip()


def headline(config: dict, server: dict, hetserve: Summary) -> str:
    """One line saying what was measured."""
    if config["prompts_file"]:
        prompts = f"prompts from {config['prompts_file']} (max_tokens {config['output_tokens']} where a line has none)"
    else:
        prompts = f"{config['prompt_tokens']}-token prompts, up to {config['output_tokens']} output tokens"
    sampling = "greedy" if config["temperature"] == 0 else f"temperature {config['temperature']}"
    return (f"{server['model']} at {config['server']} ({len(server['hosts'])} host(s), {server['dtype']}): "
            f"{config['concurrency']} client(s), {hetserve.requests} requests in {hetserve.duration_s:.1f} s, "
            f"{prompts}, {sampling}")


def document(config: dict, server: dict, hetserve: Summary, baseline: dict | None,
             ratio: dict[str, float | None] | None) -> dict:
    """The JSON report: what ran, against what, and the numbers. `baseline` already has its summary."""
    return {"config": config, "server": server, "hetserve": asdict(hetserve), "baseline": baseline, "ratio": ratio}
