"""Laying the pipeline out over the leader's hosts: once every host has joined (and, planning
live, sent its profile), choose a layout, send each stage its slice, serve when every stage is
ready; lay it out again when a host is lost or one no layout has seen is ready. Requests in flight
are replayed into each new pipeline (engine.replay_all). Hosts are watched here too: Alive to each
every second, and one silent too long is lost.

PipelineLayout is mixed into Leader (daemon.py): it reads and sets the leader's state (below) and
sends through its control channel; the sockets and the message loops stay there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from pathlib import Path

import zmq.asyncio
from transformers import PretrainedConfig

from ..config import STEP_TIMEOUT_S, LeaderSettings
from ..model.precision import ACTIVATIONS_QUANTIZED
from ..plan.device_profile import DeviceProfile
from ..plan.planner import Plan, PlanningError
from ..plan.quality import activation_scales
from ..plan.split import ModelShape, PlanError
from ..transport.security import Identity, as_client
from ..transport.sockets import local_ip_towards, tcp
from ..wire.messages import Alive, Release
from ..weights.manifest import Manifest
from .control import ControlChannel
from .engine import Engine
from .hosts import BUSY_DEAD_AFTER_SECONDS, DEAD_AFTER_SECONDS, Failures, HostRecord, describe_precisions
from .layout import Layout, adoptable, choose_layout, disk_shortfalls, plan_live, stage_assigns

log = logging.getLogger(__name__)


class LeaderError(Exception):
    """The cluster cannot serve (a host failed to load, no plan fits); exit status 1."""


class PipelineLayout:
    # The leader's state this reads and sets (daemon.Leader sets it up).
    settings: LeaderSettings
    identity: Identity | None
    plan: Plan | None
    hosts: dict[str, HostRecord]
    excluded: set[str]
    failures: dict[str, Failures]
    stages: list[HostRecord]
    stage0_addr: str | None
    engine: Engine
    channel: ControlChannel
    state: str
    served: bool
    lost_at: float | None
    assigning: bool
    layout_stale: bool
    listening_since: float
    started: float
    model_dir: Path
    num_layers: int
    config: PretrainedConfig
    shape: ModelShape
    manifest: Manifest
    to_stage0: zmq.asyncio.Socket
    results_port: int
    weights_port: int

    async def _profile_arrived(self, host: HostRecord, profile: DeviceProfile) -> None:
        """A host's profile: plan with it, or, where it cannot be planned with, without the host."""
        try:
            profile.check()
        except ValueError as exc:
            log.warning("leaving host %s out: its profile is malformed (%s)", host.name, exc)
            host.note = f"malformed profile: {exc}"
            self.excluded.add(host.name)
        else:
            host.profile = profile
            log.info("host %s sent its profile (%s)", host.name, profile.device_name)
        await self._maybe_assign()

    async def _maybe_assign(self) -> None:
        """Lay the pipeline out once every host joined (and, when planning live, sent its
        profile); later, again whenever a host that no layout has considered is ready to plan."""
        if self.state == "waiting for hosts":
            if len(self.hosts) < self.settings.hosts:
                return
        elif all(h.planned for h in self._candidates()):
            return  # nothing is new
        elif self.state not in ("serving", "degraded") and not self.assigning:
            return  # loading a layout: laid out again once it serves (_maybe_serve)
        if self.settings.planner is not None and any(h.profile is None for h in self._candidates()):
            return
        await self._assign()

    def _plan_live(self) -> Plan:
        try:
            return plan_live(self.settings, self._plannable(), self.model_dir)
        except PlanningError as exc:
            raise LeaderError(f"no plan: {exc}") from None
        except Exception as exc:  # a malformed profile from a host, a failed measurement
            raise LeaderError(f"planning failed: {type(exc).__name__}: {exc}") from None

    def _candidates(self) -> list[HostRecord]:
        """Joined hosts the plan may use, in name order (stable however they raced to join); a host
        that failed its slice lately sits out (hosts.Failures)."""
        now = time.monotonic()
        return sorted((h for h in self.hosts.values() if h.name not in self.excluded and h.state not in ("dead", "failed")
                       and self.failures.get(h.name, Failures()).until <= now), key=lambda h: h.name)

    def _sit_out(self, host: HostRecord) -> None:
        """The host failed to load its slice: keep it out of plans a while (hosts.Failures)."""
        failures = self.failures.get(host.name, Failures()).after_failure(time.monotonic())
        self.failures[host.name] = failures
        log.warning("host %s sits out of plans for %.0f s (failure %d in a row to load)", host.name,
                    failures.until - time.monotonic(), failures.count)

    def _silent_for(self, host: HostRecord, now: float) -> float:
        """How long a host has been silent while the leader listened. A layout runs inside the
        control loop (a live plan measures for seconds to minutes), which reads no heartbeat
        meanwhile: silence counts from when it ends, not from a heartbeat still unread."""
        if self.assigning:
            return 0.0
        return now - max(host.last_seen, self.listening_since)

    def _plannable(self) -> list[HostRecord]:
        """Candidates a layout can use now: with live planning, those whose profile has come
        (one still profiling is planned in when its profile arrives)."""
        live = self.settings.planner is not None
        return [h for h in self._candidates() if not live or h.profile is not None]

    def _weights_addr(self, host: HostRecord) -> str:
        return tcp(self.settings.advertise or local_ip_towards(host.peer_ip), self.weights_port)

    async def _assign(self) -> None:
        """Lay the pipeline out over the live hosts and send every stage its slice. Requests in
        flight are replayed into the new pipeline (engine.replay_all). Before serving began a
        layout that cannot be made stops the leader; after, the cluster waits degraded.

        Planning awaits (a live plan runs for seconds), and a host may die or join meanwhile: a
        call while one runs only asks it to lay out again when done, so layouts never interleave."""
        if self.assigning:
            self.layout_stale = True
            return
        self.assigning = True
        try:
            while True:
                self.layout_stale = False
                await self._assign_once()
                if not self.layout_stale:
                    return
                log.info("hosts changed while laying out: laying out again")
        finally:
            self.assigning = False
            self.listening_since = time.monotonic()

    async def _assign_once(self) -> None:
        s = self.settings
        epoch = self.engine.replay_all()
        self.state = "planning"
        for host in self._plannable():  # this layout considers them: one plannable later lays out again
            host.planned = True
        try:
            layout = await self._fitting_layout()
            scales = await self._activation_scales(layout[2])
        except LeaderError as exc:
            if not self.served:
                raise
            self.state = "degraded"
            self.engine.fail_all(f"the cluster cannot hold the model now: {exc}")
            log.error("degraded: %s; requests are refused until a host (re)joins", exc)
            return
        if s.planner is not None and self.plan is not None:
            # The plan's prompts per prefill micro-batch, within the operator's bound. Its decode
            # micro-batch, ceil(batch / stages), is what the scheduler runs by itself; as a bound it
            # would throttle every request past the plan's batch (64 running, 4 rows a micro-batch).
            self.engine.limits = replace(self.engine.limits,
                                         prefill_seqs=min(s.limits.prefill_seqs, self.plan.prefill_microbatch))
        order = layout[0]
        own_key = self.identity.public.decode() if self.identity else ""
        if self.layout_stale:
            # A host joined, came back or was lost while this layout awaited (a live plan, w8a8
            # calibration): its records may be gone (an Assign to a dead connection, a stage nobody
            # watches). _assign lays out again instead. Only changes made meanwhile count: a plan
            # naming a host dead from the start would otherwise be laid out again without end.
            return
        self.state = "loading"
        results_addr = tcp(s.advertise or local_ip_towards(order[-1].peer_ip), self.results_port)
        assigns = stage_assigns(layout, s, self.num_layers, self.manifest.model_hash, epoch, results_addr,
                                [self._weights_addr(host) for host in order], own_key, scales)
        for host, assign in zip(order, assigns):
            host.stage, host.layers, host.state = assign.stage, (assign.start, assign.end), "loading"
            host.precision = describe_precisions(assign.precisions, s.dtype)
            log.info("plan: stage %d = host %s, layers %d-%d, %s", assign.stage, host.name, assign.start,
                     assign.end - 1, host.precision)
        # Last stage first: each host admits its upstream's key as soon as its Assign arrives, so
        # by the time an upstream host has loaded and connects, its downstream expects it.
        for host, assign in reversed(list(zip(order, assigns))):
            host.current = assign
            await self._send_host(host, assign)
        self.stages = order
        for host in self.hosts.values():
            if host in order:
                continue
            if host.state not in ("dead", "failed"):
                host.state = "unused"  # no room for a slice, or the plan found no layers that pay here
                host.stage = host.layers = None
                log.info("plan: host %s stays unused", host.name)
            if host.current is not None and host.state != "dead":  # its memory is idle: free it for later layouts
                host.current = None
                host.weight_bytes = host.kv_bytes = 0  # what status and metrics say it holds
                await self._send_host(host, Release(f"the layout of epoch {epoch} leaves this host out"))

    async def _activation_scales(self, precisions: list[list[str]]) -> list[dict]:
        """w8a8 layers calibrate on hidden states their stage cannot produce: the leader, which has
        the whole model, calibrates every layer once (cached) and ships each stage its own."""
        if not any(set(precs) & ACTIVATIONS_QUANTIZED for precs in precisions):
            return []
        try:
            return await asyncio.get_running_loop().run_in_executor(None, activation_scales, self.model_dir)
        except Exception as exc:  # a failed measurement must reach the operator, not hang the load
            raise LeaderError(f"w8a8 calibration failed: {type(exc).__name__}: {exc}") from None

    async def _fitting_layout(self) -> Layout:
        """A layout whose every host has disk room for its slice (hosts without are left out)."""
        s = self.settings
        while True:
            if not self._plannable():
                raise LeaderError("no live host can take a slice")
            layout = adoptable(self._candidates(), self.manifest.model_hash, self.num_layers, s)
            if layout is None:
                if s.planner is not None:
                    self.plan = await asyncio.get_running_loop().run_in_executor(None, self._plan_live)
                try:
                    layout = choose_layout(self.plan, s.planner is not None, self.served, self.hosts,
                                           self._candidates(), self.shape, self.num_layers, s.limits)
                except PlanError as exc:
                    raise LeaderError(f"no plan fits: {exc}") from None
            short = disk_shortfalls(*layout[:2], self.manifest, self.config)
            if not short:
                return layout
            for name, why in short.items():
                log.warning("leaving host %s out: %s", name, why)
                self.hosts[name].note = f"no disk room: {why}"
            if s.plan:
                raise LeaderError(f"the plan {s.plan} cannot be loaded: " + "; ".join(short.values()))
            self.excluded.update(short)

    async def _maybe_serve(self) -> None:
        if self.state != "loading" or any(h.state != "ready" for h in self.stages):
            return
        if self.stage0_addr != self.stages[0].data_addr:
            if self.stage0_addr is not None:  # PUSH would share micro-batches among both: never
                self.to_stage0.disconnect(self.stage0_addr)
            self.stage0_addr = self.stages[0].data_addr
            if self.identity:
                as_client(self.to_stage0, self.identity, self.stages[0].public_key.encode())
            self.to_stage0.connect(self.stage0_addr)
        self.state = "serving"
        if self.lost_at is not None:
            log.warning("recovered: serving again on %d stage(s) %.1f s after the fault, replaying %d request(s)",
                        len(self.stages), time.monotonic() - self.lost_at, len(self.engine.requests))
            self.lost_at = None
        else:
            log.info("serving: %d stage(s) ready after %.1f s", len(self.stages), time.monotonic() - self.started)
        self.served = True
        self.engine.pipeline_ready(len(self.stages), min(h.flat_tokens for h in self.stages),
                                   all(h.inventory.kind == "cuda" for h in self.stages))
        await self._maybe_assign()  # a host that joined meanwhile

    async def _alive_loop(self) -> None:
        """Every second, Alive to each host in touch. A task of its own: a layout the expire loop
        starts (a host lost) can outlast the LEADER_DEAD_S after which every host joins again."""
        while True:
            await asyncio.sleep(1.0)
            for host in list(self.hosts.values()):
                if host.state not in ("dead", "failed"):  # where its connection is gone, the silence will tell
                    await self.channel.send(host.route, Alive())

    async def _expire_loop(self) -> None:
        """Every second: expire lost micro-batches, bury the silent hosts."""
        while True:
            await asyncio.sleep(1.0)
            self.engine.expire(time.monotonic() - STEP_TIMEOUT_S)
            now = time.monotonic()
            for host in list(self.hosts.values()):
                if host.state in ("dead", "failed"):
                    continue
                serving = host.state == "ready" and self.state == "serving"
                silent = self._silent_for(host, now)
                if silent > (DEAD_AFTER_SECONDS if serving else BUSY_DEAD_AFTER_SECONDS):
                    await self._host_lost(host, f"silent for {silent:.1f} s")
            if self.failures:
                await self._maybe_assign()  # a host whose sitting out ended is planned in again

    async def _host_lost(self, host: HostRecord, why: str, state: str = "dead") -> None:
        """A host stopped heartbeating, failed or restarted: re-plan without it, replay requests."""
        log.error("host %s is %s (%s); it was %s%s", host.name, state, why, host.state,
                  f", stage {host.stage} with layers {host.layers[0]}-{host.layers[1] - 1}" if host.layers else "")
        was_stage = host in self.stages and host.state in ("loading", "ready")
        host.state, host.note = state, why
        if not self.served and self.state == "waiting for hosts":
            del self.hosts[host.name]  # room for a replacement to join
        elif was_stage or self.assigning:
            await self._pipeline_lost(f"host {host.name} is {state}")

    async def _pipeline_lost(self, why: str) -> None:
        if self.lost_at is None:
            self.lost_at = time.monotonic()
        log.warning("the pipeline is broken (%s): re-planning over %d live host(s)", why, len(self._candidates()))
        await self._assign()
