"""Tuning the Lagrangian lower bound on T (bounds.RestTable with weights lam, mu).

For any lam >= 0 summing to b = N * (m_d - 1) and mu >= 0 summing to a = m_p - 1, the weighted
cost sum_s P_s * (1 + mu_s) + D_s * (N + lam_s) of a plan is at most its T, so the least weighted
cost over all plans (quality and contiguity kept, memory dropped) is a lower bound on the optimum.
Its best weights put more on the stages that would otherwise be overloaded, which is what makes
the bound see pipeline balance; the plain bound (all the weight on the running maxima) does not.
Projected supergradient ascent with Polyak steps towards the upper bound finds good weights in a
few dozen DPs; any weights give a valid bound, so stopping early costs tightness, never exactness.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Callable

import numpy as np

from .bounds import RestTable

ROUNDS = 30  # supergradient steps at most

if TYPE_CHECKING:
    from .positions import Position


def simplex_projection(v: np.ndarray, total: float) -> np.ndarray:
    """The nearest point of {x >= 0, sum x = total} to v."""
    if total <= 0:
        return np.zeros_like(v)
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - total
    r = np.nonzero(u - css / np.arange(1, len(u) + 1) > 0)[0][-1]
    return np.maximum(v - css[r] / (r + 1), 0.0)


def tune(pos: list[Position], names: list[str], quality: list[dict[str, int]], budget: int, a: float, b: float,
         evaluate: Callable[[list[tuple[int, int]]], float], ub: float, rounds: int = ROUNDS
         ) -> tuple[RestTable, float, list[tuple[int, int]] | None]:
    """(the RestTable of the best weights found, whose rest[0, 0, budget] is the bound; the best
    T among the relaxation's optima that are real plans, by `evaluate` (inf when none), below ub;
    that plan's (host, precision index) per layer)."""
    k_hosts = len(pos)
    lam, mu = np.full(k_hosts, b / k_hosts), np.full(k_hosts, a / k_hosts)
    best, best_value, scale, stale = None, -math.inf, 1.0, 0
    found, found_path = math.inf, None
    for _ in range(rounds):
        table = RestTable(pos, names, quality, budget, lam, mu, keep_choices=True)
        value = table.rest[0, 0, budget]
        if math.isinf(value):
            return table, found, found_path
        path = table.path(budget)
        t = evaluate(path)
        if t < found and t < ub:
            found, found_path = t, path
        if value > best_value:
            best, best_value, stale = table, value, 0
        else:
            stale += 1
            if stale >= 3:
                scale, stale = scale / 2, 0
        target = min(ub, found)
        if k_hosts == 1 or a + b == 0 or value >= target * (1 - 1e-9):
            break
        if math.isinf(target):
            target = value * 1.1  # no plan yet: aim a tenth above the bound
        pre_s, dec_s = np.zeros(k_hosts), np.zeros(k_hosts)
        for k, p in enumerate(pos):
            pre_s[k], dec_s[k] = p.base_pre, p.base_dec
        for k, tt in path:
            pre_s[k] += table.pre[k, tt]
            dec_s[k] += table.dec[k, tt]
        g_lam = dec_s - dec_s.mean() if b > 0 else np.zeros(k_hosts)
        g_mu = pre_s - pre_s.mean() if a > 0 else np.zeros(k_hosts)
        # A Polyak step per block: P and D differ in scale by orders of magnitude, and one joint
        # step would be sized by the larger (usually the less important) of the two.
        gap = scale * (target - value) / ((b > 0) + (a > 0))
        n_lam, n_mu = float(g_lam @ g_lam), float(g_mu @ g_mu)
        if n_lam <= 1e-18 and n_mu <= 1e-18:
            break  # every stage equally loaded: no better weights in reach of a step
        if n_lam > 1e-18:
            lam = simplex_projection(lam + gap / n_lam * g_lam, b)
        if n_mu > 1e-18:
            mu = simplex_projection(mu + gap / n_mu * g_mu, a)
    return best, found, found_path
