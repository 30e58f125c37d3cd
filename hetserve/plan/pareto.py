"""Nondominated filters for the partitioner's search (every measure minimized).

Entries are tuples whose first measures are compared; the rest rides along. Sorting by the first
measure means an entry can only be dominated by one kept before it, and the kept set is grouped by
the values of the last measures (few distinct ones once maxima are raised to their bounds), so a
check looks at one best value per group instead of every kept entry.
"""

from __future__ import annotations


def nondominated4(entries: list[tuple]) -> list[tuple]:
    """Entries (a, b, c, d, ...) not dominated in (a, b, c, d) by another; of equal ones, one."""
    entries.sort(key=lambda e: (e[0], e[1], e[2], e[3]))
    kept: list[tuple] = []
    best: dict[tuple[float, float], float] = {}  # (c, d) of kept entries -> least b among them
    for e in entries:
        b, c, d = e[1], e[2], e[3]
        if any(gb <= b and gc <= c and gd <= d for (gc, gd), gb in best.items()):
            continue
        kept.append(e)
        best[(c, d)] = b
    return kept


def nondominated3(entries: list[tuple]) -> list[tuple]:
    """Entries (a, b, c, ...) not dominated in (a, b, c): a sweep over a, a staircase in (b, c)."""
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    kept: list[tuple] = []
    stair: list[tuple[float, float]] = []  # kept (b, c), b ascending and c descending
    for e in entries:
        b, c = e[1], e[2]
        if any(sb <= b and sc <= c for sb, sc in stair):
            continue
        kept.append(e)
        stair = [s for s in stair if not (b <= s[0] and c <= s[1])] + [(b, c)]
    return kept
