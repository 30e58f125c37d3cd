"""A host's data path: receive a micro-batch from upstream, compute it, send it downstream.

Compute runs on the host's torch thread (torch releases the GIL), so the event loop keeps answering the
control channel and ZeroMQ's I/O thread keeps receiving the next micro-batch meanwhile. Micro-batches
are computed strictly in arrival order: the KV cache depends on it. Each carries the epoch of the
pipeline it was sent into; one from an earlier epoch (still on its way when the leader rebuilt the
pipeline after a fault) is dropped, so it can never write into the rebuilt pipeline's KV cache.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq

from ..model.stage import StageModel
from ..stats import ema
from ..wire.codec import WireError, decode, encode
from ..wire.messages import StageStats, Step, StepFailed, StepResult
from ..wire.tensors import from_frame, to_frame

log = logging.getLogger(__name__)


def check_step(step: Step, model: StageModel) -> None:
    """Reject a header that does not describe a micro-batch this stage can run."""
    spec = model.spec
    rows = len(step.slots)
    columns = (step.starts, step.lengths, step.sampling.temperature, step.sampling.top_k,
               step.sampling.top_p, step.sampling.seed, step.sampling.step)
    if not 1 <= rows <= spec.max_seqs or any(len(c) != rows for c in columns):
        raise WireError(f"a micro-batch needs 1..{spec.max_seqs} rows and equal-length columns")
    if step.phase not in ("prefill", "decode"):
        raise WireError(f"unknown phase {step.phase!r}")
    if len(set(step.slots)) != rows or not all(0 <= s < spec.max_seqs for s in step.slots):
        raise WireError("slots must be distinct and within the stage's KV slots")
    if not all(start >= 0 and length >= 1 and start + length <= spec.max_context
               for start, length in zip(step.starts, step.lengths)):
        raise WireError(f"rows must hold 1..{spec.max_context} tokens in all")
    if len(step.stage_ms) > 4096:
        raise WireError("stage_ms is too long")


class StageLoop:
    def __init__(self, model: StageModel, index: int, data_in: zmq.asyncio.Socket, data_out: zmq.asyncio.Socket,
                 torch_thread: ThreadPoolExecutor, epoch: int = 0):
        self.model = model
        self.index = index
        self.epoch = epoch
        self.data_in = data_in
        self.data_out = data_out
        self.stats = StageStats()
        self._executor = torch_thread

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frames = await self.data_in.recv_multipart(copy=False)
            try:
                header = decode(frames[0].bytes, expect=(Step, StepFailed))
            except WireError as exc:
                log.warning("dropped a malformed micro-batch header: %s", exc)
                continue
            if header.epoch != self.epoch:
                log.debug("dropped micro-batch %d of epoch %d (now %d)", header.mb, header.epoch, self.epoch)
                continue
            if isinstance(header, StepFailed):
                await self.data_out.send(encode(header))
                continue
            try:
                out = await loop.run_in_executor(self._executor, self._compute, header, frames[1:])
            except Exception as exc:  # a bad batch must not kill the stage; tell the leader
                log.exception("micro-batch %d failed on stage %d", header.mb, self.index)
                out = [encode(StepFailed(header.mb, self.index, f"{type(exc).__name__}: {exc}", self.epoch))]
            await self.data_out.send_multipart(out, copy=False)

    def _compute(self, step: Step, frames: list) -> list:
        model = self.model
        check_step(step, model)
        if len(frames) != 1:
            raise WireError(f"expected one tensor frame, got {len(frames)}")
        rows, steps = len(step.slots), max(step.lengths)
        if model.embed is not None:
            ids = from_frame(step.tensor, frames[0], (rows, steps), ("int64",), torch.device("cpu"))
            if int(ids.min()) < 0 or int(ids.max()) >= model.embed.num_embeddings:  # on the host: no GPU sync
                raise WireError("token id out of the vocabulary")
            inputs = ids.to(model.device)
        else:
            inputs = from_frame(step.tensor, frames[0], (rows, steps, model.hidden_size),
                                (model.spec.dtype,), model.device)
        start = time.perf_counter()
        out = model.run(step.slots, step.starts, step.lengths, inputs, step.sampling)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        elapsed = time.perf_counter() - start
        self._record(step.phase, elapsed, sum(step.lengths))
        stage_ms = step.stage_ms + [round(elapsed * 1000, 3)]
        if model.norm is not None:
            return [encode(StepResult(step.mb, out.tolist(), stage_ms, step.epoch))]
        meta, frame = to_frame(out)
        header = Step(step.mb, step.phase, step.slots, step.starts, step.lengths, step.sampling, meta, stage_ms,
                      step.epoch)
        return [encode(header), frame]

    def _record(self, phase: str, seconds: float, tokens: int) -> None:
        s = self.stats
        ms = seconds * 1000
        prefill_ms = ema(s.prefill_ms, ms) if phase == "prefill" else s.prefill_ms
        decode_ms = ema(s.decode_ms, ms) if phase == "decode" else s.decode_ms
        self.stats = StageStats(s.steps + 1, s.tokens + tokens, s.busy_seconds + seconds, prefill_ms, decode_ms)
