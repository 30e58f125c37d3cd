"""A lower bound on T over every pipeline order of every subset of the hosts: what a plan found by
the heuristic orders (planner.host_orders past MAX_EXACT_ORDERS) is measured against.

The relaxation forgets the order and contiguity: each layer goes to any host at any precision,
every stage pays the cheapest of its fixed costs (the head or the send, not both), and a plan of s
stages pays the s smallest of them. What it keeps is the quality budget and, through the maxima,
balance, in two ways whose larger bound counts:

- floors: max D is at least the least D with which the hosts, at their fastest precision and
  within memory, can hold all layers (the s hosts that hold the most); likewise max P. Plus the
  least weighted sum W, that bound is the "plain" one.
- Lagrangian: for weights lam >= 0 summing to b and mu >= 0 summing to a, and nu >= 0, T is at
  least sum over hosts of P_h * (1 + mu_h) + D_h * (N + lam_h) + nu_h * (memory_h - capacity_h)
  (each host's memory priced against its capacity), whose least value over the relaxation is a
  knapsack of the layers over quality; supergradient steps towards the plan's T tune the
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
ROUNDS = 30  # supergradient steps per relaxation at most


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
        self.mem = np.where(usable, np.array([[h.layer_bytes[p] if math.isfinite(h.layer_bytes[p]) else 0.0
                                               for p in names] for h in costs])
                            + np.array([h.kv_bytes_per_layer for h in costs])[:, None], 0.0)
        self.capacity = np.array([h.capacity for h in costs])
        self.ends = (min(h.embed_bytes for h in costs), min(h.head_bytes for h in costs))  # on some host each
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

    def knapsack(self, per_p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(least sum over layers of per_p[precision] within q quality units for each q, the
        precision of each layer at each q): the layers' choices are independent but for quality."""
        width = self.budget + 1
        value = np.zeros(width)
        choice = np.zeros((len(self.costs), width), dtype=np.intp)
        padded = np.full(2 * width, INF)
        for i, cost in enumerate(self.costs):
            padded[width:] = value
            cand = padded[width + np.arange(width)[None, :] - cost[:, None]] + per_p[:, None]
            choice[i] = cand.argmin(axis=0)
            value = cand.min(axis=0)
        return value, choice

    def least(self, lam: np.ndarray, mu: np.ndarray, nu: np.ndarray) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """(least weighted cost, P, D and memory per host) of the relaxation under these weights;
        nu >= 0 prices each host's memory against its capacity (a plan within memory pays at most
        nothing for it)."""
        w = self.pre * (1 + mu)[:, None] + self.dec * (self.tokens + lam)[:, None] + self.mem * nu[:, None]
        host = np.argmin(w, axis=0)  # the cheapest host for each precision
        value, choice = self.knapsack(w[host, np.arange(len(self.names))])
        base = self.base_pre * (1 + mu) + self.base_dec * (self.tokens + lam)
        used = np.argsort(base)[:self.stages]
        # The s used hosts offer at most the s largest priced capacities; the embedding and the head
        # sit on some host each, priced at least at the cheapest.
        offered = np.sort(nu * self.capacity)[::-1][:self.stages].sum()
        total = float(value[-1] + base[used].sum() - offered + nu.min() * sum(self.ends))
        pre_h, dec_h, mem_h = np.zeros(len(base)), np.zeros(len(base)), np.zeros(len(base))
        pre_h[used], dec_h[used] = self.base_pre[used], self.base_dec[used]
        if math.isfinite(total):
            q = self.budget
            for i in range(len(self.costs) - 1, -1, -1):
                t = choice[i, q]
                pre_h[host[t]] += self.pre[host[t], t]
                dec_h[host[t]] += self.dec[host[t], t]
                mem_h[host[t]] += self.mem[host[t], t]
                q -= int(self.costs[i, t])
        return total, pre_h, dec_h, mem_h

    def fits(self) -> bool:
        """Whether `stages` hosts can hold the model at all (else no plan of that many stages): the
        least memory of the layers within the quality budget, with the embedding and the head,
        against the largest capacities, and every layer at its smallest against each host's."""
        least_memory = self.knapsack(np.where(self.mem > 0, self.mem, INF).min(axis=0))[0][-1] + sum(self.ends)
        offered = np.sort(self.capacity)[::-1][:self.stages].sum()
        return least_memory <= offered and math.isfinite(self.floor(self.dec, self.base_dec))

    def plain(self) -> float:
        zero = np.zeros(len(self.base_pre))
        w = self.least(zero, zero, zero)[0]
        return w + self.a * self.floor(self.pre, self.base_pre) + self.b * self.floor(self.dec, self.base_dec)

    def lagrangian(self, target: float) -> float:
        """The best bound found by supergradient steps on (lam, mu, nu), a Polyak step per block."""
        n = len(self.base_pre)
        lam, mu, nu, best, scale = np.full(n, self.b / n), np.full(n, self.a / n), np.zeros(n), -INF, 1.0
        for _ in range(ROUNDS):
            value, pre_h, dec_h, mem_h = self.least(lam, mu, nu)
            if not math.isfinite(value) or value >= target:
                return max(best, value)
            scale = scale if value > best else scale / 2
            best = max(best, value)
            g_lam, g_mu = dec_h - dec_h.mean(), pre_h - pre_h.mean()
            g_nu = np.where((nu > 0) | (mem_h > self.capacity), mem_h - self.capacity, 0.0)
            blocks = [(g, total) for g, total in ((g_lam, self.b), (g_mu, self.a)) if total > 0]
            share = scale * (target - value) / (len(blocks) + 1)
            n_nu = float(g_nu @ g_nu)
            if all(float(g @ g) <= 1e-18 for g, _ in blocks) and n_nu <= 1e-18:
                break
            if self.b > 0 and float(g_lam @ g_lam) > 1e-18:
                lam = simplex_projection(lam + share / float(g_lam @ g_lam) * g_lam, self.b)
            if self.a > 0 and float(g_mu @ g_mu) > 1e-18:
                mu = simplex_projection(mu + share / float(g_mu @ g_mu) * g_mu, self.a)
            if n_nu > 1e-18:
                nu = np.maximum(nu + share / n_nu * g_nu, 0.0)
        return best


def order_free_bound(relaxations: list[Relaxation], target: float) -> float:
    """The least, over the relaxations (one per micro-batch size and stage count), of the larger of
    their plain and Lagrangian bounds; target: the T of the plan in hand (steers the steps)."""
    plain = sorted(((r.plain(), r) for r in relaxations if r.fits()), key=lambda x: x[0])
    bound = INF
    for low, r in plain:
        if low >= bound:
            break  # sorted: no later relaxation can lower the minimum
        bound = min(bound, max(low, r.lagrangian(target)))
    return bound
