"""The partitioner's exact search: a DP over (stage, first layer) states, pruned by bounds.

A state (k, i) says hosts 0..k-1 cover layers [0, i); it holds partial plans as entries
(quality used, W = sum of P + N*D so far, max P, max D, trace). Host k's stage options from layer
i are grown one layer at a time as count vectors (how many layers at each precision: P, D and
memory depend only on those), each carrying its least quality assignment. Three exact reductions
keep it small:

- bound-raised maxima (bounds.py): max P and max D of an entry are raised to lower bounds on the
  final maxima, so entries that differ only below them merge;
- dominance: an entry no better than another in all four measures, or a partial stage no better
  in (quality, P, D, memory), can never finish better, so it is dropped;
- branch and bound: with an upper bound `ub` on T (a plan already found, or one passed in), an
  entry or stage whose lower bound W + R[k][i][budget - q] + a * max P + b * max D (R from
  bounds.rest_table, a = m_p - 1, b = N * (m_d - 1)) is not below it is dropped, and a stage stops
  growing once its own P and D alone rule it out (they only grow with more layers).

`caps` restrict every stage's P and D: the search is then exact for plans within them, which is
how partition() gets a good first upper bound cheaply.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .pareto import nondominated3, nondominated4

if TYPE_CHECKING:
    import numpy as np

    from .positions import Position

INF = math.inf
SLACK = 1e-12  # relative: a bound this close to ub is treated as reaching it (rounding noise)


class Search:
    def __init__(self, pos: list[Position], quality: list[dict[str, int]], budget: int, a: float, b: float,
                 rest: np.ndarray, max_p: list[list[float]], max_d: list[list[float]]):
        self.pos, self.budget, self.a, self.b = pos, budget, a, b
        self.layers = len(quality)
        self.costs = [[tuple(q[name] for name in p.precisions) for q in quality] for p in pos]
        self.rest = rest.tolist()
        self.max_p, self.max_d = max_p, max_d
        self.floor_p, self.floor_d = max_p[0][0], max_d[0][0]

    def raise_p(self, k: int, i: int) -> float:
        return max(self.max_p[k][i], self.floor_p)

    def raise_d(self, k: int, i: int) -> float:
        return max(self.max_d[k][i], self.floor_d)

    def run(self, ub: float = INF, cap_p: float = INF, cap_d: float = INF):
        """(T, quality, trace) of the best plan with T below ub (within caps), or None."""
        k_hosts, layers, a, b = len(self.pos), self.layers, self.a, self.b
        frontier: list[dict[int, list[tuple]]] = [dict() for _ in range(k_hosts + 1)]
        frontier[0][0] = [(0, 0.0, self.raise_p(0, 0), self.raise_d(0, 0), None)]
        limit = ub * (1 - SLACK)
        for k in range(k_hosts):
            for i in sorted(frontier[k]):
                rest = self.rest[k][i]
                entries = [e for e in nondominated4(frontier[k].pop(i))
                           if e[1] + rest[self.budget - e[0]] + a * e[2] + b * e[3] < limit]
                if entries:
                    self._expand(k, i, entries, frontier[k + 1], limit, cap_p, cap_d)
        best = None
        for q, w, mp, md, trace in frontier[k_hosts].get(layers, []):
            t = w + a * mp + b * md
            if t < limit and (best is None or t < best[0]):
                best = (t, q, trace)
        return best

    def _expand(self, k: int, i: int, entries: list[tuple], nxt: dict[int, list[tuple]], limit: float,
                cap_p: float, cap_d: float) -> None:
        pos, a, b, budget, layers = self.pos[k], self.a, self.b, self.budget, self.layers
        n_tok, last = pos.tokens, k == len(self.pos) - 1
        floor_w = min(e[1] for e in entries)
        least_q = min(e[0] for e in entries)
        low_p = min(e[2] for e in entries)
        low_d = min(e[3] for e in entries)
        spare = budget - least_q
        end_max = layers if last else layers - (len(self.pos) - k - 1)
        # after[j]: least W of what must follow a stage ending at j or later (suffix minimum).
        after = [0.0 if last else INF] * (layers + 2)
        if not last:
            rest_next = self.rest[k + 1]
            for j in range(end_max, i, -1):
                after[j] = min(after[j + 1], rest_next[j][spare])
        pre, dec, mem, cap = pos.pre, pos.dec, pos.mem, pos.capacity
        kinds = range(len(pos.precisions))
        zero = (0,) * len(pos.precisions)
        states = {zero: (0, pos.base_pre, pos.base_dec, pos.base_mem, None)}
        check_mem = None
        for j in range(i + 1, end_max + 1):
            costs = self.costs[k][j - 1]
            grown: dict[tuple, tuple] = {}
            bound_after = floor_w + after[j]
            for key, (q, sp, sd, sm, link) in states.items():
                for t in kinds:
                    nq = q + costs[t]
                    if nq > spare:
                        continue
                    nm = sm + mem[t]
                    if nm > cap:
                        continue
                    np_, nd = sp + pre[t], sd + dec[t]
                    if np_ > cap_p or nd > cap_d:
                        continue
                    if (bound_after + np_ + n_tok * nd + a * (np_ if np_ > low_p else low_p)
                            + b * (nd if nd > low_d else low_d)) >= limit:
                        continue
                    nkey = key[:t] + (key[t] + 1,) + key[t + 1:]
                    old = grown.get(nkey)
                    if old is None or nq < old[0]:
                        grown[nkey] = (nq, np_, nd, nm, (link, t))
            if not grown:
                return
            if check_mem is None:
                # Memory matters for dominance only if some stage could still run out of it.
                check_mem = pos.base_mem + (end_max - i) * max(mem) > cap
            if check_mem:
                kept = nondominated4([(q, sp, sd, sm, key, link) for key, (q, sp, sd, sm, link) in grown.items()])
                states = {e[4]: (e[0], e[1], e[2], e[3], e[5]) for e in kept}
            else:
                kept = nondominated3([(q, sp, sd, sm, key, link) for key, (q, sp, sd, sm, link) in grown.items()])
                states = {e[4]: (e[0], e[1], e[2], e[3], e[5]) for e in kept}
            if last and j != layers:
                continue
            self._emit(k, j, entries, states, nxt, limit, least_q, floor_w, low_p, low_d)

    def _emit(self, k: int, j: int, entries: list[tuple], states: dict, nxt: dict[int, list[tuple]],
              limit: float, least_q: int, floor_w: float, low_p: float, low_d: float) -> None:
        """Stage k ends at j: combine its options with the entries into state (k + 1, j)."""
        a, b, budget, n_tok = self.a, self.b, self.budget, self.pos[k].tokens
        rest = self.rest[k + 1][j]
        if rest[budget - least_q] == INF:
            return
        rp, rd = self.raise_p(k + 1, j), self.raise_d(k + 1, j)
        options = []
        for q, sp, sd, _, link in states.values():
            w = sp + n_tok * sd
            op, od = (sp if sp > rp else rp), (sd if sd > rd else rd)
            if (floor_w + w + rest[budget - least_q - q] + a * (op if op > low_p else low_p)
                    + b * (od if od > low_d else low_d)) < limit:
                options.append((q, w, op, od, link))
        if not options:
            return
        options = nondominated4(options)
        bucket = nxt.setdefault(j, [])
        for eq, ew, ep, ed, trace in entries:
            room = budget - eq
            for q, w, op, od, link in options:
                if q > room:
                    continue
                mp, md, nw = (ep if ep > op else op), (ed if ed > od else od), ew + w
                if nw + rest[room - q] + a * mp + b * md < limit:
                    bucket.append((eq + q, nw, mp, md, (trace, link)))


def unwind(trace, pos: list[Position]) -> list[tuple[str, ...]]:
    """A trace -> the precisions of each stage, in layer order."""
    stages = []
    while trace is not None:
        trace, link = trace
        stages.append(link)
    out = []
    for k, link in enumerate(reversed(stages)):
        precs = []
        while link is not None:
            link, t = link
            precs.append(pos[k].precisions[t])
        out.append(tuple(reversed(precs)))
    return out
