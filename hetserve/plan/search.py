"""The partitioner's exact search: a DP over (stage, first layer) states, pruned by bounds.

A state (k, i) says hosts 0..k-1 cover layers [0, i); it holds partial plans as entries
(quality used, W = sum of P + N*D so far, max P, max D, trace). Host k's stage options from layer
i are grown one layer at a time as count vectors (how many layers at each precision: P, D and
memory depend only on those), each carrying its least quality assignment, and combined with the
entries into state (k + 1, end). Exact reductions keep it small:

- bound-raised maxima (bounds.minimax_table): max P and max D of an entry are raised to lower
  bounds on the final maxima, so entries that differ only below them merge;
- weak dominance (pareto.py), for entries, stage options and partial stages alike;
- branch and bound against an upper bound ub on T: an entry, a stage option or a partial stage
  whose lower bound is not below ub is dropped. Two bounds, the larger counts: the plain one,
  W + R[k][i][budget - q] + a * max P + b * max D with R the least W of the rest (a = m_p - 1,
  b = N * (m_d - 1)); and the dual one, W + (lam_0 + .. + lam_{k-1}) * max D + (mu_0 + ..) * max P
  + the rest's least Lagrangian cost (bounds.RestTable with dual.py's weights). A partial stage is
  bounded through `after` tables (the rest counted from its next layer), and its P and D only grow
  with more layers, so pruning it prunes every longer stage grown from it.

`beam` turns it into a heuristic: each state keeps only its entries of least bound (and each
stage length its partial stages of least bound), which finds a good first plan quickly.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .pareto import weakly_nondominated

if TYPE_CHECKING:
    from .bounds import RestTable
    from .positions import Position

INF = math.inf
STAGE_BEAM = 4  # with a beam of n entries per state, n * STAGE_BEAM partial stages per length
SLACK = 1e-12  # relative: a bound this close to ub is treated as reaching it (rounding noise)


class Search:
    def __init__(self, pos: list[Position], quality: list[dict[str, int]], budget: int, a: float, b: float,
                 plain: RestTable, dual: RestTable, max_p: list[list[float]], max_d: list[list[float]]):
        self.pos, self.budget, self.a, self.b = pos, budget, a, b
        self.layers = len(quality)
        self.costs = [[tuple(q[name] for name in p.precisions) for q in quality] for p in pos]
        self.rest, self.after = plain.rest.tolist(), plain.after.tolist()
        self.dual_rest, self.dual_after = dual.rest.tolist(), dual.after.tolist()
        # Weights of the dual bound: per host, and the totals of the hosts before each stage.
        self.lam, self.mu = [float(x) for x in dual.lam], [float(x) for x in dual.mu]
        self.lam_before = [sum(self.lam[:k]) for k in range(len(pos) + 1)]
        self.mu_before = [sum(self.mu[:k]) for k in range(len(pos) + 1)]
        self.max_p, self.max_d = max_p, max_d
        self.floor_p, self.floor_d = max_p[0][0], max_d[0][0]

    def raise_p(self, k: int, i: int) -> float:
        return max(self.max_p[k][i], self.floor_p)

    def raise_d(self, k: int, i: int) -> float:
        return max(self.max_d[k][i], self.floor_d)

    def bound(self, k: int, i: int, q: int, w: float, mp: float, md: float) -> float:
        """Lower bound on T of any completion of this entry of state (k, i): the larger of the
        plain one and the dual one."""
        left = self.budget - q
        plain = w + self.rest[k][i][left] + self.a * mp + self.b * md
        dual = w + self.lam_before[k] * md + self.mu_before[k] * mp + self.dual_rest[k][i][left]
        return plain if plain > dual else dual

    def run(self, ub: float = INF, beam: int | None = None):
        """(T, quality, trace) of the best plan with T below ub, or None. With a beam, only that
        many entries of each state, those of least bound, are expanded: a heuristic."""
        k_hosts, layers, a, b = len(self.pos), self.layers, self.a, self.b
        frontier: list[dict[int, list[tuple]]] = [dict() for _ in range(k_hosts + 1)]
        frontier[0][0] = [(0, 0.0, self.raise_p(0, 0), self.raise_d(0, 0), None)]
        limit = ub * (1 - SLACK)
        for k in range(k_hosts):
            for i in sorted(frontier[k]):
                scored = [(self.bound(k, i, *e[:4]), e) for e in weakly_nondominated(frontier[k].pop(i), a, b)]
                if beam is not None and len(scored) > beam:
                    scored.sort(key=lambda s: s[0])
                    scored = sorted(scored[:beam], key=lambda s: s[1][:2])  # back in (q, w) order
                entries = [e for lb, e in scored if lb < limit]
                if entries:
                    self._expand(k, i, entries, frontier[k + 1], limit, beam)
        best = None
        for q, w, mp, md, trace in frontier[k_hosts].get(layers, []):
            t = w + a * mp + b * md
            if t < limit and (best is None or t < best[0]):
                best = (t, q, trace)
        return best

    def _expand(self, k: int, i: int, entries: list[tuple], nxt: dict[int, list[tuple]], limit: float,
                beam: int | None) -> None:
        """Grow host k's stage from layer i and pass each end's options to _emit."""
        pos, a, b, budget, layers = self.pos[k], self.a, self.b, self.budget, self.layers
        n_tok, last = pos.tokens, k == len(self.pos) - 1
        # What every entry pays at least: the floors the stage's bounds add to.
        floor_w = min(e[1] for e in entries)
        floor_dual = min(e[1] + self.lam_before[k] * e[3] + self.mu_before[k] * e[2] for e in entries)
        least_q = min(e[0] for e in entries)
        low_p = min(e[2] for e in entries)
        low_d = min(e[3] for e in entries)
        spare = budget - least_q
        wp, wd = 1 + self.mu[k], n_tok + self.lam[k]
        end_max = layers if last else layers - (len(self.pos) - k - 1)
        pre, dec, mem, cap = pos.pre, pos.dec, pos.mem, pos.capacity
        kinds = range(len(pos.precisions))
        zero = (0,) * len(pos.precisions)
        states = {zero: (0, pos.base_pre + n_tok * pos.base_dec, pos.base_pre, pos.base_dec, pos.base_mem, None)}
        check_mem = pos.base_mem + (end_max - i) * max(mem) > cap
        for j in range(i + 1, end_max + 1):
            costs = self.costs[k][j - 1]
            after, dual_after = self.after[k][j], self.dual_after[k][j]
            grown: dict[tuple, tuple] = {}
            for key, (q, _, sp, sd, sm, link) in states.items():
                for t in kinds:
                    nq = q + costs[t]
                    if nq > spare:
                        continue
                    nm = sm + mem[t]
                    if nm > cap:
                        continue
                    np_, nd = sp + pre[t], sd + dec[t]
                    left = spare - nq
                    if floor_dual + np_ * wp + nd * wd + dual_after[left] >= limit:
                        continue
                    nw = np_ + n_tok * nd
                    if (floor_w + after[left] + nw + a * (np_ if np_ > low_p else low_p)
                            + b * (nd if nd > low_d else low_d)) >= limit:
                        continue
                    nkey = key[:t] + (key[t] + 1,) + key[t + 1:]
                    old = grown.get(nkey)
                    if old is None or nq < old[0]:
                        grown[nkey] = (nq, nw, np_, nd, nm, (link, t))
            if not grown:
                return
            kept = weakly_nondominated([v + (key,) for key, v in grown.items()], a, b, memory=check_mem)
            if beam is not None and len(kept) > beam * STAGE_BEAM:
                kept.sort(key=lambda e: floor_dual + e[2] * wp + e[3] * wd + dual_after[spare - e[0]])
                kept = kept[:beam * STAGE_BEAM]
            states = {e[6]: e[:6] for e in kept}
            if last and j != layers:
                continue
            self._emit(k, j, entries, states, nxt, limit, least_q, floor_w, floor_dual, low_p, low_d)

    def _emit(self, k: int, j: int, entries: list[tuple], states: dict, nxt: dict[int, list[tuple]],
              limit: float, least_q: int, floor_w: float, floor_dual: float, low_p: float, low_d: float) -> None:
        """Stage k ends at j: combine its options with the entries into state (k + 1, j)."""
        a, b, budget, n_tok = self.a, self.b, self.budget, self.pos[k].tokens
        rest, dual_rest = self.rest[k + 1][j], self.dual_rest[k + 1][j]
        spare = budget - least_q
        if rest[spare] == INF:
            return
        wp, wd = 1 + self.mu[k], n_tok + self.lam[k]
        lam_next, mu_next = self.lam_before[k + 1], self.mu_before[k + 1]
        rp, rd = self.raise_p(k + 1, j), self.raise_d(k + 1, j)
        options = []
        for q, w, sp, sd, _, link in states.values():
            if floor_dual + sp * wp + sd * wd + dual_rest[spare - q] >= limit:
                continue
            op, od = (sp if sp > rp else rp), (sd if sd > rd else rd)
            if (floor_w + w + rest[spare - q] + a * (op if op > low_p else low_p)
                    + b * (od if od > low_d else low_d)) < limit:
                options.append((q, w, op, od, link))
        if not options:
            return
        options = weakly_nondominated(options, a, b)
        bucket = nxt.setdefault(j, [])
        for q, w, op, od, link in options:
            # Entries come sorted by (q, w). One at or below the option's maxima gives a product with
            # the least maxima this option allows, so any later product with no smaller w is
            # dominated by it.
            least_w = INF
            room_max = budget - q
            fixed_plain = w + a * op + b * od
            fixed_dual = w + lam_next * od + mu_next * op
            for eq, ew, ep, ed, trace in entries:
                if eq > room_max:
                    break
                if ew >= least_w:
                    continue
                left = room_max - eq
                if ep <= op and ed <= od:
                    least_w = ew
                    if ew + fixed_plain + rest[left] < limit and ew + fixed_dual + dual_rest[left] < limit:
                        bucket.append((eq + q, ew + w, op, od, (trace, link)))
                    continue
                mp, md, nw = (ep if ep > op else op), (ed if ed > od else od), ew + w
                if (nw + rest[left] + a * mp + b * md < limit
                        and nw + lam_next * md + mu_next * mp + dual_rest[left] < limit):
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
