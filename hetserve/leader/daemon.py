"""`hetserve leader`: accept hosts, plan the split, wire the pipeline, serve clients.

Sockets (all ZeroMQ, msgpack headers, raw tensor frames, nothing pickled):
  control  ROUTER bound on --listen; each host's DEALER sends Join/Ready/Failed/Heartbeat.
  to_stage0  PUSH connected to stage 0's data address: micro-batches enter the pipeline.
  results  PULL bound beside --listen; the last stage pushes StepResult / StepFailed here.
The client port is a plain asyncio TCP server (frontend.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import zmq
import zmq.asyncio
from aiohttp import web

from ..config import STEP_TIMEOUT_S, LeaderSettings
from ..lifecycle import run_until_signal
from ..model.resolve import resolve_model
from ..model.shape import model_shape
from ..model.stage import load_config
from ..plan.device_profile import DeviceProfile
from ..plan.planner import HostInput, Plan, PlanningError, Workload, make_plan
from ..model.precision import ACTIVATIONS_QUANTIZED
from ..plan.quality import activation_scales, sensitivity
from ..plan.split import PlanError, memory_split
from ..transport.sockets import bind_tcp, local_ip_towards, make_socket, split_hostport, tcp
from ..wire.client import GenerateRequest, ProtocolError
from ..wire.codec import WireError, decode, encode
from ..wire.messages import (PROTOCOL_VERSION, Assign, Failed, Heartbeat, Inventory, Join, ProfileReport,
                             ProfileRequest, Ready, Refused, Shutdown, StageStats, Step, StepFailed, StepResult)
from ..wire.tensors import to_frame
from .engine import Engine, Overloaded, Request, Sink
from .frontend import Connection
from .http_api import OpenAIServer
from .tokens import TextCodec

log = logging.getLogger(__name__)

DEAD_AFTER_SECONDS = 3.0  # a host silent this long shows as "silent" in status


class LeaderError(Exception):
    """The cluster cannot serve (a host failed to load, no plan fits); exit status 1."""


@dataclass
class HostRecord:
    name: str
    route: bytes  # ZeroMQ routing id on the control socket
    peer_ip: str
    inventory: Inventory
    data_addr: str
    joined: float
    precision: str  # compute dtype of its layers
    state: str = "joined"  # joined -> loading -> ready | failed
    stage: int | None = None
    layers: tuple[int, int] | None = None
    last_seen: float = 0.0
    stats: StageStats = StageStats()
    weight_bytes: int = 0
    kv_bytes: int = 0
    profile: DeviceProfile | None = None  # sent on request when the leader plans live

    def describe(self, now: float) -> dict:
        silent = now - self.last_seen
        return {
            "name": self.name, "device": self.inventory.device, "device_name": self.inventory.name,
            "usable_gib": round(self.inventory.usable_bytes / 2**30, 2), "gflops": self.inventory.gflops,
            "stage": self.stage, "layers": list(self.layers) if self.layers else None,
            "precision": self.precision, "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes,
            "state": self.state, "health": "ok" if silent < DEAD_AFTER_SECONDS else "silent",
            "last_seen_s": round(silent, 1), "steps": self.stats.steps,
            "busy_s": round(self.stats.busy_seconds, 2),
            "load": round(self.stats.busy_seconds / max(now - self.joined, 1e-9), 3),
            "prefill_ms": round(self.stats.prefill_ms, 2), "decode_ms": round(self.stats.decode_ms, 2),
        }


def _describe_precisions(precisions: list[str], dtype: str) -> str:
    """'float32' or e.g. 'float32 x20, int4 x5' for a stage's layers."""
    if not precisions or set(precisions) == {"native"}:
        return dtype
    counts = {p: precisions.count(p) for p in dict.fromkeys(precisions)}
    return ", ".join(f"{dtype if p == 'native' else p} x{n}" for p, n in counts.items())


class Leader:
    def __init__(self, settings: LeaderSettings):
        settings.limits.check()
        self.settings = settings
        self.plan = Plan.load(Path(settings.plan)) if settings.plan else None
        self.hosts: dict[str, HostRecord] = {}
        self.state = "starting"
        self.started = time.monotonic()
        self.connections: set[asyncio.Task] = set()

    async def run(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        files = await loop.run_in_executor(None, resolve_model, s.model)
        self.model_dir = files.path
        config = load_config(files.path)
        if s.limits.max_context > config.max_position_embeddings:
            raise LeaderError(f"--max-context {s.limits.max_context} exceeds the model's "
                              f"{config.max_position_embeddings} positions")
        self.num_layers = config.num_hidden_layers
        self.shape = model_shape(files.path, s.dtype)
        self.codec = TextCodec(files.path, s.limits.max_context)
        self.engine = Engine(s.limits, self.codec.eos_ids, self.codec.decode, self._send_step, config.vocab_size)

        ctx = zmq.asyncio.Context()
        self.control = make_socket(ctx, zmq.ROUTER)
        self.results = make_socket(ctx, zmq.PULL)
        self.to_stage0 = make_socket(ctx, zmq.PUSH)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        tasks: list[asyncio.Task] = []
        server = http_runner = None
        try:
            listen_host, listen_port = split_hostport(s.listen, 5555)
            bind_tcp(self.control, listen_host, listen_port)
            self.results_port = bind_tcp(self.results, listen_host)
            serve_host, serve_port = split_hostport(s.serve, 5556)
            server = await asyncio.start_server(self._client, serve_host, serve_port, limit=1 << 16)
            if s.http:
                http_runner = await self._start_http(s.http)
            self.state = "waiting for hosts"
            log.info("leader for %s (%d layers): hosts join at %s, clients at %s:%d; waiting for %d host(s)",
                     s.model, self.num_layers, s.listen, serve_host, serve_port, s.hosts)
            tasks = [asyncio.create_task(self._results_loop()), asyncio.create_task(self._expire_loop())]
            await self._control_loop()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if server is not None:
                server.close()
            self.engine.fail_all("the leader is shutting down")
            for connection in self.connections:
                connection.cancel()
            await asyncio.gather(*self.connections, return_exceptions=True)
            if http_runner is not None:
                await http_runner.cleanup()
            await self._shutdown_hosts("the leader is shutting down")
            for sock in (self.control, self.results, self.to_stage0):
                sock.close()
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
            frames = await self.control.recv_multipart(copy=False)
            if len(frames) != 2:
                log.warning("ignored a control message of %d frames", len(frames))
                continue
            route, frame = frames
            try:
                msg = decode(frame.bytes, expect=(Join, ProfileReport, Ready, Failed, Heartbeat))
            except WireError as exc:
                log.warning("ignored a malformed control message: %s", exc)
                continue
            host = self.hosts.get(msg.host)
            if isinstance(msg, Join):
                await self._join(route.bytes, frame.get("Peer-Address"), msg)
                continue
            if host is None or host.route != route.bytes:
                log.warning("ignored %s from unknown host %r", type(msg).__name__, msg.host)
                continue
            host.last_seen = time.monotonic()
            if isinstance(msg, Heartbeat):
                host.stats = msg.stats
            elif isinstance(msg, ProfileReport):
                host.profile = msg.profile
                log.info("host %s sent its profile (%s)", host.name, msg.profile.device_name)
                await self._maybe_assign()
            elif isinstance(msg, Ready):
                if host.state != "loading" or msg.stage != host.stage:
                    log.warning("ignored Ready from %s: it was not loading stage %s", host.name, msg.stage)
                    continue
                host.state, host.weight_bytes, host.kv_bytes = "ready", msg.weight_bytes, msg.kv_bytes
                log.info("host %s ready: stage %d, %.0f MiB weights + %.0f MiB KV cache, loaded in %.1f s",
                         host.name, msg.stage, msg.weight_bytes / 2**20, msg.kv_bytes / 2**20, msg.load_seconds)
                self._maybe_serve()
            elif isinstance(msg, Failed):
                host.state = "failed"
                raise LeaderError(f"host {host.name} cannot serve its slice: {msg.reason}")

    async def _join(self, route: bytes, peer_ip: str, msg: Join) -> None:
        reason = None
        if msg.version != PROTOCOL_VERSION:
            reason = f"protocol version {msg.version}, the leader speaks {PROTOCOL_VERSION}"
        elif msg.host in self.hosts:
            reason = f"a host named {msg.host!r} already joined"
        elif len(self.hosts) >= self.settings.hosts:
            reason = f"the cluster is full ({self.settings.hosts} hosts); start the leader with a larger --hosts"
        if reason:
            log.warning("refused host %s: %s", msg.host, reason)
            await self.control.send_multipart([route, encode(Refused(reason))])
            return
        now = time.monotonic()
        self.hosts[msg.host] = HostRecord(msg.host, route, peer_ip, msg.inventory, msg.data_addr, now,
                                          self.settings.dtype, last_seen=now)
        log.info("host %s joined from %s: %s (%s), %.2f GiB usable (%d/%d)", msg.host, peer_ip, msg.inventory.device,
                 msg.inventory.name, msg.inventory.usable_bytes / 2**30, len(self.hosts), self.settings.hosts)
        if self.settings.planner is not None:
            await self.control.send_multipart([route, encode(ProfileRequest(self.settings.model, self.settings.dtype))])
        await self._maybe_assign()

    async def _maybe_assign(self) -> None:
        """Assign slices once every host joined (and, when planning live, sent its profile)."""
        if len(self.hosts) < self.settings.hosts or self.state != "waiting for hosts":
            return
        if self.settings.planner is not None:
            if any(h.profile is None for h in self.hosts.values()):
                return
            self.state = "planning"
            self.plan = await asyncio.get_running_loop().run_in_executor(None, self._plan_live)
            self.engine.limits = replace(self.engine.limits, prefill_seqs=self.plan.prefill_microbatch,
                                         decode_seqs=self.plan.decode_microbatch)
        await self._assign()

    def _plan_live(self) -> Plan:
        p = self.settings.planner
        hosts = [HostInput(h.name, h.inventory.usable_bytes, h.profile, p.link_gbps)
                 for h in sorted(self.hosts.values(), key=lambda h: h.name)]
        quantized = sorted({q for h in hosts for q in h.profile.layer_bytes if q != "native"})
        log.info("planning for +%.1f%% perplexity: measuring layer sensitivity (cached after the first time)",
                 p.max_ppl_increase * 100)
        limits = self.settings.limits
        # The KV cache the hosts will allocate is what the plan must budget for.
        workload = Workload(p.prompt_tokens, p.output_tokens, p.batch, limits.max_seqs * (limits.max_context + 1))
        try:
            sens = sensitivity(self.model_dir, quantized, p.calibration_tokens, progress=False)
            plan = make_plan(self.settings.model, hosts, sens, workload, p.max_ppl_increase)
        except PlanningError as exc:
            raise LeaderError(f"no plan: {exc}") from None
        except Exception as exc:  # a malformed profile from a host, a failed measurement
            raise LeaderError(f"planning failed: {type(exc).__name__}: {exc}") from None
        log.info("plan: predicted %.1f tokens/s, perplexity %.3f (base %.3f), solved in %.2f s; baselines %s",
                 plan.predicted_tokens_per_s, plan.predicted_ppl, plan.base_ppl, plan.solve_seconds, plan.baselines)
        if p.save_to:
            plan.save(Path(p.save_to))
        return plan

    async def _assign(self) -> None:
        s = self.settings
        try:
            order, ranges, precisions = self._layout()
        except PlanError as exc:
            raise LeaderError(f"no plan fits: {exc}") from None
        self.state = "loading"
        # w8a8 layers calibrate on hidden states their stage cannot produce: the leader, which
        # has the whole model, calibrates every layer once (cached) and ships each stage its own.
        scales = []
        if any(set(precs) & ACTIVATIONS_QUANTIZED for precs in precisions):
            try:
                scales = await asyncio.get_running_loop().run_in_executor(None, activation_scales, self.model_dir)
            except Exception as exc:  # a failed measurement must reach the operator, not hang the load
                raise LeaderError(f"w8a8 calibration failed: {type(exc).__name__}: {exc}") from None
        for i, (host, (start, end), precs) in enumerate(zip(order, ranges, precisions)):
            host.stage, host.layers, host.state = i, (start, end), "loading"
            host.precision = _describe_precisions(precs, s.dtype)
            if i + 1 < len(order):
                downstream = order[i + 1].data_addr
            else:
                downstream = tcp(s.advertise or local_ip_towards(host.peer_ip), self.results_port)
            assign = Assign(stage=i, num_stages=len(order), start=start, end=end, model=s.model,
                            num_layers=self.num_layers, dtype=s.dtype, max_seqs=s.limits.max_seqs,
                            max_context=s.limits.max_context, downstream=downstream, precisions=precs,
                            input_scales=[scales[start + j] if p in ACTIVATIONS_QUANTIZED else {}
                                          for j, p in enumerate(precs)])
            log.info("plan: stage %d = host %s, layers %d-%d, %s", i, host.name, start, end - 1, host.precision)
            await self.control.send_multipart([host.route, encode(assign)])
        self.stages = order
        for host in self.hosts.values():
            if host not in order:  # the plan found no layers that pay on this host
                host.state = "unused"
                log.info("plan: host %s stays unused", host.name)

    def _layout(self) -> tuple[list[HostRecord], list[tuple[int, int]], list[list[str]]]:
        """Pipeline order, layer ranges and per-layer precisions: from --plan, or split by memory."""
        s = self.settings
        if self.plan is not None:
            missing = [st.host for st in self.plan.stages if st.host not in self.hosts]
            if missing:
                raise PlanError(f"the plan is for hosts {[st.host for st in self.plan.stages]}, "
                                f"but {sorted(self.hosts)} joined")
            bounds = [(st.start, st.end) for st in self.plan.stages]
            if bounds[0][0] != 0 or bounds[-1][1] != self.num_layers or any(
                    a[1] != b[0] or a[0] >= a[1] for a, b in zip(bounds, bounds[1:] + [(self.num_layers, 0)])):
                raise PlanError(f"the plan's layer ranges {bounds} do not cover layers 0-{self.num_layers - 1} "
                                f"contiguously")
            order = [self.hosts[st.host] for st in self.plan.stages]
            return order, [(st.start, st.end) for st in self.plan.stages], [st.precisions for st in self.plan.stages]
        # Hosts in name order: a stable pipeline order however they raced to join.
        order = sorted(self.hosts.values(), key=lambda h: h.name)
        kv_tokens = s.limits.max_seqs * (s.limits.max_context + 1)
        ranges = memory_split(self.shape, [h.inventory.usable_bytes for h in order], kv_tokens)
        return order, ranges, [[] for _ in order]

    def _maybe_serve(self) -> None:
        if self.state == "serving" or any(h.state != "ready" for h in self.stages):
            return
        self.to_stage0.connect(self.stages[0].data_addr)
        self.state = "serving"
        log.info("serving: %d stage(s) ready after %.1f s", len(self.stages), time.monotonic() - self.started)
        self.engine.pipeline_ready(len(self.stages))

    async def _shutdown_hosts(self, reason: str) -> None:
        for host in self.hosts.values():
            try:
                await self.control.send_multipart([host.route, encode(Shutdown(reason))], flags=zmq.NOBLOCK)
            except zmq.ZMQError:
                pass

    # ---- data path

    def _send_step(self, step: Step, ids: torch.Tensor) -> None:
        meta, frame = to_frame(ids)
        self.to_stage0.send_multipart([encode(step), frame], copy=False)

    async def _results_loop(self) -> None:
        while True:
            frames = await self.results.recv_multipart()
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

    async def _expire_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.engine.expire(time.monotonic() - STEP_TIMEOUT_S)

    # ---- clients

    async def admit(self, req: GenerateRequest, sink: Sink, stream: bool) -> Request:
        """Tokenize a validated request and hand it to the engine (both front ends come here).

        Raises ProtocolError (too_long, bad_request, overloaded) carrying the request's id."""
        codec = self.codec
        ids = await asyncio.get_running_loop().run_in_executor(None, codec.encode, req)
        if req.max_tokens is not None and req.max_tokens >= codec.max_context:
            raise ProtocolError("bad_request", f"'max_tokens' must be below the context ({codec.max_context})", req.id)
        try:
            return self.engine.new_request(req.id, sink, ids, req.max_tokens, req.temperature, req.top_k, req.top_p,
                                           req.seed, req.stop, stream)
        except Overloaded as exc:
            raise ProtocolError("overloaded", str(exc), req.id) from None

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
