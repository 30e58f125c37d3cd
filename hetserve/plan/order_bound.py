"""A lower bound on T over every pipeline order of every subset of the hosts: what a plan found by
the heuristic orders (planner.host_orders past MAX_EXACT_ORDERS) is measured against.

The relaxation forgets the order and contiguity: each layer goes to any host at any precision,
every stage pays the cheapest of its fixed costs (the head or the send, not both), and a plan of s
stages pays the s smallest of them. What it keeps is the quality budget and, through the maxima,
balance, in two ways whose larger bound counts:

- floors: max D is at least the least D with which the hosts, at their fastest precision and
  within memory, can hold all layers (the s hosts that hold the most); likewise max P. Plus the
  least weighted sum W, that bound is the "plain" one.
- Lagrangian: for weights lam >= 0 summing to b and mu >= 0 summing to a, T is at least
  sum over hosts of P_h * (1 + mu_h) + D_h * (N + lam_h), whose least value over the relaxation
  is a knapsack of the layers over quality; supergradient steps towards the plan's T tune the
  weights, as dual.py does for one order.

A bound, not an estimate: the reported gap (T_plan / bound - 1) is an upper bound on how far the
plan can be from the best over all orders.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from .dual import simplex_projection

if TYPE_CHECKING:
    from .partition import HostCosts, Objective

INF = math.inf
ROUNDS = 15


class Relaxation:
    """The order-free relaxation for fixed micro-batch sizes and a stage count."""

    def __init__(self, costs: list[HostCosts], names: list[str], quality: list[dict[str, int]], budget: int,
                 objective: Objective, stages: int):
        self.names, self.budget, self.stages = names, budget, stages
        self.tokens = objective.output_tokens
        self.a = objective.prefill_microbatches - 1
        self.b = objective.output_tokens * (objective.decode_microbatches - 1)
        self.pre = np.array([[h.layer_pre[p] for p in names] for h in costs])
        self.dec = np.array([[h.layer_dec[p] for p in names] for h in costs])
        usable = np.isfinite(self.pre) & np.isfinite(self.dec) & np.isfinite(
            np.array([[h.layer_bytes[p] for p in names] for h in costs]))
        self.pre, self.dec = np.where(usable, self.pre, INF), np.where(usable, self.dec, INF)
        self.base_pre = np.array([h.fixed_pre + min(h.head_pre, h.send_pre) for h in costs])
        self.base_dec = np.array([h.fixed_dec + min(h.head_dec, h.send_dec) for h in costs])
        self.costs = np.array([[min(q[p], budget + 1) for p in names] for q in quality])
        smallest = [min((h.layer_bytes[p] for p in names if math.isfinite(h.layer_bytes[p])), default=INF)
                    + h.kv_bytes_per_layer for h in costs]
        self.most = [int(h.capacity / m * (1 + 1e-9)) if m > 0 else len(quality) for h, m in zip(costs, smallest)]

    def floor(self, per_layer: np.ndarray, base: np.ndarray) -> float:
        """Least max over stages of base_h + n_h * per_layer_h with the s largest n_h summing to L."""
        layers, fastest = len(self.costs), per_layer.min(axis=1)

        def holds(limit: float) -> int:
            n = [0 if limit < base[h] or not math.isfinite(fastest[h]) else self.most[h] if fastest[h] <= 0
                 else min(self.most[h], int((limit - base[h]) / fastest[h] * (1 + 1e-12))) for h in range(len(base))]
            return sum(sorted(n, reverse=True)[:self.stages])

        lo, hi = 0.0, float(np.max(np.where(np.isfinite(fastest), base + layers * fastest, 0.0)))
        if holds(hi) < layers:
            return INF
        for _ in range(60):  # bisection to float precision: lo never holds, hi always does
            mid = (lo + hi) / 2
            lo, hi = (lo, mid) if holds(mid) >= layers else (mid, hi)
        return lo

    def least(self, lam: np.ndarray, mu: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        """(least weighted cost, P per host, D per host) of the relaxation under these weights."""
        w = self.pre * (1 + mu)[:, None] + self.dec * (self.tokens + lam)[:, None]
        host = np.argmin(w, axis=0)  # the cheapest host for each precision
        per_p = w[host, np.arange(len(self.names))]
        width = self.budget + 1
        value = np.zeros(width)  # least cost of the layers so far within q units
        choice = np.zeros((len(self.costs), width), dtype=np.intp)
        padded = np.full(2 * width, INF)
        for i, cost in enumerate(self.costs):
            padded[width:] = value
            cand = padded[width + np.arange(width)[None, :] - cost[:, None]] + per_p[:, None]
            choice[i] = cand.argmin(axis=0)
            value = cand.min(axis=0)
        base = self.base_pre * (1 + mu) + self.base_dec * (self.tokens + lam)
        used = np.argsort(base)[:self.stages]
        total = float(value[-1] + base[used].sum())
        pre_h, dec_h = np.zeros(len(base)), np.zeros(len(base))
        pre_h[used], dec_h[used] = self.base_pre[used], self.base_dec[used]
        if math.isfinite(total):
            q = self.budget
            for i in range(len(self.costs) - 1, -1, -1):
                t = choice[i, q]
                pre_h[host[t]] += self.pre[host[t], t]
                dec_h[host[t]] += self.dec[host[t], t]
                q -= int(self.costs[i, t])
        return total, pre_h, dec_h

    def plain(self) -> float:
        w, _, _ = self.least(np.zeros(len(self.base_pre)), np.zeros(len(self.base_pre)))
        return w + self.a * self.floor(self.pre, self.base_pre) + self.b * self.floor(self.dec, self.base_dec)

    def lagrangian(self, target: float) -> float:
        n = len(self.base_pre)
        lam, mu, best, scale = np.full(n, self.b / n), np.full(n, self.a / n), -INF, 1.0
        for _ in range(ROUNDS):
            value, pre_h, dec_h = self.least(lam, mu)
            if not math.isfinite(value) or value >= target:
                return max(best, value)
            scale = scale if value > best else scale / 2
            best = max(best, value)
            g_lam, g_mu = dec_h - dec_h.mean(), pre_h - pre_h.mean()
            gap = scale * (target - value) / ((self.b > 0) + (self.a > 0) or 1)
            n_lam, n_mu = float(g_lam @ g_lam), float(g_mu @ g_mu)
            if n_lam <= 1e-18 and n_mu <= 1e-18:
                break
            if self.b > 0 and n_lam > 1e-18:
                lam = simplex_projection(lam + gap / n_lam * g_lam, self.b)
            if self.a > 0 and n_mu > 1e-18:
                mu = simplex_projection(mu + gap / n_mu * g_mu, self.a)
        return best


def order_free_bound(relaxations: list[Relaxation], target: float) -> float:
    """The least, over the relaxations (one per micro-batch size and stage count), of the larger of
    their plain and Lagrangian bounds; target: the T of the plan in hand (steers the steps)."""
    plain = sorted(((r.plain(), r) for r in relaxations), key=lambda x: x[0])
    bound = INF
    for low, r in plain:
        if low >= bound:
            break  # sorted: no later relaxation can lower the minimum
        bound = min(bound, max(low, r.lagrangian(target)))
    return bound
