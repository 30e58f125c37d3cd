"""The link between the leader and a host, measured with Probe round trips on the control channel.

Latency is half the fastest small round trip; bandwidth is a large payload's extra time over that
round trip. The planner charges each stage's activation transfers with these numbers instead of
an assumed `--link-gbps` (the leader's link to a host stands in for the host's link to its
neighbour stage, which the leader cannot see).
"""

from __future__ import annotations

from dataclasses import dataclass

SMALL_PROBES = 5
LARGE_PROBES = 2
LARGE_BYTES = 8 << 20  # long enough on a 10 Gbit/s link (~7 ms) to dwarf the round trip
PROBE_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Link:
    latency_ms: float
    gbps: float


def link_from_round_trips(small_s: list[float], large_s: list[float], large_bytes: int = LARGE_BYTES) -> Link:
    """Round-trip times (seconds) of empty and of `large_bytes` probes -> the link's numbers."""
    rtt = min(small_s)
    extra = max(min(large_s) - rtt, 1e-6)  # a link too fast to see caps at large_bytes per microsecond
    return Link(latency_ms=round(rtt / 2 * 1000, 4), gbps=round(large_bytes * 8 / extra / 1e9, 3))
