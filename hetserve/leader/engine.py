"""The leader's request engine: admission, micro-batch dispatch, token handling, slot accounting.

No sockets here: `send` hands a finished `Step` (header + tensor) to the transport, and results
come back through `on_result` / `on_failure`. Decisions about what to batch are delegated to the
pure `scheduler.next_microbatch`; this class keeps the state that function reads.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import Limits
from ..stats import PhaseTimes, TokenRate, ema
from ..wire.client import done_event, error_event, token_event
from ..wire.messages import SamplingRows, Step, StepFailed, StepResult, TensorMeta
from .batching import Measured, RowFit, Sizes, choose_sizes
from .scheduler import BatchLimits, MicroBatch, RequestView, next_microbatch
from .text import TextStream

log = logging.getLogger(__name__)

Sink = Callable[[dict], None]  # receives reply events for one request


class Overloaded(Exception):
    """The admission queue is full."""


@dataclass(eq=False)
class Request:
    key: int  # engine-wide unique, increasing with arrival
    id: str  # the client's id (unique on its connection only)
    sink: Sink
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stream: bool
    text: TextStream
    slot: int | None = None
    prefill_len: int = 0  # tokens to cache before decoding: the prompt, or after a fault the whole history
    cached: int = 0  # tokens whose K/V every stage holds
    generated: list[int] = field(default_factory=list)
    in_flight: int = 0  # micro-batches in flight holding a row of it
    ahead: int = 0  # of those, decode rows: tokens sampled on the stage, not back yet (decode-ahead: up to 2)
    last_sent: int = 0  # the micro-batch that last carried a row of it (scheduler: who decodes next)
    generation: int = 0  # bumped when a stage fails one of its rows: rows sent before count for nothing
    retried: bool = False  # it re-prefilled once after a stage failed a row of it; a second failure ends it
    done: bool = False
    arrived: float = field(default_factory=time.monotonic)

    def history(self, start: int, count: int) -> list[int]:
        """Tokens [start, start + count) of prompt + generated, without joining the two lists."""
        cut = len(self.prompt_ids)
        if start >= cut:
            return self.generated[start - cut: start - cut + count]
        return self.prompt_ids[start: start + count] + self.generated[: max(0, start + count - cut)]

    @property
    def prompt_left(self) -> int:
        return max(0, max(self.prefill_len, len(self.prompt_ids)) - self.cached)


@dataclass
class InFlight:
    phase: str
    rows: list[tuple[Request, int]]  # (request, new tokens fed)
    sent: float
    decoding: list[bool]  # per row: a decode row (the request was past its prompt); may ride in a prefill micro-batch
    generations: list[int]  # per row: its request's generation when sent


class Engine:
    def __init__(self, limits: Limits, eos_ids: set[int], decode: Callable[[list[int]], str],
                 send: Callable[[Step, torch.Tensor], None], vocab_size: int):
        self.limits = limits
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.decode = decode
        self._send = send
        self.requests: dict[int, Request] = {}  # live requests by key, in arrival order
        self.free_slots = list(range(limits.max_seqs))
        self.in_flight: dict[int, InFlight] = {}
        self.num_stages = 0  # 0 until the pipeline is ready; nothing is sent before
        self.flat_tokens = 0  # every stage runs rows at their own lengths up to this many tokens (0 = pads them)
        self.gpu = False  # every stage computes on a GPU
        self.epoch = 0  # pipeline generation, bumped when a fault destroys the pipeline
        self.generated_tokens = 0
        self.token_rate = TokenRate()
        self._forget_measurements()
        self.outcomes: Counter[str] = Counter()  # finish reasons, "error", "overloaded"
        self.mixed_microbatches = 0  # sent with decode rows riding among prompt tokens
        self._next_key = 0
        self._next_mb = 0
        self._last_phase: str | None = None
        self._last_result_at = 0.0  # monotonic time the latest result came back

    # ---- requests in and out

    def new_request(self, request_id: str, sink: Sink, prompt_ids: list[int], max_tokens: int | None,
                    temperature: float, top_k: int, top_p: float, seed: int | None,
                    stop: tuple[str, ...], stream: bool) -> Request:
        # Room for max_seqs running (holding slots or about to) plus max_queued waiting.
        if len(self.requests) >= self.limits.max_seqs + self.limits.max_queued:
            self.outcomes["overloaded"] += 1
            log.warning("refused request %r: overloaded (%d running or queued)", request_id, len(self.requests))
            raise Overloaded(f"{len(self.requests)} requests are running or queued, the most this server "
                             f"takes; try again later")
        queued_tokens = sum(len(r.prompt_ids) for r in self.requests.values() if r.slot is None)
        # A prompt longer than the bound alone is taken when nothing waits: refused, it never could be.
        if queued_tokens and queued_tokens + len(prompt_ids) > self.limits.max_queued_tokens:
            self.outcomes["overloaded"] += 1
            log.warning("refused request %r: overloaded (%d prompt tokens queued)", request_id, queued_tokens)
            raise Overloaded(f"{queued_tokens} prompt tokens are queued, and this request's {len(prompt_ids)} "
                             f"would pass the server's {self.limits.max_queued_tokens}; try again later")
        self._next_key += 1
        request = Request(
            key=self._next_key, id=request_id, sink=sink, prompt_ids=prompt_ids,
            max_tokens=max_tokens or self.limits.default_max_tokens, temperature=temperature,
            top_k=top_k, top_p=top_p, seed=random.getrandbits(63) if seed is None else seed,
            stream=stream, text=TextStream(self.decode, stop),
        )
        self.requests[request.key] = request
        self.schedule()
        return request

    def cancel(self, key: int) -> bool:
        request = self.requests.get(key)
        if request is None:
            return False
        # Text held back (a possible stop-string start) is dropped: the reply's text is exactly
        # what was streamed.
        self._finish(request, "cancelled")
        return True

    def fail_all(self, message: str) -> None:
        for request in list(self.requests.values()):
            self._fail(request, message)

    # ---- the pipeline

    def _forget_measurements(self) -> None:
        """What the runtime sizing learns of a pipeline: a new pipeline (other hosts, other slices)
        starts afresh, rather than sized, and shown in status, by the stages of one that is gone."""
        self.times = {"prefill": PhaseTimes(), "decode": PhaseTimes()}
        self.batch_rows = {"prefill": 0.0, "decode": 0.0}  # moving average of rows per micro-batch
        self.decode_round_ms = 0.0  # moving average: a decode micro-batch's send -> result
        self.prefill_ms_per_token = 0.0  # moving average: the slowest stage's prefill ms per token
        self.decode_fit = RowFit()  # the slowest stage's decode ms against rows per micro-batch
        self.prefill_fit = RowFit()  # the slowest stage's prefill ms against tokens per micro-batch
        self.sizes: Sizes | None = None  # what batching.choose_sizes chose last

    def pipeline_ready(self, num_stages: int, flat_tokens: int = 0, gpu: bool = False) -> None:
        """flat_tokens: the least, over the stages, of Ready.flat_tokens (mixed micro-batches fit it);
        gpu: every stage computes on a GPU (decode-ahead's "auto")."""
        self._forget_measurements()
        self.num_stages = num_stages
        self.flat_tokens = flat_tokens
        self.gpu = gpu
        self.schedule()

    def replay_all(self) -> int:
        """The pipeline is gone (a host died, or the layout changes): stop sending, forget the
        micro-batches in flight, and make every live request re-prefill its whole history
        (prompt + tokens generated so far) into the next pipeline. Sampling is seeded by
        (seed, token index), so each continues where it stopped (model/sampling.py says when
        a token can still differ); its client sees a stall. Returns the next epoch, for the
        new pipeline."""
        self.num_stages = 0
        self.in_flight.clear()
        self.epoch += 1
        for request in self.requests.values():
            request.in_flight = request.ahead = 0
            request.cached = 0
            request.prefill_len = len(request.prompt_ids) + len(request.generated)
            request.retried = False  # a new pipeline: a stage's failure there may be retried again
        return self.epoch

    def schedule(self) -> None:
        if not self.num_stages:
            return
        decoding = sum(1 for r in self.requests.values() if r.slot is not None and r.prompt_left == 0)
        measured = Measured(tuple(self.times["decode"].stage_ms), self.decode_round_ms, self.prefill_ms_per_token,
                            self.decode_fit, self.prefill_fit)
        self.sizes = choose_sizes(self.limits, self.num_stages, measured, decoding, self.mix_tokens > 0)
        batch_limits = BatchLimits(self.limits.prefill_seqs, self.sizes.prefill_tokens, self.limits.decode_seqs,
                                   self.sizes.max_in_flight, self.decode_ahead, self.mix_tokens)
        while True:
            views = [RequestView(r.key, r.slot is not None, r.prompt_left, r.in_flight > 0, self._can_follow(r),
                                 r.last_sent) for r in self.requests.values()]
            batch = next_microbatch(views, len(self.free_slots), len(self.in_flight), batch_limits, self._last_phase)
            if batch is None:
                return
            self._dispatch(batch)

    @property
    def decode_ahead(self) -> bool:
        """Decode rows may follow one in flight: the one stage is first and last, so it holds the
        token it sampled and feeds it to the next row itself (config.Limits.decode_ahead)."""
        mode = self.limits.decode_ahead
        return self.num_stages == 1 and (mode == "on" or (mode == "auto" and self.gpu))

    @property
    def mix_tokens(self) -> int:
        """Most tokens of a micro-batch of decode rows and prompt tokens together; 0 = they go apart
        (a stage pads rows to the longest, or config.Limits.mixed_batches is off)."""
        return self.flat_tokens if self.limits.mixed_batches else 0

    def _can_follow(self, r: Request) -> bool:
        """Its one row in flight is a decode row, after whose token it is still decoding."""
        return (self.decode_ahead and r.in_flight == 1 and r.ahead == 1 and len(r.generated) + 1 < r.max_tokens
                and len(r.prompt_ids) + len(r.generated) + 1 < self.limits.max_context)

    def _dispatch(self, batch: MicroBatch) -> None:
        for key in batch.admit:
            self.requests[key].slot = self.free_slots.pop(0)
        rows = [(self.requests[row.key], row.tokens) for row in batch.rows]
        steps = max(tokens for _, tokens in rows)
        decoding = [request.prompt_left == 0 for request, _ in rows]
        self.mixed_microbatches += batch.phase == "prefill" and any(decoding)
        padded, starts, feeds = [], [], []
        for i, (request, tokens) in enumerate(rows):
            start = request.cached + request.ahead  # past the decode row in flight, if any
            if request.ahead:  # its input is the token that row samples: the stage feeds it
                feeds.append(i)
                padded.append([0] * steps)
            else:
                padded.append(request.history(start, tokens) + [0] * (steps - tokens))
            starts.append(start)
        ids = torch.tensor(padded, dtype=torch.int64)  # [B, T], right-padded
        self._next_mb += 1
        step = Step(
            mb=self._next_mb, phase=batch.phase,
            slots=[r.slot for r, _ in rows], starts=starts, lengths=[t for _, t in rows],
            sampling=SamplingRows(
                temperature=[r.temperature for r, _ in rows], top_k=[r.top_k for r, _ in rows],
                top_p=[r.top_p for r, _ in rows], seed=[r.seed for r, _ in rows],
                step=[len(r.generated) + r.ahead for r, _ in rows],
            ),
            tensor=TensorMeta("int64", list(ids.shape)), epoch=self.epoch, feeds=feeds,
        )
        try:
            self._send(step, ids)
        except Exception as exc:  # it cannot be encoded: fail its rows, never count it in flight (a stall)
            log.exception("micro-batch %d could not be sent", step.mb)
            for request, _ in rows:
                self._fail(request, f"the micro-batch could not be sent: {type(exc).__name__}")
            return
        for (request, _), decode_row in zip(rows, decoding):
            request.in_flight += 1
            request.ahead += decode_row
            request.last_sent = step.mb
        self.in_flight[step.mb] = InFlight(batch.phase, rows, time.monotonic(), decoding,
                                           [request.generation for request, _ in rows])
        self.batch_rows[batch.phase] = ema(self.batch_rows[batch.phase], len(rows))
        self._last_phase = batch.phase

    def on_result(self, result: StepResult) -> None:
        flight = self.in_flight.get(result.mb)
        if flight is None or result.epoch != self.epoch:
            log.warning("dropping a result for unknown micro-batch %d", result.mb)
            return
        if len(result.tokens) != len(flight.rows) or not all(0 <= t < self.vocab_size for t in result.tokens):
            self.on_failure(StepFailed(result.mb, -1, "the last stage returned a malformed result", self.epoch))
            return
        del self.in_flight[result.mb]
        self._measure(flight, result)
        accepted = []
        for (request, tokens), token, decode_row, generation in zip(flight.rows, result.tokens, flight.decoding,
                                                                    flight.generations):
            request.in_flight -= 1
            if generation != request.generation:  # sent before a stage failed a row of it: it re-prefills
                continue
            request.ahead -= decode_row
            if request.done:
                continue
            request.cached += tokens
            if request.prompt_left == 0:
                accepted.append((request, token, self._take_token(request, token)))
        self.token_rate.add(self.generated_tokens, time.monotonic())
        # The next micro-batch leaves before this one's text work: the stages compute while the
        # leader detokenizes and streams (a request that turns out to hit a stop string costs
        # one wasted row, whose result is dropped).
        self.schedule()
        for request, token, finish in accepted:
            if request.done and finish is None:  # failed meanwhile (its next micro-batch could not be sent)
                continue
            self._stream_token(request, token, finish)

    def _measure(self, flight: InFlight, result: StepResult) -> None:
        if not all(math.isfinite(ms) and ms >= 0 for ms in result.stage_ms):  # a faulty host's: never averaged
            log.warning("micro-batch %d came back with stage times %s: not measured", result.mb, result.stage_ms)
            return
        self.times[flight.phase].add(result.stage_ms)
        now, last = time.monotonic(), self._last_result_at
        self._last_result_at = now
        if flight.phase == "decode":
            # With decode-ahead a micro-batch may wait behind the one before on the one stage, which
            # runs them in send order: its round trip starts when that one's result came back.
            began = max(flight.sent, last) if self.decode_ahead else flight.sent
            self.decode_round_ms = ema(self.decode_round_ms, (now - began) * 1000)
            if result.stage_ms:
                self.decode_fit = self.decode_fit.add(len(flight.rows), max(result.stage_ms))
        elif result.stage_ms:
            tokens = sum(t for _, t in flight.rows)
            self.prefill_ms_per_token = ema(self.prefill_ms_per_token, max(result.stage_ms) / tokens)
            self.prefill_fit = self.prefill_fit.add(tokens, max(result.stage_ms))

    def on_failure(self, failure: StepFailed) -> None:
        if failure.epoch != self.epoch:
            return
        flight = self.in_flight.pop(failure.mb, None)
        if flight is None:
            return
        where = f"stage {failure.stage}" if failure.stage >= 0 else "the pipeline"
        log.error("%s failed micro-batch %d: %s", where, failure.mb, failure.error)
        for (request, _), decode_row, generation in zip(flight.rows, flight.decoding, flight.generations):
            request.in_flight -= 1
            if generation != request.generation:
                continue
            request.ahead -= decode_row
            if request.done:
                continue
            # A stage's error (a device lost, an out-of-memory on a large prompt chunk beside the
            # decode rows of others): each row's request re-prefills its history once, as after a
            # fault. One the pipeline lost or garbled (stage -1) or that failed before ends.
            if failure.stage >= 0 and not request.retried:
                self._restart(request)
            else:
                self._fail(request, f"{where} failed: {failure.error}")
        self.schedule()

    def _restart(self, request: Request) -> None:
        """Re-prefill the request's whole history into its slot, once its rows in flight are back
        (the scheduler prefills no request with rows in flight; results of those are skipped)."""
        request.retried = True
        request.generation += 1
        request.ahead = request.cached = 0
        request.prefill_len = len(request.prompt_ids) + len(request.generated)

    def expire(self, older_than: float) -> None:
        """Fail micro-batches sent before `older_than` (monotonic): a lost one must not hang its requests."""
        for mb, flight in list(self.in_flight.items()):
            if flight.sent < older_than:
                self.on_failure(StepFailed(mb, -1, "the micro-batch did not come back in time", self.epoch))

    def _take_token(self, request: Request, token: int) -> str | None:
        """Record a generated token; -> the finish reason its count or EOS gives, if any (the
        request's slot is then free for the next micro-batch)."""
        request.generated.append(token)
        self.generated_tokens += 1
        finish = None
        if token in self.eos_ids:
            finish = "stop"
        elif (len(request.generated) >= request.max_tokens
              or len(request.prompt_ids) + len(request.generated) >= self.limits.max_context):
            finish = "length"
        if finish:
            self._release(request)
        return finish

    def _stream_token(self, request: Request, token: int, finish: str | None) -> None:
        """Detokenize a taken token, stream it, and end the request on a stop string or `finish`."""
        piece = "" if token in self.eos_ids else request.text.push(token)
        if request.text.stopped:
            finish = "stop"
        elif finish:
            piece += request.text.finish()
            finish = "stop" if request.text.stopped else finish
        if request.stream:
            request.sink(token_event(request.id, piece, token))
        if finish:
            self._finish(request, finish)

    def _finish(self, request: Request, reason: str) -> None:
        self.outcomes[reason] += 1
        self._release(request)
        request.sink(done_event(request.id, request.text.emitted, reason,
                                len(request.prompt_ids), len(request.generated)))

    def _fail(self, request: Request, message: str) -> None:
        self.outcomes["error"] += 1
        self._release(request)
        request.sink(error_event(request.id, "internal", message))

    def _release(self, request: Request) -> None:
        # The slot is reusable at once even if the request is still in flight: micro-batches
        # reach every stage in send order, and a new owner only reads positions it wrote.
        request.done = True
        if request.slot is not None:
            self.free_slots.append(request.slot)
            request.slot = None
        self.requests.pop(request.key, None)

    def snapshot(self) -> dict:
        running = [r for r in self.requests.values() if r.slot is not None]
        return {
            "queued": len(self.requests) - len(running),
            "running": len(running),
            "free_slots": len(self.free_slots),
            "in_flight": len(self.in_flight),
            "generated_tokens": self.generated_tokens,
            "tokens_per_s": round(self.token_rate.rate(time.monotonic()), 2),
            "kv_tokens_used": sum(r.cached for r in running),
            "batch_rows": {phase: round(rows, 2) for phase, rows in self.batch_rows.items()},
            "outcomes": dict(self.outcomes),
            "stage_ms": {phase: [round(ms, 2) for ms in t.stage_ms] for phase, t in self.times.items()},
            "batching": self._batching(),
        }

    def _batching(self) -> dict:
        """The sizes in use and what they were chosen from (batching.py)."""
        sizes = self.sizes
        return {"regime": sizes.regime if sizes else None,
                "prefill_tokens": sizes.prefill_tokens if sizes else self.limits.prefill_tokens,
                "max_in_flight": sizes.max_in_flight if sizes else self.limits.max_in_flight,
                "decode_seqs": self.limits.decode_seqs,
                "decode_ahead": self.decode_ahead,
                "mix_tokens": self.mix_tokens,
                "mixed_microbatches": self.mixed_microbatches,
                "decode_round_ms": round(self.decode_round_ms, 2),
                "decode_ms_fit": [round(v, 4) for v in line] if (line := self.decode_fit.line()) else None,
                "prefill_ms_fit": [round(v, 4) for v in line] if (line := self.prefill_fit.line()) else None,
                "prefill_ms_per_token": round(self.prefill_ms_per_token, 4)}
