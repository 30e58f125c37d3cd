"""Per-request timings and what they add up to: throughput and latency percentiles. Pure."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestResult:
    """One request as the client saw it. Times are seconds from the start of the load."""

    index: int  # position in the workload
    sent_at: float
    first_token_at: float | None  # None: no token arrived
    last_token_at: float | None
    finished_at: float  # the final event (done or error) arrived
    output_tokens: int  # token events received (the end-of-sequence token included)
    prompt_tokens: int | None  # as the server counted them (usage); None: no `done`
    finish_reason: str | None  # stop | length | cancelled; None on error
    error: str | None = None  # "code: message" of an error event or a lost connection

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.sent_at

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first; needs at least two tokens."""
        if self.output_tokens < 2 or self.first_token_at is None or self.last_token_at is None:
            return None
        return (self.last_token_at - self.first_token_at) / (self.output_tokens - 1)


@dataclass(frozen=True)
class Summary:
    requests: int  # issued and measured (warm-up excluded)
    completed: int
    errors: int
    error_codes: dict[str, int]  # error code -> count
    duration_s: float  # first request sent -> last request finished
    output_tokens: int  # of completed requests
    mean_prompt_tokens: float | None
    mean_output_tokens: float | None
    output_tokens_per_s: float
    requests_per_s: float
    ttft_ms_p50: float | None
    ttft_ms_p99: float | None
    tpot_ms_p50: float | None
    tpot_ms_p99: float | None
    latency_ms_p50: float | None  # sent -> finished
    latency_ms_p99: float | None
    finish_reasons: dict[str, int] = field(default_factory=dict)
    error_messages: dict[str, str] = field(default_factory=dict)  # error code -> its first message


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default); None if empty."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is not in [0, 100]")
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _ms(value: float | None) -> float | None:
    return None if value is None else value * 1000


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(results: list[RequestResult], duration_s: float) -> Summary:
    """Throughput over `duration_s` and latency percentiles over the completed requests.

    Failed requests count only as errors: their partial output would flatter tokens/s and their
    truncated timings would skew the latencies.
    """
    done = [r for r in results if r.error is None]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tpots = [r.tpot for r in done if r.tpot is not None]
    latencies = [r.finished_at - r.sent_at for r in done]
    output = sum(r.output_tokens for r in done)
    errors = [r.error for r in results if r.error is not None]
    return Summary(
        requests=len(results), completed=len(done), errors=len(errors),
        error_codes=dict(Counter(e.partition(":")[0] for e in errors)),
        duration_s=duration_s, output_tokens=output,
        mean_prompt_tokens=_mean([r.prompt_tokens for r in done if r.prompt_tokens is not None]),
        mean_output_tokens=_mean([r.output_tokens for r in done]),
        output_tokens_per_s=output / duration_s if duration_s > 0 else 0.0,
        requests_per_s=len(done) / duration_s if duration_s > 0 else 0.0,
        ttft_ms_p50=_ms(percentile(ttfts, 50)), ttft_ms_p99=_ms(percentile(ttfts, 99)),
        tpot_ms_p50=_ms(percentile(tpots, 50)), tpot_ms_p99=_ms(percentile(tpots, 99)),
        latency_ms_p50=_ms(percentile(latencies, 50)), latency_ms_p99=_ms(percentile(latencies, 99)),
        finish_reasons=dict(Counter(r.finish_reason for r in done if r.finish_reason is not None)),
        error_messages=_first_messages(errors),
    )


def _first_messages(errors: list[str]) -> dict[str, str]:
    """"code: message" strings -> the first message of each code."""
    first: dict[str, str] = {}
    for error in errors:
        code, _, message = error.partition(":")
        first.setdefault(code, message.strip())
    return first


RATIO_FIELDS = ("output_tokens_per_s", "requests_per_s", "ttft_ms_p50", "ttft_ms_p99", "tpot_ms_p50", "tpot_ms_p99")


def ratios(ours: Summary, theirs: Summary) -> dict[str, float | None]:
    """ours / theirs for each compared metric: above 1 is better for rates, worse for latencies."""
    out = {}
    for name in RATIO_FIELDS:
        a, b = getattr(ours, name), getattr(theirs, name)
        out[name] = a / b if a is not None and b else None
    return out
