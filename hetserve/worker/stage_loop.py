"""A host's data path: receive a micro-batch from upstream, compute it, send it downstream.

Compute runs on the host's torch thread (torch releases the GIL), so the event loop keeps answering the
control channel and ZeroMQ's I/O thread keeps receiving the next micro-batch meanwhile. On a GPU a
micro-batch is launched (its copies and kernels queued, nothing waited for) and then finished
(its output copied back, encoded and sent) apart: the next micro-batch is launched as soon as it
arrives, so the GPU runs it right behind the one before while that one is sent on. Micro-batches
are launched and sent strictly in arrival order: the KV cache depends on it. Each carries the epoch
of the pipeline it was sent into; one from an earlier epoch (still on its way when the leader rebuilt
the pipeline after a fault) is dropped, so it can never write into the rebuilt pipeline's KV cache.

A device error that leaves the device unusable to this process (a CUDA illegal address or
device-side assert poisons the context: every later kernel fails too) ends the loop with
DeviceLost rather than failing every micro-batch from then on: the host tells the leader and exits.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import zmq

from ..config import MAX_MESSAGE_BYTES
from ..model.copies import HostCopy, pack_rows, to_device, unpack_rows
from ..model.stage import StageModel
from ..stats import ema
from ..transport.sockets import receive, send
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
    sampling = step.sampling
    if not all(math.isfinite(t) and t >= 0 for t in sampling.temperature) or \
            not all(0 < p <= 1 for p in sampling.top_p) or min(sampling.top_k) < 0 or min(sampling.seed) < 0:
        raise WireError("sampling needs finite temperatures >= 0, top_p in (0, 1], top_k and seeds >= 0")
    if step.feeds:
        if model.sampled is None:
            raise WireError("only a stage that is both first and last can feed rows the token they sampled")
        if len(set(step.feeds)) != len(step.feeds) or not all(0 <= r < rows and step.lengths[r] == 1
                                                              for r in step.feeds):
            raise WireError("fed rows must be distinct rows of one token")


class DeviceLost(Exception):
    """The stage's device failed and stays failed for this process."""


# What a CUDA runtime error raises: torch.AcceleratorError from torch 2.8, a RuntimeError (its base)
# before. Any such error is followed by a probe of the device (device_works), which is cheap.
DEVICE_ERROR = RuntimeError


def device_works(device: torch.device) -> bool:
    """Does a trivial kernel still run? After a sticky CUDA error, nothing does (an out-of-memory
    or a bad launch configuration fails one call and leaves the device working)."""
    try:
        torch.ones(1, device=device).add_(1).cpu()
        return True
    except Exception:
        return False


@dataclass
class Launched:
    """A micro-batch whose work is queued: what `finish` needs to send it on."""

    step: Step
    out: HostCopy  # token ids [B] (last stage) or hidden states [sum(lengths), H], on their way to the host
    began: torch.cuda.Event | None  # GPU: recorded before its first kernel; CPU: None
    cpu_seconds: float = 0.0  # CPU: the compute time (it ran in `launch`)


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
        # Waits for a GPU's copies back to the host, off the torch thread so that it keeps launching.
        # It runs no torch compute (a second OpenMP team would slow a CPU host: host.py).
        self._waiter = ThreadPoolExecutor(1, thread_name_prefix="gpu-wait") if model.device.type == "cuda" else None

    async def run(self) -> None:
        queue: asyncio.Queue = asyncio.Queue()  # launched micro-batches (or frames to pass on), in order
        loops = [asyncio.create_task(self._receive_loop(queue)), asyncio.create_task(self._send_loop(queue))]
        try:
            await asyncio.gather(*loops)  # neither returns: the first to fail (a broken socket) ends both
        finally:
            for task in loops:
                task.cancel()
            if self._waiter is not None:
                self._waiter.shutdown(wait=False)

    async def _receive_loop(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            frames = await receive(self.data_in, copy=False)
            try:
                header = decode(frames[0].bytes, expect=(Step, StepFailed))
            except WireError as exc:
                log.warning("dropped a malformed micro-batch header: %s", exc)
                continue
            if header.epoch != self.epoch:
                log.debug("dropped micro-batch %d of epoch %d (now %d)", header.mb, header.epoch, self.epoch)
                continue
            if isinstance(header, StepFailed):
                queue.put_nowait([encode(header)])
                continue
            try:
                queue.put_nowait(await loop.run_in_executor(self._executor, self.launch, header, frames[1:]))
            except Exception as exc:  # a bad batch must not kill the stage; tell the leader
                queue.put_nowait(self._failed(header, exc))
                if lost := await self._lost(exc):
                    queue.put_nowait(lost)  # raised by the send loop once what came before is sent
                    return

    async def _send_loop(self, queue: asyncio.Queue) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await queue.get()
            if isinstance(item, DeviceLost):
                raise item
            if isinstance(item, Launched):
                try:
                    item = await loop.run_in_executor(self._waiter, self.finish, item) if self._waiter else \
                        self.finish(item)
                except Exception as exc:  # e.g. a device error surfacing at the copy back
                    await send(self.data_out, self._failed(item.step, exc), copy=False)
                    if lost := await self._lost(exc):
                        raise lost
                    continue
            await send(self.data_out, item, copy=False)

    async def _lost(self, exc: Exception) -> DeviceLost | None:
        """DeviceLost where `exc` was a device error the device did not survive."""
        if not isinstance(exc, DEVICE_ERROR):
            return None
        if await asyncio.get_running_loop().run_in_executor(self._executor, device_works, self.model.device):
            return None
        return DeviceLost(f"{self.model.device} fails every kernel since {type(exc).__name__}: {exc}")

    def _failed(self, step: Step, exc: Exception) -> list[bytes]:
        log.error("micro-batch %d failed on stage %d", step.mb, self.index, exc_info=exc)
        return [encode(StepFailed(step.mb, self.index, f"{type(exc).__name__}: {exc}", self.epoch))]

    def launch(self, step: Step, frames: list) -> Launched:
        """Check a micro-batch and queue its work (on the torch thread); on a CPU it runs here."""
        model = self.model
        check_step(step, model)
        if len(frames) != 1:
            raise WireError(f"expected one tensor frame, got {len(frames)}")
        rows, steps = len(step.slots), max(step.lengths)
        if model.embed is not None:
            ids = from_frame(step.tensor, frames[0], (rows, steps), ("int64",), torch.device("cpu"))
            if int(ids.min()) < 0 or int(ids.max()) >= model.embed.num_embeddings:  # on the host: no GPU sync
                raise WireError("token id out of the vocabulary")
            inputs = to_device(ids, model.device)
        else:  # hidden states of the real tokens alone [sum(lengths), H] (copies.pack_rows)
            inputs = unpack_rows(from_frame(step.tensor, frames[0], (sum(step.lengths), model.hidden_size),
                                            (model.spec.dtype,), model.device), step.lengths)
        began = None
        if model.device.type == "cuda":
            began = torch.cuda.Event(enable_timing=True)
            began.record(torch.cuda.current_stream(model.device))
        start = time.perf_counter()
        out = model.run(step.slots, step.starts, step.lengths, inputs, step.sampling, step.feeds)
        if model.norm is None:  # hidden states [B, T, H] -> the real tokens' [sum(lengths), H]
            out = pack_rows(out, step.lengths)
        return Launched(step, HostCopy(out), began, time.perf_counter() - start)

    def finish(self, launched: Launched) -> list:
        """Wait for a launched micro-batch's output -> the frames to send downstream."""
        step = launched.step
        out = launched.out.wait()
        ms = launched.began.elapsed_time(launched.out.done) if launched.began else launched.cpu_seconds * 1000
        self._record(step.phase, ms, sum(step.lengths))
        stage_ms = step.stage_ms + [round(ms, 3)]
        if self.model.norm is not None:
            return [encode(StepResult(step.mb, out.tolist(), stage_ms, step.epoch))]
        meta, frame = to_frame(out)
        if frame.nbytes > MAX_MESSAGE_BYTES:  # ZeroMQ would drop it and the peer's link with it
            raise ValueError(f"hidden states of {frame.nbytes >> 20} MiB exceed the {MAX_MESSAGE_BYTES >> 20} MiB "
                             "message limit: lower --prefill-tokens")
        header = Step(step.mb, step.phase, step.slots, step.starts, step.lengths, step.sampling, meta, stage_ms,
                      step.epoch)
        return [encode(header), frame]

    def _record(self, phase: str, ms: float, tokens: int) -> None:
        s = self.stats
        prefill_ms = ema(s.prefill_ms, ms) if phase == "prefill" else s.prefill_ms
        decode_ms = ema(s.decode_ms, ms) if phase == "decode" else s.decode_ms
        self.stats = StageStats(s.steps + 1, s.tokens + tokens, s.busy_seconds + ms / 1000, prefill_ms, decode_ms)
