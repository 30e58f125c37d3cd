"""What the leader knows of each host: its record, and how it is shown in `status`."""

from __future__ import annotations

from dataclasses import dataclass

from ..plan.device_profile import DeviceProfile
from ..wire.messages import Assign, Inventory, StageStats
from .link import Link

DEAD_AFTER_SECONDS = 3.0  # a serving host silent this long (it heartbeats every second) is dead
BUSY_DEAD_AFTER_SECONDS = 30.0  # the same for a host still profiling or loading: a starved CPU
#                                 may delay its heartbeats, and it holds no request yet
FAILED_SITS_OUT_S = 30.0  # a host that failed to load its slice is planned in again only after this long,
#                           doubling with each failure in a row: it rejoins within seconds, and
#                           each try re-plans the cluster and replays every request
FAILED_SITS_OUT_MAX_S = 900.0


@dataclass(frozen=True)
class Failures:
    """A host's failures to load its slice in a row, and until when it sits out (monotonic)."""

    count: int = 0
    until: float = 0.0

    def after_failure(self, now: float) -> "Failures":
        return Failures(self.count + 1, now + min(FAILED_SITS_OUT_S * 2 ** self.count, FAILED_SITS_OUT_MAX_S))


@dataclass
class HostRecord:
    name: str
    route: bytes  # ZeroMQ routing id on the control socket
    peer_ip: str
    inventory: Inventory
    data_addr: str
    joined: float
    precision: str  # compute dtype of its layers
    state: str = "joined"  # joined -> loading -> ready | unused | failed | dead
    stage: int | None = None
    layers: tuple[int, int] | None = None
    last_seen: float = 0.0
    stats: StageStats = StageStats()
    weight_bytes: int = 0
    kv_bytes: int = 0
    flat_tokens: int = 0  # Ready.flat_tokens of its stage
    profile: DeviceProfile | None = None  # sent on request when the leader plans live
    fetched_bytes: int = 0  # weights it streamed from the leader for its slice
    link: Link | None = None  # measured from the leader after it joined
    current: Assign | None = None  # the slice it holds: its Join's word, then each Assign (None after a Release)
    planned: bool = False  # a layout has considered this host (else a new one triggers a re-plan)
    public_key: str = ""  # its CURVE key (verified at join) when the cluster runs with --keys
    note: str = ""  # why it is unused, when it is

    def describe(self, now: float) -> dict:
        silent = now - self.last_seen
        return {
            "name": self.name, "device": self.inventory.device, "device_name": self.inventory.name,
            "data_addr": self.data_addr,
            "usable_gib": round(self.inventory.usable_bytes / 2**30, 2), "gflops": self.inventory.gflops,
            "stage": self.stage, "layers": list(self.layers) if self.layers else None,
            "precision": self.precision, "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes,
            "state": self.state, "health": "ok" if silent < DEAD_AFTER_SECONDS else "dead",
            "last_seen_s": round(silent, 1), "steps": self.stats.steps,
            "busy_s": round(self.stats.busy_seconds, 2),
            "load": round(self.stats.busy_seconds / max(now - self.joined, 1e-9), 3),
            "prefill_ms": round(self.stats.prefill_ms, 2), "decode_ms": round(self.stats.decode_ms, 2),
            "fetched_bytes": self.fetched_bytes, "note": self.note,
            "link_ms": self.link.latency_ms if self.link else None, "link_gbps": self.link.gbps if self.link else None,
        }


def describe_precisions(precisions: list[str], dtype: str) -> str:
    """'float32' or e.g. 'float32 x20, int4 x5' for a stage's layers."""
    if not precisions or set(precisions) == {"native"}:
        return dtype
    counts = {p: precisions.count(p) for p in dict.fromkeys(precisions)}
    return ", ".join(f"{dtype if p == 'native' else p} x{n}" for p, n in counts.items())
