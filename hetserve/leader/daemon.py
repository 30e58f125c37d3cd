"""`hetserve leader`: accept hosts, plan the split, wire the pipeline, serve clients.

Sockets (all ZeroMQ, msgpack headers, raw tensor frames, nothing pickled):
  control  ROUTER bound on --listen; each host's DEALER sends Join/Ready/Failed/Heartbeat.
  to_stage0  PUSH connected to stage 0's data address: micro-batches enter the pipeline.
  results  PULL bound beside --listen; the last stage pushes StepResult / StepFailed here.
  weights  ROUTER bound beside --listen; hosts fetch the tensors of their slice they lack
           (hetserve/weights/: a manifest with content hashes, chunks with flow control).
The client port is a plain asyncio TCP server (frontend.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import torch
import zmq
import zmq.asyncio
from aiohttp import web

from ..config import MAX_MESSAGE_BYTES, LeaderSettings, SettingsError
from ..lifecycle import run_until_signal
from ..model.resolve import resolve_model
from ..model.shape import model_shape
from ..model.stage import DTYPES, load_config
from ..plan.planner import Plan
from ..transport.security import (Identity, KeyRing, KeysError, as_server, load_allowed, load_identity,
                                  start_authenticator)
from ..transport.sockets import bind_tcp, is_loopback, is_tcp_endpoint, make_socket, receive, send, split_hostport
from ..weights.manifest import load_manifest
from ..weights.server import WeightServer, weights_socket
from ..wire.client import GenerateRequest, ProtocolError
from ..wire.codec import WireError, decode, encode
from ..wire.messages import (PROTOCOL_VERSION, Failed, Heartbeat, Join, ProbeReply, ProfileReport,
                             ProfileRequest, Ready, Refused, Shutdown, Step, StepFailed, StepResult)
from ..wire.tensors import to_frame
from .assignment import LeaderError, PipelineLayout
from .control import ControlChannel
from .engine import Engine, Overloaded, Request, Sink
from .frontend import Connection
from .hosts import DEAD_AFTER_SECONDS, Failures, HostRecord
from .http_api import OpenAIServer
from .tokens import TextCodec

log = logging.getLogger(__name__)


class Leader(PipelineLayout):
    def __init__(self, settings: LeaderSettings):
        settings.limits.check()
        for name, address in (("--serve", settings.serve), ("--http", settings.http)):
            if address and settings.token is None and not is_loopback(split_hostport(address, 0)[0]):
                raise LeaderError(f"{name} {address} is reachable from other machines: give --token-file "
                                  "so that clients must authenticate, or bind it to 127.0.0.1")
        self.identity: Identity | None = None
        if settings.keys:
            try:
                self.identity = load_identity(Path(settings.keys))
                # Its own key too: a stage on this machine (--device) uses the leader's keys.
                self.keyring = KeyRing(load_allowed(Path(settings.keys) / "hosts") | {self.identity.public},
                                       "the leader")
            except KeysError as exc:
                raise LeaderError(str(exc)) from None
            if len(self.keyring.allowed) == 1:
                log.warning("no host keys in %s/hosts: only a stage on this machine can join", settings.keys)
        elif not is_loopback(split_hostport(settings.listen, 5555)[0]):
            if not settings.insecure:
                raise SettingsError(f"--listen {settings.listen} is reachable from other machines: give --keys DIR "
                                    "(hetserve keygen) to encrypt and authenticate hosts, or --insecure")
            log.warning("INSECURE: hosts join %s in plain text, without authentication (--insecure); anyone who "
                        "reaches it can join the cluster and read its traffic", settings.listen)
        self.settings = settings
        self.plan = Plan.load(Path(settings.plan)) if settings.plan else None
        self.hosts: dict[str, HostRecord] = {}
        self.excluded: set[str] = set()  # joined hosts left out of the plan (no room for their slice)
        self.failures: dict[str, Failures] = {}  # by host name: failures to load a slice in a row (hosts.Failures)
        self.stages: list[HostRecord] = []  # the pipeline, in order
        self.stage0_addr: str | None = None  # where to_stage0 is connected
        self.stage0_queue: asyncio.Queue[list] = asyncio.Queue()  # micro-batches for stage 0, in order
        self.served = False  # serving began once: later faults recover instead of stopping the leader
        self.lost_at: float | None = None  # when the pipeline was lost, for the recovery time
        self.assigning = False  # a layout is being made (_assign)
        self.layout_stale = False  # hosts changed meanwhile: make it again
        self.listening_since = 0.0  # when the last layout ended: the control loop reads heartbeats again
        self.state = "starting"
        self.started = time.monotonic()
        self.connections: set[asyncio.Task] = set()
        self.background: set[asyncio.Task] = set()

    async def run(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        files = await loop.run_in_executor(None, resolve_model, s.model)
        self.model_dir = files.path
        config = load_config(files.path)
        if s.limits.max_context > config.max_position_embeddings:
            raise SettingsError(f"--max-context {s.limits.max_context} exceeds the model's "
                                f"{config.max_position_embeddings} positions")
        token_bytes = config.hidden_size * DTYPES[s.dtype].itemsize  # one token's hidden state between hosts
        if (s.limits.prefill_tokens + s.limits.max_seqs) * token_bytes > MAX_MESSAGE_BYTES:  # chunk + decode rows
            raise SettingsError(f"--prefill-tokens {s.limits.prefill_tokens}: a micro-batch's hidden states could "
                                f"pass the {MAX_MESSAGE_BYTES >> 20} MiB message limit between hosts; use at most "
                                f"{MAX_MESSAGE_BYTES // token_bytes - s.limits.max_seqs}")
        self.num_layers = config.num_hidden_layers
        self.config = config
        self.manifest, sources = await loop.run_in_executor(None, load_manifest, files.path)
        log.info("model hash %s: %d tensors, %.1f MiB", self.manifest.model_hash[:16],
                 len(self.manifest.entries) - 1, sum(e.size for e in self.manifest.entries) / 2**20)
        self.shape = model_shape(files.path, s.dtype)
        self.codec = TextCodec(files.path, s.limits.max_context)
        self.engine = Engine(s.limits, self.codec.eos_ids, self.codec.decode, self._send_step, config.vocab_size)

        ctx = zmq.asyncio.Context()
        authenticator = start_authenticator(ctx, self.keyring) if self.identity else None
        self.control = make_socket(ctx, zmq.ROUTER)
        self.results = make_socket(ctx, zmq.PULL)
        self.to_stage0 = make_socket(ctx, zmq.PUSH)
        self.weights = weights_socket(ctx)
        if self.identity:
            for sock in (self.control, self.results, self.weights):
                as_server(sock, self.identity)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.channel = ControlChannel(self.control)
        tasks: list[asyncio.Task] = []
        server = http_runner = None
        try:
            listen_host, listen_port = split_hostport(s.listen, 5555)
            bind_tcp(self.control, listen_host, listen_port)
            self.results_port = bind_tcp(self.results, listen_host)
            self.weights_port = bind_tcp(self.weights, listen_host)
            weight_server = WeightServer(self.weights, self.manifest, sources, s.weights_rate)
            serve_host, serve_port = split_hostport(s.serve, 5556)
            server = await asyncio.start_server(self._client, serve_host, serve_port, limit=1 << 16)
            if s.http:
                http_runner = await self._start_http(s.http)
            self.state = "waiting for hosts"
            log.info("leader for %s (%d layers): hosts join at %s, clients at %s:%d; waiting for %d host(s)",
                     s.model, self.num_layers, s.listen, serve_host, serve_port, s.hosts)
            tasks = [asyncio.create_task(self._results_loop()), asyncio.create_task(self._expire_loop()),
                     asyncio.create_task(self._alive_loop()),
                     asyncio.create_task(weight_server.run()), asyncio.create_task(self._control_loop()),
                     asyncio.create_task(self._stage0_sender())]
            # Any of them failing (a LeaderError before serving began) stops the leader.
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in [*tasks, *self.background]:
                task.cancel()
            await asyncio.gather(*tasks, *self.background, return_exceptions=True)
            if server is not None:
                server.close()
            self.engine.fail_all("the leader is shutting down")
            for connection in self.connections:
                connection.cancel()
            await asyncio.gather(*self.connections, return_exceptions=True)
            if http_runner is not None:
                await http_runner.cleanup()
            await self._shutdown_hosts("the leader is shutting down")
            for sock in (self.control, self.results, self.to_stage0, self.weights):
                sock.close()
            if authenticator is not None:
                authenticator.stop()
            ctx.term()
            if server is not None:
                await server.wait_closed()

    async def _start_http(self, address: str) -> web.AppRunner:
        host, port = split_hostport(address, 8000)
        runner = web.AppRunner(OpenAIServer(self).app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, port, shutdown_timeout=1.0).start()
        log.info("OpenAI-compatible HTTP API and /metrics at http://%s:%d", host, port)
        return runner

    # ---- hosts

    async def _control_loop(self) -> None:
        while True:
            frames = await receive(self.control, copy=False)
            if len(frames) != 2:
                log.warning("ignored a control message of %d frames", len(frames))
                continue
            route, frame = frames
            try:
                msg = decode(frame.bytes, expect=(Join, ProbeReply, ProfileReport, Ready, Failed, Heartbeat))
            except WireError as exc:
                log.warning("ignored a malformed control message: %s", exc)
                continue
            host = self.hosts.get(msg.host)
            if isinstance(msg, Join):
                # User-Id: the CURVE key ZAP admitted (the property exists only with ZAP).
                user_id = frame.get("User-Id") if self.identity else ""
                await self._join(route.bytes, frame.get("Peer-Address"), user_id, msg)
                continue
            if host is None or host.route != route.bytes:
                log.warning("ignored %s from unknown host %r", type(msg).__name__, msg.host)
                continue
            await self._host_message(host, msg)

    async def _host_message(self, host: HostRecord, msg) -> None:
        """A message from a joined host, on its own connection."""
        host.last_seen = time.monotonic()
        if host.state == "dead":  # its link came back: plan it in again like a host that joins
            log.warning("host %s is back after %s", host.name, host.note)
            host.state, host.note, host.planned, host.stage, host.layers = "joined", "", False, None, None
            await self._maybe_assign()
        if isinstance(msg, Heartbeat):
            host.stats = msg.stats
        elif isinstance(msg, ProbeReply):
            self.channel.answered(msg.nonce)
        elif isinstance(msg, ProfileReport):
            await self._profile_arrived(host, msg.profile)
        elif isinstance(msg, Ready):
            if host.state != "loading" or msg.stage != host.stage or msg.epoch != self.engine.epoch:
                log.warning("ignored Ready from %s: it was not loading stage %s of epoch %d", host.name,
                            msg.stage, msg.epoch)
                return
            host.state, host.weight_bytes, host.kv_bytes = "ready", msg.weight_bytes, msg.kv_bytes
            self.failures.pop(host.name, None)
            host.fetched_bytes, host.flat_tokens = msg.fetched_bytes, msg.flat_tokens
            log.info("host %s ready: stage %d, %.0f MiB weights + %.0f MiB KV cache, loaded in %.1f s "
                     "(%.1f MiB fetched from the leader)", host.name, msg.stage, msg.weight_bytes / 2**20,
                     msg.kv_bytes / 2**20, msg.load_seconds, msg.fetched_bytes / 2**20)
            await self._maybe_serve()
        elif isinstance(msg, Failed):
            held = host.current.epoch if host.current else -1
            if msg.epoch not in (-1, held):  # an Assign ago: its Ready or Failed for the latest follows
                log.warning("ignored Failed from %s for epoch %d (its latest slice is of epoch %d): %s", host.name,
                            msg.epoch, held, msg.reason)
                return
            if not self.served:
                host.state = "failed"
                raise LeaderError(f"host {host.name} cannot serve its slice: {msg.reason}")
            if host.state == "loading":  # a slice it cannot load: it would fail the same way at once
                self._sit_out(host)
            await self._host_lost(host, f"failed: {msg.reason}", "failed")

    async def _join(self, route: bytes, peer_ip: str, user_id: str, msg: Join) -> None:
        """A new host, or one coming back (a restarted process, or one that lost touch with us)."""
        reason = None
        previous = self.hosts.get(msg.host)
        if previous is not None and previous.route == route:
            return  # the same connection joining twice: nothing new
        if msg.version != PROTOCOL_VERSION:
            reason = f"protocol version {msg.version}, the leader speaks {PROTOCOL_VERSION}"
        elif self.identity is not None and msg.public_key != user_id:
            reason = "the key in its Join is not the key it connected with"
        elif not is_tcp_endpoint(msg.data_addr):
            reason = f"its data address {msg.data_addr[:80]!r} is not tcp://HOST:PORT"
        if reason:
            log.warning("refused host %s: %s", msg.host, reason)
            await self.channel.send(route, Refused(reason))  # where it is gone already, nothing to tell
            return
        now = time.monotonic()
        if previous is not None and previous.state != "dead" and now - previous.last_seen < DEAD_AFTER_SECONDS:
            log.warning("host %s joined again on a new connection %.1f s after its last heartbeat: a restart, or "
                        "two hosts named %s (each would push the other out: give each its own --name)",
                        msg.host, now - previous.last_seen, msg.host)
        self.hosts[msg.host] = HostRecord(msg.host, route, peer_ip, msg.inventory, msg.data_addr, now,
                                          self.settings.dtype, last_seen=now, current=msg.current,
                                          public_key=msg.public_key)
        if previous is not None and previous.profile is not None \
                and previous.profile.device_name == msg.inventory.name:
            self.hosts[msg.host].profile = previous.profile  # the same device: no need to measure again
        self.excluded.discard(msg.host)
        if (sits_out := self.failures.get(msg.host, Failures()).until - now) > 0:
            self.hosts[msg.host].note = f"sits out {sits_out:.0f} s more: it failed its slice"
        log.info("host %s %s from %s: %s (%s), %.2f GiB usable (%d/%d)%s", msg.host,
                 "rejoined" if previous else "joined", peer_ip, msg.inventory.device, msg.inventory.name,
                 msg.inventory.usable_bytes / 2**30, len(self.hosts), self.settings.hosts,
                 f", holding layers {msg.current.start}-{msg.current.end - 1}" if msg.current else "")
        if previous is not None and previous in self.stages and previous.state != "dead":
            # Its old process is gone (it would not join again otherwise): its stage with it.
            self.stages = [self.hosts[msg.host] if h is previous else h for h in self.stages]
            await self._pipeline_lost(f"host {msg.host} restarted")
        task = asyncio.create_task(self._measure_link(self.hosts[msg.host]))
        self.background.add(task)
        task.add_done_callback(self.background.discard)
        await self._maybe_assign()

    async def _send_host(self, host: HostRecord, msg) -> None:
        """Send on the control channel; a host whose connection is gone is left to the dead-host
        check (within a second) rather than failing whoever was sending."""
        error = await self.channel.send(host.route, msg)
        if error is not None:
            log.warning("cannot reach host %s (%s)", host.name, error)
            host.last_seen = -float("inf")

    async def _measure_link(self, host: HostRecord) -> None:
        """Time probes to the host, then (when planning live) ask for its profile."""
        try:
            host.link = await self.channel.measure_link(host.route)
            log.info("link to host %s: %.3f ms, %.2f Gbit/s", host.name, host.link.latency_ms, host.link.gbps)
        except (asyncio.TimeoutError, zmq.ZMQError) as exc:
            planner = self.settings.planner
            log.warning("could not measure the link to host %s (%s)%s", host.name, type(exc).__name__,
                        f"; planning assumes {planner.link_gbps:g} Gbit/s" if planner else "")
        if self.settings.planner is not None:
            request = ProfileRequest(self.settings.model, self.settings.dtype, self.manifest.model_hash,
                                     self._weights_addr(host), self.settings.planner.profile_budget_s)
            await self._send_host(host, request)

    async def _shutdown_hosts(self, reason: str) -> None:
        for host in self.hosts.values():
            await self.channel.send(host.route, Shutdown(reason))

    # ---- data path

    def _send_step(self, step: Step, ids: torch.Tensor) -> None:
        """The engine's send, which it calls synchronously: queued for _stage0_sender. A send
        left un-awaited here lost its micro-batch (a 120 s step timeout, then a replay) when
        pyzmq's asyncio socket handed it a spurious zmq.Again (transport/sockets.py)."""
        meta, frame = to_frame(ids)
        self.stage0_queue.put_nowait([encode(step), frame])

    async def _stage0_sender(self) -> None:
        """Send queued micro-batches to stage 0 one at a time, in the order the engine made them
        (a stage feeds a row the token its slot sampled the step before: order matters)."""
        while True:
            frames = await self.stage0_queue.get()
            await send(self.to_stage0, frames, copy=False)

    async def _results_loop(self) -> None:
        while True:
            frames = await receive(self.results)
            try:
                msg = decode(frames[0], expect=(StepResult, StepFailed))
            except WireError as exc:
                log.warning("ignored a malformed result: %s", exc)
                continue
            try:
                if isinstance(msg, StepResult):
                    self.engine.on_result(msg)
                else:
                    self.engine.on_failure(msg)
            except Exception:  # one bad result must not stop every request's results
                log.exception("failed to handle the result of micro-batch %d", msg.mb)

    # ---- clients

    @property
    def accepting(self) -> bool:
        """New requests are taken: serving, or rebuilding the pipeline after a fault (they wait)."""
        return self.state == "serving" or (self.served and self.state in ("planning", "loading"))

    async def admit(self, req: GenerateRequest, sink: Sink, stream: bool) -> Request:
        """Tokenize a validated request and hand it to the engine (both front ends come here).

        Raises ProtocolError (too_long, bad_request, overloaded, unavailable) carrying the request's id."""
        self._refuse_unless_accepting(req)
        codec = self.codec
        ids = await asyncio.get_running_loop().run_in_executor(None, codec.encode, req)
        self._refuse_unless_accepting(req)  # the hosts may have gone while it was tokenized: nothing would serve it
        if req.max_tokens is not None and req.max_tokens >= codec.max_context:
            raise ProtocolError("bad_request", f"'max_tokens' must be below the context ({codec.max_context})", req.id)
        try:
            return self.engine.new_request(req.id, sink, ids, req.max_tokens, req.temperature, req.top_k, req.top_p,
                                           req.seed, req.stop, stream)
        except Overloaded as exc:
            raise ProtocolError("overloaded", str(exc), req.id) from None

    def _refuse_unless_accepting(self, req: GenerateRequest) -> None:
        if not self.accepting:  # degraded, or not served yet (its hosts may never come)
            raise ProtocolError("unavailable", "the cluster lost the hosts it needs to hold the model; try again "
                                "when a host rejoins" if self.state == "degraded" else
                                f"no capacity: the cluster is {self.state}", req.id)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.connections.add(task)
        try:
            await Connection(self, reader, writer).serve()
        except asyncio.CancelledError:
            writer.transport.abort()  # the leader is stopping; a client that stopped reading must not hold it
        finally:
            self.connections.discard(task)

    def status(self) -> dict:
        now = time.monotonic()
        limits = self.engine.limits
        return {
            "state": self.state, "model": self.settings.model, "layers": self.num_layers,
            "dtype": self.settings.dtype, "uptime_s": round(now - self.started, 1),
            "hosts": [h.describe(now) for h in sorted(self.hosts.values(), key=lambda h: h.name)],
            "plan": None if self.plan is None else {
                "predicted_tokens_per_s": self.plan.predicted_tokens_per_s, "predicted_ppl": self.plan.predicted_ppl,
                "base_ppl": self.plan.base_ppl, "max_ppl_increase": self.plan.max_ppl_increase},
            "limits": {"max_seqs": limits.max_seqs, "max_context": limits.max_context,
                       "prefill_seqs": limits.prefill_seqs, "prefill_tokens": limits.prefill_tokens,
                       "decode_seqs": limits.decode_seqs},
            **self.engine.snapshot(),
        }


def run_leader(settings: LeaderSettings) -> None:
    asyncio.run(run_until_signal(Leader(settings).run()))
