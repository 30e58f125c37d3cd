"""CURVE encryption and authentication for every ZeroMQ socket between hosts.

Keys are ZeroMQ certificate files (`hetserve keygen`, made with `zmq.auth.create_certificates`):
NAME.key holds a public key, NAME.key_secret the key pair. A `--keys DIR` holds this machine's
`*.key_secret`; a leader also reads its hosts' public keys from DIR/hosts/*.key (the allow-list),
a host the leader's public key from DIR/leader.key.

Every socket that binds is a CURVE server; a ZAP handler (pyzmq's authenticator) admits only
client keys on its `KeyRing`: on the leader, the allow-list; on a host's data socket, only the
key of its upstream stage, which the leader names in each Assign. Every socket that connects is
a CURVE client that pins the server's public key, so a host cannot be pointed at an impostor.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.asyncio
import zmq.auth
from zmq.auth.asyncio import AsyncioAuthenticator
from zmq.utils import z85

log = logging.getLogger(__name__)


class KeysError(Exception):
    """Keys missing or unreadable; the message says which file."""


@dataclass(frozen=True)
class Identity:
    public: bytes  # z85
    secret: bytes  # z85


def keygen(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (mode 0600) into directory."""
    directory.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0o077)  # the secret is never readable by others, not even between its write and a chmod
    try:
        public, secret = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(umask)
    Path(public).chmod(0o644)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def load_identity(directory: Path) -> Identity:
    secrets = sorted(Path(directory).glob("*.key_secret"))
    if len(secrets) != 1:
        raise KeysError(f"{directory} must hold exactly one *.key_secret (this machine's keys; "
                        f"`hetserve keygen {directory} --name NAME`), found {len(secrets)}")
    public, secret = read_certificate(secrets[0])
    if secret is None:
        raise KeysError(f"{secrets[0]} holds no secret key")
    return Identity(public, secret)


def load_public(path: Path) -> bytes:
    if not Path(path).is_file():
        raise KeysError(f"{path} is missing")
    return read_certificate(path)[0]


def read_certificate(path: Path) -> tuple[bytes, bytes | None]:
    """(public, secret or None) of a key file `hetserve keygen` wrote; KeysError naming the file
    where it is not one (pyzmq raises ValueError, or returns a key CURVE refuses later with
    nothing but 'Invalid argument')."""
    try:
        public, secret = zmq.auth.load_certificate(path)
        for key in (public, secret):
            if key is not None and (len(key) != 40 or len(z85.decode(key)) != 32):
                raise ValueError("a key is not 40 Z85 characters")
    except (OSError, ValueError, UnicodeDecodeError, KeyError, struct.error) as exc:
        raise KeysError(f"{path} is not a key file of `hetserve keygen`: {exc}") from None
    return public, secret


def load_allowed(directory: Path) -> set[bytes]:
    return {load_public(p) for p in sorted(Path(directory).glob("*.key"))}


class KeyRing:
    """The client keys a ZAP handler admits now; a refusal is logged with the key."""

    def __init__(self, allowed: set[bytes], what: str):
        self.allowed = set(allowed)
        self.what = what

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed:
            return True
        log.warning("refused a connection to %s from an unknown key %s", self.what, key.decode())
        return False


def start_authenticator(ctx: zmq.asyncio.Context, keyring: KeyRing) -> AsyncioAuthenticator:
    """ZAP for every CURVE server socket of ctx; start it before binding them."""
    auth = AsyncioAuthenticator(ctx, log=logging.getLogger("hetserve.zap"))
    auth.start()
    auth.configure_curve_callback("*", keyring)
    return auth


def as_server(sock: zmq.Socket, identity: Identity) -> None:
    sock.curve_secretkey = identity.secret
    sock.curve_publickey = identity.public
    sock.curve_server = True


def as_client(sock: zmq.Socket, identity: Identity, server_key: bytes) -> None:
    """Before connect(): this socket will only talk to the holder of server_key."""
    sock.curve_secretkey = identity.secret
    sock.curve_publickey = identity.public
    sock.curve_serverkey = server_key
