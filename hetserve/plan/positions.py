"""One host's costs at its place in the pipeline, reduced to the precisions worth trying there.

A stage's prefill time, decode time and memory are a constant (fixed per-step cost, the head when
last or the send when not, the embedding and head bytes) plus a per-layer amount that depends only
on the precision. Precomputing both per pipeline position keeps the search's inner loops to a few
additions. A precision is dropped on a host when it cannot run there (infinite time or bytes, as
planner.host_costs gives for precisions a device lacks) or when another precision is no slower in
either phase, no larger, and costs no more quality on every layer: any plan using the dropped one
is matched or beaten by swapping it for the other, so dropping it is exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .partition import HostCosts, Objective


@dataclass(frozen=True)
class Position:
    """Host `name` as stage k: per-layer costs of its kept precisions and the stage's constants."""

    name: str
    precisions: tuple[str, ...]
    pre: tuple[float, ...]  # ms per layer, one prefill micro-batch, per kept precision
    dec: tuple[float, ...]
    mem: tuple[float, ...]  # weight bytes + KV bytes per layer
    base_pre: float  # what the stage costs with no layers
    base_dec: float
    base_mem: float
    capacity: float
    tokens: int  # N: the weighted sum W adds pre + N * dec per stage

    def max_layers(self) -> int:
        """The most layers that fit in memory at the smallest precision."""
        if not self.mem or self.base_mem > self.capacity:
            return 0
        smallest = min(self.mem)
        # A hair of slack: an upper bound on the count must not lose an exact fit to rounding.
        return int((self.capacity - self.base_mem) / smallest * (1 + 1e-9)) if smallest > 0 else 1 << 30


def kept_precisions(host: HostCosts, precisions: list[str], quality: list[dict[str, int]]) -> list[str]:
    """The precisions of `precisions` that can run on `host` and are not dominated there."""
    def finite(p: str) -> bool:
        return not any(math.isinf(v) or math.isnan(v) for v in (host.layer_pre[p], host.layer_dec[p],
                                                                host.layer_bytes[p]))

    def no_worse(p: str, o: str) -> bool:  # o is at least as good as p everywhere
        return (host.layer_pre[o] <= host.layer_pre[p] and host.layer_dec[o] <= host.layer_dec[p]
                and host.layer_bytes[o] <= host.layer_bytes[p] and all(q[o] <= q[p] for q in quality))

    usable = [p for p in precisions if finite(p)]
    kept = []
    for i, p in enumerate(usable):
        # Of two equal precisions the earlier one stays.
        if not any(no_worse(p, o) and (not no_worse(o, p) or j < i) for j, o in enumerate(usable) if o != p):
            kept.append(p)
    return kept


def positions(hosts: list[HostCosts], precisions: list[str], quality: list[dict[str, int]],
              objective: Objective) -> list[Position]:
    out = []
    for k, host in enumerate(hosts):
        first, last = k == 0, k == len(hosts) - 1
        kept = kept_precisions(host, precisions, quality)
        base_pre = host.fixed_pre + (host.head_pre if last else host.send_pre)
        base_dec = host.fixed_dec + (host.head_dec if last else host.send_dec)
        base_mem = (host.embed_bytes if first else 0.0) + (host.head_bytes if last else 0.0)
        out.append(Position(host.name, tuple(kept), tuple(host.layer_pre[p] for p in kept),
                            tuple(host.layer_dec[p] for p in kept),
                            tuple(host.layer_bytes[p] + host.kv_bytes_per_layer for p in kept),
                            base_pre, base_dec, base_mem, host.capacity, objective.output_tokens))
    return out
