"""Dominance filters for the partitioner's search.

The entries are partial plans (quality q, weighted sum w, running max P, running max D, ...). The
objective adds a * max P + b * max D at the end, and max(p1, x) <= max(p2, x) + (p1 - p2)+, so
entry 1 can never finish worse than entry 2 once

    q1 <= q2  and  w1 + a (p1 - p2)+ + b (d1 - d2)+ <= w2

(for partial stages also memory1 <= memory2). This "weak" dominance is stronger than plain
Pareto dominance: a slightly higher maximum is outweighed by a lower sum. It is transitive, so
checking each entry against the kept ones suffices; after sorting by (q, w) only earlier entries
can dominate, and scanning the kept ones by ascending w stops at the first with a larger w. The
last dominators found are tried first: entries next to each other in the order usually share one.
"""

from __future__ import annotations

from bisect import insort
from operator import itemgetter

RECENT = 2  # dominators remembered


def weakly_nondominated(entries: list[tuple], a: float, b: float, memory: bool = False) -> list[tuple]:
    """Entries (q, w, p, d, ...) not dominated as above by another; of equal ones the first.
    With memory, e[4] is a fourth measure that must not be larger in the dominating entry."""
    entries.sort(key=itemgetter(0, 1))
    kept: list[tuple] = []
    by_w: list[tuple] = []  # kept (w, p, d, memory), w ascending
    recent: list[tuple] = []  # the last dominators found: neighbours in the order share them
    for e in entries:
        w, p, d = e[1], e[2], e[3]
        m = e[4] if memory else 0.0
        dominated = False
        for kw, kp, kd, km in recent:
            if km <= m and kw + (a * (kp - p) if kp > p else 0.0) + (b * (kd - d) if kd > d else 0.0) <= w:
                dominated = True
                break
        if dominated:
            continue
        for k in by_w:
            kw, kp, kd, km = k
            if kw > w:
                break
            if km > m:
                continue
            extra = kw
            if kp > p:
                extra += a * (kp - p)
            if kd > d:
                extra += b * (kd - d)
            if extra <= w:
                dominated = True
                recent = [k] + recent[:RECENT - 1]
                break
        if not dominated:
            kept.append(e)
            insort(by_w, (w, p, d, m))
    return kept
