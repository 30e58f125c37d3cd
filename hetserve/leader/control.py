"""The leader's end of its hosts' control channel (a ROUTER socket on --listen): messages sent to
a host by its routing id, and link probes timed against their replies. What hosts send on it is
dispatched by the leader (daemon.py, _control_loop), which hands ProbeReply nonces back here."""

from __future__ import annotations

import asyncio
import itertools
import time

import zmq
import zmq.asyncio

from ..wire.codec import encode
from ..wire.messages import Probe
from .link import LARGE_BYTES, LARGE_PROBES, PROBE_TIMEOUT_S, SMALL_PROBES, Link, link_from_round_trips


class ControlChannel:
    def __init__(self, socket: zmq.asyncio.Socket):
        self.socket = socket
        self.probes: dict[int, asyncio.Future] = {}  # nonce -> the ProbeReply awaited
        self.nonces = itertools.count()

    async def send(self, route: bytes, msg) -> zmq.ZMQError | None:
        """Send without waiting; the error where the host's connection is gone, returned, not
        raised: a host out of reach is for the dead-host check to bury, not the sender's failure."""
        try:
            await self.socket.send_multipart([route, encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            return exc
        return None

    def answered(self, nonce: int) -> None:
        """A ProbeReply came back."""
        waiter = self.probes.get(nonce)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def measure_link(self, route: bytes) -> Link:
        """The link to a host from empty and large probe round trips (link.py says how); raises
        asyncio.TimeoutError or zmq.ZMQError where the host does not answer."""
        small = [await self._round_trip(route, b"") for _ in range(SMALL_PROBES)]
        large = [await self._round_trip(route, bytes(LARGE_BYTES)) for _ in range(LARGE_PROBES)]
        return link_from_round_trips(small, large, LARGE_BYTES)

    async def _round_trip(self, route: bytes, payload: bytes) -> float:
        nonce = next(self.nonces)
        self.probes[nonce] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        try:
            await self.socket.send_multipart([route, encode(Probe(nonce, payload))])
            await asyncio.wait_for(self.probes[nonce], PROBE_TIMEOUT_S)
        finally:
            del self.probes[nonce]
        return time.perf_counter() - started
