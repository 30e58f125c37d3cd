"""ZeroMQ sockets with the options every hetserve socket needs, and address helpers."""

from __future__ import annotations

import ipaddress
import re
import socket

import zmq
import zmq.asyncio

from ..config import MAX_MESSAGE_BYTES

LINGER_MS = 500  # on close, wait at most this long to flush, never forever (a dead peer hangs term)


def make_socket(ctx: zmq.asyncio.Context, kind: int) -> zmq.asyncio.Socket:
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    # A peer cannot make us allocate an arbitrarily large message.
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    return sock


async def receive(sock: zmq.asyncio.Socket, copy: bool = True) -> list:
    """The next multipart message on `sock`.

    pyzmq's asyncio socket can wake a waiting receive on a readiness that is gone when it reads
    (seen on CURVE sockets around a handshake, with the CPU busy) and hand the await zmq.Again.
    That is not an error: wait again. Taken as one, it killed a stage's receive loop and the
    micro-batches sent to it were never read (tests/test_security.py, 1 run in ~6 under load)."""
    while True:
        try:
            return await sock.recv_multipart(copy=copy)
        except zmq.Again:
            continue


async def send(sock: zmq.asyncio.Socket, frames: list, copy: bool = True) -> None:
    """Send a multipart message, waiting for room; a spurious zmq.Again (see `receive`) is retried:
    nothing was sent."""
    while True:
        try:
            return await sock.send_multipart(frames, copy=copy)
        except zmq.Again:
            continue


def split_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' or '[v6]:port' (or the host alone, given a default port) -> (host, port);
    raises ValueError with a readable message. A bare IPv6 address is refused: in 'fd00::5' the
    last group could be a port."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        sep, port = rest[:1], rest[1:]
        if not bracket or rest and sep != ":":
            raise ValueError(f"{text!r} is not [ADDRESS]:PORT")
    elif text.count(":") > 1:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [ADDRESS]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            host = text
    if not sep:
        if default_port is None:
            raise ValueError(f"{text!r} is not HOST:PORT")
        port = str(default_port)
    if not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """An address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tcp(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


_TCP_ENDPOINT = re.compile(r"tcp://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):([0-9]{1,5})")


def is_tcp_endpoint(addr: str) -> bool:
    """tcp://HOST:PORT as `tcp` writes it: what a peer may hand us to connect a socket to (ZeroMQ
    raises on anything else, in whichever daemon connects)."""
    match = _TCP_ENDPOINT.fullmatch(addr)
    return match is not None and 0 < int(match.group(2)) < 65536


def bind_tcp(sock: zmq.asyncio.Socket, host: str, port: int = 0) -> int:
    """Bind; port 0 picks a free one. Returns the bound port."""
    if ":" in host:
        sock.setsockopt(zmq.IPV6, 1)
    if port == 0:
        return sock.bind_to_random_port(tcp(host, 0).rsplit(":", 1)[0])
    sock.bind(tcp(host, port))
    return port


def local_ip_towards(peer: str) -> str:
    """This machine's address on the route to `peer` (no packet is sent)."""
    if peer in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1" if peer != "::1" else "::1"
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((peer, 9))
        except OSError:  # no route at all: only this machine can reach us
            return "127.0.0.1"
        return probe.getsockname()[0]
