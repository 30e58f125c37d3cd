"""The leader's side of weight streaming: answer manifest and chunk requests on a ROUTER socket.

A host pulls: it asks for one chunk at a time with a few requests outstanding (credit-based flow
control, as in the ZeroMQ guide's file-transfer pattern), so the leader never queues more than
that window per host however large the model, and `--weights-rate` paces all transfers together
so a joining host cannot starve the serving pipeline's links. Chunks are read and sent by a
sender of their own, each host's in the order asked and the hosts in turn: a manifest request is
answered at once, not after the paced chunks queued before it, and a host's first chunk waits for
one of each other host's, not for all of theirs. A peer that asks without reading the answers
(not a hetserve host) finds replies past SEND_HWM dropped rather than queued. Only entries of the
manifest can be read, at offsets inside them: a request names a tensor, never a path. A source
file that cannot be read (moved, truncated, an I/O error) fails that request with the reason,
never the leader.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque

import zmq
import zmq.asyncio
from tqdm import tqdm

from ..model.resolve import ModelError
from ..transport.sockets import make_socket, receive
from ..wire.codec import WireError, decode, encode
from ..wire.messages import Chunk, FetchStart, GetChunk, GetManifest, Manifest
from .fetch import REPLY_TIMEOUT_S
from .manifest import Source, check_entries

log = logging.getLogger(__name__)

MAX_CHUNK = 8 << 20  # largest chunk a host may ask for
MAX_TRANSFERS = 256  # fetches shown (progress bar, log lines) at once; each host runs one
MAX_QUEUED = 4096  # chunk requests waiting for the sender (a host keeps 4 outstanding): past it, refused
SEND_HWM = 16  # replies queued per connection at most (a host keeps fetch.WINDOW = 4 outstanding):
#                past it the ROUTER drops them, so one peer cannot queue gigabytes of chunks here


def weights_socket(ctx: zmq.asyncio.Context) -> zmq.asyncio.Socket:
    """The ROUTER the server answers on (the limit must be set before it binds)."""
    sock = make_socket(ctx, zmq.ROUTER)
    sock.setsockopt(zmq.SNDHWM, SEND_HWM)
    return sock


class Pacer:
    """Spreads sends so that they average at most `rate` bytes per second (0 = no limit)."""

    def __init__(self, rate: float):
        self.rate = rate
        self.free_at = 0.0

    async def take(self, nbytes: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        start = max(self.free_at, now)
        self.free_at = start + nbytes / self.rate
        await asyncio.sleep(start - now)


class Transfer:
    """One host's fetch as the leader sees it: a progress bar and a log line at each end."""

    def __init__(self, host: str, msg: FetchStart):
        self.host, self.total, self.sent, self.started = host, msg.total_bytes, 0, time.monotonic()
        self.bar = tqdm(total=msg.total_bytes, desc=f"weights -> {host}", unit="B", unit_scale=True, disable=None,
                        leave=False)
        log.info("host %s is fetching %d weight entries, %.1f MiB", host, msg.entries, msg.total_bytes / 2**20)

    def sent_bytes(self, n: int) -> bool:
        """Count n bytes; True once everything announced is sent."""
        self.sent += n
        self.bar.update(n)
        if self.sent < self.total:
            return False
        seconds = time.monotonic() - self.started
        self.bar.close()
        log.info("sent host %s %.1f MiB of weights in %.1f s (%.0f MiB/s)", self.host, self.sent / 2**20, seconds,
                 self.sent / 2**20 / max(seconds, 1e-9))
        return True


class WeightServer:
    def __init__(self, sock: zmq.asyncio.Socket, manifest: Manifest, sources: dict[str, Source], rate: float):
        try:
            check_entries(manifest)
        except ModelError as exc:  # hosts with their own copy (join --model) still serve it
            log.warning("hosts without their own copy of the model cannot fetch it: %s", exc)
        self.sock = sock
        self.manifest = encode(manifest)
        self.entries = {e.name: e for e in manifest.entries}
        self.sources = sources
        self.pacer = Pacer(rate)
        self.transfers: dict[str, Transfer] = {}
        self.files: dict[os.PathLike, int] = {}  # open descriptors, read with pread from a thread
        # Chunk requests waiting, per host (route, request, when asked), served a host at a time in
        # turn: first come first served made a host that asked last wait behind every chunk the
        # others had asked for (with --weights-rate 1MiB and 5 hosts, past the hosts' timeout).
        self.waiting: dict[str, deque[tuple[bytes, GetChunk, float]]] = {}
        self.queued = 0
        self.arrived = asyncio.Event()

    async def run(self) -> None:
        sender = asyncio.create_task(self._send_chunks())
        try:
            while True:
                frames = await receive(self.sock)
                if len(frames) != 2:
                    log.warning("ignored a weights request of %d frames", len(frames))
                    continue
                route, raw = frames
                try:
                    msg = decode(raw, expect=(GetManifest, FetchStart, GetChunk))
                except WireError as exc:
                    log.warning("ignored a malformed weights request: %s", exc)
                    continue
                if isinstance(msg, GetManifest):
                    await self.sock.send_multipart([route, self.manifest])
                elif isinstance(msg, FetchStart):
                    if msg.host in self.transfers:  # it gave up on that fetch and started again
                        self.transfers[msg.host].bar.close()
                    elif len(self.transfers) >= MAX_TRANSFERS:  # names are the peer's word: bound them
                        log.warning("ignored the start of a fetch by %r: %d fetches are running", msg.host[:80],
                                    len(self.transfers))
                        continue
                    self.transfers[msg.host] = Transfer(msg.host, msg)
                elif self.queued >= MAX_QUEUED:
                    await self._refuse(route, msg, f"the leader has {MAX_QUEUED} chunk requests waiting")
                else:
                    self.enqueue(route, msg, time.monotonic())
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
            for fd in self.files.values():
                os.close(fd)

    def enqueue(self, route: bytes, msg: GetChunk, asked: float) -> None:
        self.waiting.setdefault(msg.host, deque()).append((route, msg, asked))
        self.queued += 1
        self.arrived.set()

    async def _next_request(self) -> tuple[bytes, GetChunk, float]:
        """The oldest request of the host whose turn it is; that host goes to the back."""
        while not self.waiting:
            self.arrived.clear()
            await self.arrived.wait()
        host = next(iter(self.waiting))
        queue = self.waiting.pop(host)
        item = queue.popleft()
        if queue:
            self.waiting[host] = queue
        self.queued -= 1
        return item

    async def _send_chunks(self) -> None:
        while True:
            route, msg, asked = await self._next_request()
            if time.monotonic() - asked > REPLY_TIMEOUT_S:
                # Its host gave up waiting and asks again: paced and sent, it would only delay every
                # later request (with a low --weights-rate, into the hosts' timeouts, and so on).
                log.warning("dropped a chunk request of %s that waited past the hosts' timeout", msg.host)
                continue
            try:
                await self._chunk(route, msg)
            except zmq.ZMQError as exc:  # that peer's reply is lost; the others' must not be
                log.warning("could not send %s a chunk of %s: %s", msg.host, msg.name, exc)
            except Exception as exc:  # a bug must not silently stop every transfer
                log.exception("failed a chunk request of %s", msg.host)
                await self._refuse(route, msg, f"the leader failed: {type(exc).__name__}: {exc}")

    async def _refuse(self, route: bytes, msg: GetChunk, error: str) -> None:
        log.warning("refused a weights request from %s: %s", msg.host, error)
        await self.sock.send_multipart([route, encode(Chunk(msg.name, msg.offset, 0, error)), b""])

    async def _chunk(self, route: bytes, msg: GetChunk) -> None:
        entry = self.entries.get(msg.name)
        if entry is None:
            error = f"no entry {msg.name!r} in the manifest"
        elif not (0 <= msg.offset and 0 < msg.length <= MAX_CHUNK and msg.offset + msg.length <= entry.size):
            error = f"bytes {msg.offset}+{msg.length} are outside {msg.name} ({entry.size} bytes, chunks <= {MAX_CHUNK})"
        else:
            error = ""
        data = b""
        if not error:
            try:
                data = await self._read(self.sources[msg.name], msg)
            except OSError as exc:
                error = f"the leader cannot read {msg.name}: {exc}"
        if error:
            await self._refuse(route, msg, error)
            return
        await self.pacer.take(len(data))
        await self.sock.send_multipart([route, encode(Chunk(msg.name, msg.offset, len(data))), data], copy=False)
        transfer = self.transfers.get(msg.host)
        if transfer is not None and transfer.sent_bytes(len(data)):
            del self.transfers[msg.host]

    async def _read(self, source: Source, msg: GetChunk) -> bytes:
        """The chunk's bytes; OSError where the file is gone or holds fewer than the manifest says."""
        if source.path not in self.files:
            self.files[source.path] = os.open(source.path, os.O_RDONLY)
        data = await asyncio.get_running_loop().run_in_executor(
            None, os.pread, self.files[source.path], msg.length, source.offset + msg.offset)
        if len(data) != msg.length:
            raise OSError(f"{source.path} ends early (changed since the leader started?)")
        return data
