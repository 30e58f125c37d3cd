"""The client port: the line protocol over TCP (see README.md, "Line protocol").

Each connection reads lines, validates them (`wire.client.parse_line`), and hands valid requests
to the engine; replies go out through a per-connection queue so a slow reader never stalls the
engine. Bad input gets one error line and the connection carries on. When a client disconnects,
its running requests are cancelled and their KV slots freed.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import TYPE_CHECKING

from ..config import MAX_AUTH_FAILURES, MAX_LINE_BYTES, MAX_REQUESTS_PER_CONNECTION, MAX_UNSENT_REPLY_BYTES
from ..wire.client import (AuthCommand, CancelCommand, GenerateRequest, ProtocolError, StatusCommand, encode_event,
                           error_event, parse_line)
from .engine import Request

if TYPE_CHECKING:
    from .daemon import Leader

log = logging.getLogger(__name__)

READ_CHUNK = 1 << 16
WRITE_GRACE_S = 2.0  # on disconnect or shutdown, how long queued replies may take to flush


class LineTooLong(Exception):
    pass


def token_matches(given: str, expected: str) -> bool:
    """Constant-time comparison: the time taken says nothing about how much of a guess was right.
    (HTTP headers arrive with undecodable bytes as surrogates: kept as those bytes, a mismatch.)"""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode())


async def read_lines(reader: asyncio.StreamReader, limit: int):
    """Yield complete lines (without `\\n`); a line over `limit` bytes yields LineTooLong once
    and is skipped up to its newline, so the connection stays usable."""
    buffer = bytearray()
    discarding = False
    while True:
        chunk = await reader.read(READ_CHUNK)
        if not chunk:
            return
        buffer += chunk
        while True:
            newline = buffer.find(b"\n")
            if newline < 0:
                if len(buffer) > limit:
                    if not discarding:
                        discarding = True
                        yield LineTooLong()
                    buffer.clear()
                break
            line = bytes(buffer[:newline])
            del buffer[: newline + 1]
            if discarding:
                discarding = False
            elif len(line) > limit:
                yield LineTooLong()
            elif line.strip():
                yield line


class Connection:
    def __init__(self, leader: "Leader", reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.leader = leader
        self.reader = reader
        self.writer = writer
        self.outbox: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.active: dict[str, Request] = {}  # client id -> running request
        self.peer = writer.get_extra_info("peername")
        self.authenticated = leader.settings.token is None
        self.auth_failures = 0
        self.unsent = 0  # bytes in the outbox
        self.not_reading = False  # the client let MAX_UNSENT_REPLY_BYTES pile up: the connection is closing
        self.answered = asyncio.Event()  # set when a request leaves self.active, or the connection is closing

    def send(self, event: dict) -> None:
        if event.get("event") in ("done", "error") and event.get("id") in self.active:
            request = self.active[event["id"]]
            if request.done:
                del self.active[event["id"]]
                self.answered.set()
        if self.not_reading:
            return
        data = encode_event(event)
        self.unsent += len(data)
        if self.unsent > MAX_UNSENT_REPLY_BYTES:
            log.warning("client %s reads none of its replies (%d bytes queued); closing it", self.peer, self.unsent)
            self.not_reading = True
            self.answered.set()
            self.writer.transport.abort()  # the read loop ends; serve() cancels its requests
            return
        self.outbox.put_nowait(data)

    async def serve(self) -> None:
        writer_task = asyncio.create_task(self._write())
        try:
            async for line in read_lines(self.reader, MAX_LINE_BYTES):
                if isinstance(line, LineTooLong):
                    self.send(error_event(None, "too_long", f"line longer than {MAX_LINE_BYTES} bytes"))
                    continue
                await self._handle(line)
                if self.auth_failures >= MAX_AUTH_FAILURES:
                    log.warning("client %s closed after %d wrong tokens", self.peer, self.auth_failures)
                    break
            else:
                await self._answer_after_eof(writer_task)
        except OSError:  # a reset, or keepalive's ETIMEDOUT / EHOSTUNREACH
            pass
        finally:
            running = list(self.active.values())  # each cancel's `done` takes its request out of self.active
            for request in running:
                self.leader.engine.cancel(request.key)
            if running:
                log.info("client %s disconnected; cancelled %d requests", self.peer, len(running))
            self.active.clear()
            self.outbox.put_nowait(None)
            try:  # let queued replies go out, but never wait on a client that stopped reading
                await asyncio.wait_for(asyncio.shield(writer_task), WRITE_GRACE_S)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                writer_task.cancel()
                self.writer.transport.abort()

    async def _answer_after_eof(self, writer_task: asyncio.Task) -> None:
        """The client's end of input (`printf ... | nc -N`, shutdown(SHUT_WR)) is no disconnect: its
        running requests are answered. A client that closed its socket shows as a failed write,
        which ends the writer; serve() then cancels what is left."""
        while self.active and not writer_task.done() and not self.not_reading:
            self.answered.clear()
            answered = asyncio.ensure_future(self.answered.wait())
            try:
                await asyncio.wait([writer_task, answered], return_when=asyncio.FIRST_COMPLETED)
            finally:
                answered.cancel()

    async def _handle(self, line: bytes) -> None:
        command = None
        try:
            command = parse_line(line)
            if isinstance(command, AuthCommand):
                self._auth(command)
            elif not self.authenticated:
                raise ProtocolError("unauthorized", 'this server needs a token first: {"id": ..., "cmd": "auth", '
                                    '"token": ...}', command.id)
            elif isinstance(command, StatusCommand):
                self.send({"id": command.id, "event": "status", **self.leader.status()})
            elif isinstance(command, CancelCommand):
                self._cancel(command)
            else:
                await self._generate(command)
        except ProtocolError as exc:
            self.send(exc.event())
        except Exception:  # never a traceback to the client, never a dead connection
            log.exception("internal error handling a client line")
            self.send(error_event(getattr(command, "id", None), "internal", "internal error; see the leader's log"))

    def _auth(self, command: AuthCommand) -> None:
        expected = self.leader.settings.token
        if expected is not None and not token_matches(command.token, expected):
            self.auth_failures += 1
            raise ProtocolError("unauthorized", "wrong token", command.id)
        self.authenticated = True
        self.send({"id": command.id, "event": "authenticated"})

    def _cancel(self, command: CancelCommand) -> None:
        request = self.active.get(command.target)
        if request is None:
            raise ProtocolError("bad_request", f"no running request {command.target!r} on this connection", command.id)
        self.leader.engine.cancel(request.key)
        self.send({"id": command.id, "event": "cancelled", "target": command.target})

    async def _generate(self, req: GenerateRequest) -> None:
        if req.id in self.active:
            raise ProtocolError("bad_request", f"id {req.id!r} is already running on this connection", req.id)
        if len(self.active) >= MAX_REQUESTS_PER_CONNECTION:
            raise ProtocolError("overloaded", f"{MAX_REQUESTS_PER_CONNECTION} requests already run on this "
                                "connection; open another or wait", req.id)
        request = await self.leader.admit(req, self.send, req.stream)
        if not request.done:
            self.active[req.id] = request

    async def _write(self) -> None:
        while (data := await self.outbox.get()) is not None:
            self.unsent -= len(data)
            try:
                self.writer.write(data)
                await self.writer.drain()
            except OSError:  # ConnectionError and the rest of a dead link
                break
        self.writer.close()
