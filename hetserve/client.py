"""A small asyncio client for the line protocol (used by `hetserve generate/status`, tests, bench)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time

from .config import MAX_LINE_BYTES
from .transport.sockets import split_hostport

_ids = itertools.count(1)
MAX_ID_CHARS = 256  # as the server reads ids (wire/client.py)


class ClientError(Exception):
    pass


class RequestTooLong(ClientError):
    """The request's line is past what the server reads (config.MAX_LINE_BYTES); never sent."""


class ReplyTimeout(ClientError):
    """The server sent nothing for the request within the timeout given."""


def request_line(body: dict) -> bytes:
    """One request as the line sent: JSON in UTF-8 (non-ASCII text as itself, not 6-byte escapes)."""
    return (json.dumps(body, ensure_ascii=False) + "\n").encode()


def _holds_last_reply(queue: asyncio.Queue) -> bool:
    """Whether a request's unread replies (taken out: the queue is being dropped) already end it:
    its done or error, or the connection's close."""
    while not queue.empty():
        event = queue.get_nowait()
        if event is None or event.get("event") != "token":
            return True
    return False


class LineClient:
    """One connection; requests run concurrently and are told apart by id."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader = reader
        self.writer = writer
        self._queues: dict[str | None, asyncio.Queue] = {}
        self._abandoned: set[str] = set()  # requests (and their cancels) left unread: replies dropped
        self.closed = False  # the server closed the connection
        self._reader_task = asyncio.create_task(self._read())

    @classmethod
    async def connect(cls, server: str, wait: float = 0.0, token: str | None = None,
                      reply_timeout: float | None = None) -> "LineClient":
        """Connect to HOST:PORT, retrying for up to `wait` seconds while nothing listens; with a
        token, authenticate first. reply_timeout: seconds a connection or the token's answer may
        take (None: no limit) before ReplyTimeout."""
        try:
            host, port = split_hostport(server, 5556)
        except ValueError as exc:
            raise ClientError(f"--server: {exc}") from None
        deadline = time.monotonic() + wait
        while True:
            # Not wait_for: its TimeoutError is an OSError too, like the system's own connect timeout.
            connecting = asyncio.ensure_future(asyncio.open_connection(host, port, limit=1 << 24))
            if not (await asyncio.wait({connecting}, timeout=reply_timeout))[0]:
                connecting.cancel()
                raise ReplyTimeout(f"no connection to {server} in {reply_timeout:g} s")
            try:
                reader, writer = connecting.result()
                break
            except OSError as exc:
                if time.monotonic() >= deadline:
                    raise ClientError(f"cannot reach hetserve at {server}: {exc.strerror or exc}") from None
                await asyncio.sleep(0.2)
        client = cls(reader, writer)
        if token is not None:
            try:
                reply = (await client.call({"cmd": "auth", "token": token}, reply_timeout))[-1]
            except ClientError:
                await client.close()
                raise
            if reply.get("event") != "authenticated":
                await client.close()
                raise ClientError(f"the server refused the token: {reply.get('error', {}).get('message')}")
        return client

    async def _read(self) -> None:
        """Route each reply line to its request's queue. A line cut off by the connection's end, or
        one that is not JSON or too long, ends the connection for this client: what follows could
        not be told apart."""
        try:
            while (line := await self.reader.readline()).endswith(b"\n"):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("id") in self._abandoned:
                    if event.get("event") != "token":  # its last reply
                        self._abandoned.discard(event["id"])
                    continue
                queue = self._queues.get(event.get("id")) if isinstance(event, dict) else None
                if queue is None:  # naming no request of ours: kept for whoever sent raw lines
                    queue = self._queues.setdefault(None, asyncio.Queue())
                queue.put_nowait(event)
        except (ConnectionError, ValueError, RecursionError):
            pass
        finally:
            self.closed = True
            for queue in self._queues.values():
                queue.put_nowait(None)

    async def send_raw(self, data: bytes) -> None:
        try:
            self.writer.write(data)
            await self.writer.drain()
        except ConnectionError:  # reset while sending: the same for callers as a close seen by the reader
            raise ClientError("the server closed the connection") from None

    async def request(self, body: dict, reply_timeout: float | None = None):
        """Send one request; yield its events up to and including the last (done/error/...).
        reply_timeout: seconds the server may go without an event for it (None: no limit) before
        ReplyTimeout. A line the server would refuse unread (too long) raises RequestTooLong: its
        error reply could not name the request."""
        if self.closed:
            raise ClientError("the server closed the connection")
        body = dict(body)
        body.setdefault("id", f"c{next(_ids)}")
        rid = body["id"]
        # The server answers a bad id with `"id": null`, a reply this request would never see.
        if not isinstance(rid, str) or not 1 <= len(rid) <= MAX_ID_CHARS:
            raise ClientError(f"a request id must be a string of 1-{MAX_ID_CHARS} characters, not {rid!r:.80}")
        if rid in self._queues or rid in self._abandoned:
            raise ClientError(f"request id {rid!r:.80} is already running on this connection")
        try:
            line = request_line(body)
        except UnicodeEncodeError:
            raise ClientError("the request holds text that is not valid Unicode (an unpaired surrogate such as "
                              "\\ud800)") from None
        if len(line) - 1 > MAX_LINE_BYTES:
            raise RequestTooLong(f"the request is {len(line) - 1} bytes of JSON; the server reads lines of up to "
                                 f"{MAX_LINE_BYTES}")
        queue = self._queues.setdefault(rid, asyncio.Queue())
        running = False  # sent, and its last reply not yet read
        try:
            await self.send_raw(line)  # a failed send frees the id too
            running = True
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), reply_timeout)
                except asyncio.TimeoutError:
                    raise ReplyTimeout(f"no reply from the server in {reply_timeout:g} s") from None
                if event is None:
                    running = False
                    raise ClientError("the server closed the connection")
                running = event.get("event") == "token"
                yield event
                if not running:
                    return
        finally:
            self._queues.pop(rid, None)
            if running and not self.closed and not _holds_last_reply(queue):
                self._abandon(rid)

    def _abandon(self, rid: str) -> None:
        """A request whose caller stopped reading it (a break, a ReplyTimeout): cancel it on the
        server, which would otherwise generate on and hold its KV slot, and drop its replies."""
        cancel = f"c{next(_ids)}"
        self._abandoned.update((rid, cancel))
        self.writer.write(request_line({"id": cancel, "cmd": "cancel", "target": rid}))  # not awaited: may run in a finally

    async def call(self, body: dict, reply_timeout: float | None = None) -> list[dict]:
        return [event async for event in self.request(body, reply_timeout)]

    async def status(self, reply_timeout: float | None = None) -> dict:
        """The status object; ClientError where the server answers with an error (no token, ...)."""
        reply = (await self.call({"cmd": "status"}, reply_timeout))[-1]
        if reply.get("event") == "error":
            raise ClientError(f"{reply['error']['code']}: {reply['error']['message']}")
        return reply

    async def wait_serving(self, timeout: float, reply_timeout: float | None = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            status = await self.status(reply_timeout)
            if status.get("state") == "serving":
                return status
            if time.monotonic() >= deadline:
                raise ClientError(f"the cluster is not serving after {timeout:.0f} s (state: {status.get('state')})")
            await asyncio.sleep(0.3)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except ConnectionError:
            pass
        self._reader_task.cancel()
