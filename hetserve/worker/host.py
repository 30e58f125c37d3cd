"""`hetserve join`: a host registers with the leader, loads its slice and runs its stage.

Lifecycle: bind the data socket (where upstream will push micro-batches) -> send Join with the
inventory -> receive Assign -> resolve the model and load only the assigned layers -> connect
downstream -> send Ready -> run the stage loop; Heartbeat every second throughout. A Shutdown
from the leader, SIGINT or SIGTERM ends the process cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import zmq
import zmq.asyncio

from ..config import HostSettings
from ..lifecycle import run_until_signal
from ..model.resolve import resolve_model
from ..model.stage import StageModel, StageSpec, load_config
from ..transport.sockets import bind_tcp, local_ip_towards, make_socket, split_hostport, tcp
from ..wire.codec import WireError, decode, encode
from ..plan.profile import cached_profile
from ..wire.messages import Assign, Failed, Heartbeat, Join, ProfileReport, ProfileRequest, Ready, Refused, Shutdown
from .inventory import take_inventory
from .stage_loop import StageLoop

log = logging.getLogger(__name__)

HEARTBEAT_SECONDS = 1.0


class HostError(Exception):
    """The host cannot take part; the message says why (exit status 1)."""


class Host:
    def __init__(self, settings: HostSettings):
        self.settings = settings
        self.name = settings.name or f"{socket.gethostname()}-{os.getpid()}"
        self.stage_loop: StageLoop | None = None
        self._tasks: list[asyncio.Task] = []
        # Every torch call of this host runs on this one thread: a second thread doing torch
        # work brings a second OpenMP team and made decode ~1.6x slower on a 2-core CPU.
        self.torch_thread = ThreadPoolExecutor(1, thread_name_prefix="torch")

    async def run(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        if s.threads:
            await loop.run_in_executor(self.torch_thread, torch.set_num_threads, s.threads)
        leader_host, leader_port = split_hostport(s.leader, 5555)
        leader_ip = socket.getaddrinfo(leader_host, leader_port, proto=socket.IPPROTO_TCP)[0][4][0]
        advertise = s.advertise or local_ip_towards(leader_ip)
        inventory = await loop.run_in_executor(self.torch_thread, take_inventory, s.device, s.memory)
        log.info("host %s: %s (%s), %.1f GiB usable, %.0f GFLOP/s", self.name, inventory.device,
                 inventory.name, inventory.usable_bytes / 2**30, inventory.gflops)

        ctx = zmq.asyncio.Context()
        self.data_in = make_socket(ctx, zmq.PULL)
        self.data_out = make_socket(ctx, zmq.PUSH)
        self.control = make_socket(ctx, zmq.DEALER)
        try:
            port = bind_tcp(self.data_in, advertise)
            self.control.connect(tcp(leader_ip, leader_port))
            await self.control.send(encode(Join(self.name, inventory, tcp(advertise, port))))
            log.info("joining leader %s:%d; receiving micro-batches on %s:%d", leader_host, leader_port, advertise, port)
            self._tasks.append(asyncio.create_task(self._heartbeat()))
            await self._control_loop()
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for sock in (self.data_in, self.data_out, self.control):
                sock.close()
            ctx.term()
            self.torch_thread.shutdown(wait=False, cancel_futures=True)

    async def _control_loop(self) -> None:
        while True:
            raw = await self.control.recv()
            try:
                msg = decode(raw, expect=(Assign, ProfileRequest, Refused, Shutdown))
            except WireError as exc:
                log.warning("ignored a malformed control message: %s", exc)
                continue
            if isinstance(msg, Refused):
                raise HostError(f"the leader refused this host: {msg.reason}")
            if isinstance(msg, Shutdown):
                log.info("leader asked to shut down: %s", msg.reason)
                return
            if isinstance(msg, ProfileRequest):
                await self._profile(msg)
                continue
            await self._assign(msg)

    async def _profile(self, msg: ProfileRequest) -> None:
        started = time.perf_counter()
        try:
            profile = await asyncio.get_running_loop().run_in_executor(
                self.torch_thread, lambda: cached_profile(resolve_model(msg.model).path, self.settings.device, msg.dtype)[0])
        except Exception as exc:  # the leader must hear it rather than wait for a profile
            log.error("cannot profile %s: %s", msg.model, exc)
            await self._send(Failed(self.name, f"profiling failed: {exc}"))
            return
        log.info("profile of %s on %s ready in %.1f s", msg.model, profile.device_name, time.perf_counter() - started)
        await self._send(ProfileReport(self.name, profile))

    async def _assign(self, msg: Assign) -> None:
        if self.stage_loop is not None:
            await self._send(Failed(self.name, "this host already runs a stage; restart it to take a new slice"))
            return
        log.info("assigned stage %d/%d: layers %d-%d of %s", msg.stage + 1, msg.num_stages, msg.start, msg.end - 1, msg.model)
        started = time.perf_counter()
        try:
            model = await asyncio.get_running_loop().run_in_executor(self.torch_thread, self._load, msg)
        except Exception as exc:  # whatever went wrong, the leader must hear it rather than wait
            log.error("cannot load the slice: %s: %s", type(exc).__name__, exc)
            await self._send(Failed(self.name, f"{type(exc).__name__}: {exc}"))
            return
        seconds = time.perf_counter() - started
        self.data_out.connect(msg.downstream)
        self.stage_loop = StageLoop(model, msg.stage, self.data_in, self.data_out, self.torch_thread)
        self._tasks.append(asyncio.create_task(self.stage_loop.run()))
        log.info("stage %d ready in %.1f s: %.0f MiB weights, %.0f MiB KV cache", msg.stage, seconds,
                 model.weight_bytes / 2**20, model.cache.nbytes / 2**20)
        await self._send(Ready(self.name, msg.stage, model.weight_bytes, model.cache.nbytes, round(seconds, 3)))

    def _load(self, msg: Assign) -> StageModel:
        files = resolve_model(msg.model)
        layers = load_config(files.path).num_hidden_layers
        if layers != msg.num_layers:
            raise ModelError(f"{msg.model} here has {layers} layers, the leader's has {msg.num_layers}: not the same model")
        spec = StageSpec(msg.start, msg.end, first=msg.stage == 0, last=msg.stage == msg.num_stages - 1,
                         dtype=msg.dtype, max_seqs=msg.max_seqs, max_context=msg.max_context,
                         precisions=tuple(msg.precisions), input_scales=tuple(msg.input_scales))
        return StageModel(files.path, spec, self.settings.device)

    async def _send(self, msg) -> None:
        await self.control.send(encode(msg))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_SECONDS)
            stats = self.stage_loop.stats if self.stage_loop else Heartbeat(self.name).stats
            await self._send(Heartbeat(self.name, stats))


def run_host(settings: HostSettings) -> None:
    """Run until Shutdown or a signal."""
    asyncio.run(run_until_signal(Host(settings).run()))
