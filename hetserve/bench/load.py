"""N concurrent clients sending a workload over the line protocol and timing every token.

Each client has its own connection and sends its next request when the previous one is done
(a closed loop), so at most N requests are in the server at once. Requests are handed out in
workload order, cycling, until the request count is reached or the duration has passed; requests
running at the deadline are finished, not cut, so every measured request is whole. A request the
server leaves without an event for `reply_timeout_s` fails as `timeout` and its client stops (its
connection may hold the request still), so a stalled server ends the run instead of hanging it.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from ..client import ClientError, LineClient, ReplyTimeout, RequestTooLong
from .stats import RequestResult
from .workload import RequestSpec, request_body

WARMUP_TOKENS = 4  # output tokens of a warm-up request: enough to run prefill and decode once


@dataclass(frozen=True)
class LoadSpec:
    server: str
    concurrency: int
    requests: int | None  # stop after this many; None = until the duration has passed
    duration_s: float | None  # stop sending after this long; None = until the request count
    temperature: float = 0.0  # 0 = greedy
    token: str | None = None  # the server's client token (--token-file), never reported
    reply_timeout_s: float | None = None  # a request failing as `timeout` after this long without an event


@dataclass(frozen=True)
class LoadResult:
    results: list[RequestResult]
    duration_s: float  # first request sent -> last one finished


class _Dispenser:
    """Hands out (index, spec) in workload order until the count or the deadline is reached."""

    def __init__(self, specs: list[RequestSpec], limit: int | None, deadline: float | None):
        self.specs, self.limit, self.deadline, self.issued = specs, limit, deadline, 0

    def next(self) -> tuple[int, RequestSpec] | None:
        if self.limit is not None and self.issued >= self.limit:
            return None
        if self.deadline is not None and time.perf_counter() >= self.deadline:
            return None
        index = self.issued
        self.issued += 1
        return index, self.specs[index % len(self.specs)]


async def timed_request(client: LineClient, index: int, body: dict, origin: float,
                        reply_timeout: float | None = None) -> RequestResult:
    """Send one request; the times of its first and last token events, and how it ended."""
    sent = time.perf_counter() - origin
    first = last = None
    tokens, prompt_tokens, finish, error = 0, None, None, None
    try:
        async for event in client.request(body, reply_timeout):
            kind = event.get("event")
            if kind == "token":
                last = time.perf_counter() - origin
                first = last if first is None else first
                tokens += 1
            elif kind == "done":
                prompt_tokens, finish = event["usage"]["prompt_tokens"], event["finish_reason"]
            elif kind == "error":
                error = f"{event['error']['code']}: {event['error']['message']}"
    except RequestTooLong as exc:
        error = f"too_long: {exc}"
    except ReplyTimeout as exc:
        error = f"timeout: {exc}"
    except ClientError as exc:
        error = f"connection: {exc}"
    return RequestResult(index, sent, first, last, time.perf_counter() - origin, tokens, prompt_tokens, finish, error)


async def _client_loop(load: LoadSpec, dispenser: _Dispenser, origin: float,
                       on_result: Callable[[RequestResult], None]) -> None:
    client = await LineClient.connect(load.server, token=load.token, reply_timeout=load.reply_timeout_s)
    temperature = load.temperature
    try:
        while (item := dispenser.next()) is not None:
            index, spec = item
            result = await timed_request(client, index, request_body(index, spec, temperature), origin,
                                         load.reply_timeout_s)
            on_result(result)
            if result.error and result.error.startswith(("connection:", "timeout:")):
                return  # this connection is gone or stuck; the others report for themselves
    finally:
        await client.close()


async def warm_up(server: str, specs: list[RequestSpec], count: int, token: str | None = None,
                  reply_timeout: float | None = None) -> None:
    """Untimed short requests: the first steps of a fresh cluster pay one-off costs."""
    client = await LineClient.connect(server, token=token, reply_timeout=reply_timeout)
    try:
        for i in range(count):
            spec = specs[i % len(specs)]
            await client.call(request_body(i, RequestSpec(spec.prompt, min(spec.max_tokens, WARMUP_TOKENS)), 0.0),
                              reply_timeout)
    finally:
        await client.close()


async def run_load(load: LoadSpec, specs: list[RequestSpec],
                   on_result: Callable[[RequestResult], None] = lambda r: None) -> LoadResult:
    results: list[RequestResult] = []

    def collect(result: RequestResult) -> None:
        results.append(result)
        on_result(result)

    origin = time.perf_counter()
    deadline = origin + load.duration_s if load.duration_s is not None else None
    dispenser = _Dispenser(specs, load.requests, deadline)
    await asyncio.gather(*(_client_loop(load, dispenser, origin, collect)
                           for _ in range(load.concurrency)))
    # Connections opened in parallel above may trail the clock start slightly; count from the
    # first request sent, so set-up never dilutes throughput.
    start = min((r.sent_at for r in results), default=0.0)
    end = max((r.finished_at for r in results), default=0.0)
    results.sort(key=lambda r: r.index)
    return LoadResult(results, end - start)
