"""The host's side of weight streaming: get the manifest, then pull what the cache lacks.

Chunks are requested in order with WINDOW requests outstanding (credit-based flow control) and
appended to the tensor's part file as they arrive; each finished part is hashed before it is
renamed into the cache (store.py). Everything a peer sends is checked: the manifest's hash is
recomputed, and a chunk must be the one asked for, of the length asked for.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable

import zmq
import zmq.asyncio
from tqdm import tqdm

from ..model.resolve import ModelError
from ..transport.sockets import receive
from ..wire.codec import WireError, decode, encode
from ..wire.messages import Chunk, FetchStart, GetChunk, GetManifest, Manifest
from .manifest import check_manifest
from .store import Missing, WeightStore

log = logging.getLogger(__name__)

CHUNK = 4 << 20  # bytes per request: large enough that per-request cost is negligible
WINDOW = 4  # requests outstanding: keeps the link busy across the round trip
REPLY_TIMEOUT_S = 60.0  # a leader silent this long has stopped sending
RETRIES = 2  # a tensor whose finished data fails its hash is fetched again this many times

Offload = Callable[..., Awaitable]  # runs a blocking function off the event loop


class WeightFetcher:
    def __init__(self, sock: zmq.asyncio.Socket, address: str, host: str, offload: Offload):
        """sock: a fresh DEALER (made secure by the caller when the cluster is keyed)."""
        self.sock = sock
        self.sock.connect(address)
        self.address, self.host, self.offload = address, host, offload

    def close(self) -> None:
        self.sock.close()

    async def _recv(self) -> list[bytes]:
        try:
            return await asyncio.wait_for(receive(self.sock), REPLY_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ModelError(f"the leader's weights socket {self.address} stopped answering") from None

    async def manifest(self, expected_hash: str) -> Manifest:
        await self.sock.send(encode(GetManifest(self.host)))
        frames = await self._recv()
        try:
            manifest = decode(frames[0], expect=(Manifest,))
        except WireError as exc:
            raise ModelError(f"the leader sent a malformed manifest: {exc}") from None
        check_manifest(manifest, expected_hash)
        return manifest

    async def fetch(self, store: WeightStore, items: list[Missing], announce: bool = True) -> int:
        """Fetch `items` into the store; returns the bytes received. `announce`: log it and tell
        the leader (not worth it for config.json alone)."""
        total = sum(item.entry.size - item.offset for item in items)
        if not items:
            return 0
        if announce:
            await self.sock.send(encode(FetchStart(self.host, len(items), total)))
            resumed = sum(item.offset for item in items)
            log.info("fetching %d weight entries, %.1f MiB%s", len(items), total / 2**20,
                     f" (resuming: {resumed / 2**20:.1f} MiB already here)" if resumed else "")
        started, received = time.monotonic(), 0
        with tqdm(total=total, desc="weights", unit="B", unit_scale=True, disable=None if announce else True,
                  leave=False) as bar:
            for _ in range(RETRIES + 1):
                got, failed = await self._stream(store, items, bar)
                received += got
                if not failed:
                    break
                log.warning("%d fetched entries failed their hash (e.g. %s); fetching them again", len(failed),
                            failed[0].entry.name)
                items = [Missing(item.entry, 0) for item in failed]
            else:
                raise ModelError(f"{items[0].entry.name} keeps failing its hash: the leader's copy changed or "
                                 f"the link corrupts data")
        seconds = time.monotonic() - started
        if announce:
            log.info("fetched %.1f MiB of weights in %.1f s (%.0f MiB/s)", received / 2**20, seconds,
                     received / 2**20 / max(seconds, 1e-9))
        return received

    async def _stream(self, store: WeightStore, items: list[Missing], bar: tqdm) -> tuple[int, list[Missing]]:
        """One pass: every chunk of every item, WINDOW requests outstanding across item
        boundaries; a finished item is hashed off the loop while the next ones stream.
        Returns the bytes received and the items whose data failed the hash."""
        chunks = iter([(item, offset, min(CHUNK, item.entry.size - offset))
                       for item in items for offset in range(item.offset, item.entry.size, CHUNK)])
        pending: deque[tuple[Missing, int, int]] = deque()
        files = {}
        checks: list[tuple[Missing, asyncio.Future]] = []
        received = 0

        async def ask() -> None:
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append(chunk)
                await self.sock.send(encode(GetChunk(self.host, chunk[0].entry.name, chunk[1], chunk[2])))

        def done(item: Missing) -> None:
            if item.entry.name in files:
                files.pop(item.entry.name).close()
            else:  # nothing to receive (empty, or complete before a crash): just the check
                store.open_part(item).close()
            checks.append((item, asyncio.ensure_future(self.offload(store.finish, item.entry))))

        try:
            for item in items:
                if item.offset == item.entry.size:
                    done(item)
            for _ in range(WINDOW):
                await ask()
            while pending:
                frames = await self._recv()
                item, offset, length = pending.popleft()
                name = item.entry.name
                try:
                    head = decode(frames[0], expect=(Chunk,))
                except WireError as exc:
                    raise ModelError(f"the leader sent a malformed chunk: {exc}") from None
                if head.error:
                    raise ModelError(f"the leader refused {name}: {head.error}")
                if len(frames) != 2 or (head.name, head.offset, head.length) != (name, offset, length) \
                        or len(frames[1]) != length:
                    raise ModelError(f"the leader sent the wrong chunk of {name} (wanted bytes {offset}+{length})")
                if name not in files:
                    files[name] = store.open_part(item)
                files[name].write(frames[1])
                received += length
                bar.update(length)
                if offset + length == item.entry.size:
                    done(item)
                await ask()
        finally:
            for f in files.values():
                f.close()
        results = [(item, await check) for item, check in checks]
        return received, [item for item, ok in results if not ok]
