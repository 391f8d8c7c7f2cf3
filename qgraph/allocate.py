"""Bit allocation: one candidate per site, minimizing the predicted error under a cost budget.

With the per-site errors e_i(c) of ``qgraph.sensitivity`` (additive: the prediction for a configuration is
Σ_i e_i(c_i)) and costs k_i(c) (weight bytes params·bits/8, or 1 per 16-bit activation tensor), the choice

    minimize Σ_i e_i(c_i)   subject to   Σ_i k_i(c_i) <= B          (multiple-choice knapsack)

is solved exactly by dynamic programming over the cost (Sinha & Zoltners 1979; the formulation of
HAWQ-V3, Yao et al. 2021 §3.4, solved there as an integer program). Costs are counted in units of
``unit = ceil(Σ max cost / resolution)`` and each rounded *up*, so the answer always fits the budget and is
exact whenever the costs are multiples of the unit (``resolution`` >= the total cost in natural units).
The same table gives the whole accuracy-size Pareto frontier, and the smallest configuration whose
predicted error stays under a target (``min_cost``). ``greedy`` (drop the bits of the site with the least
error increase per byte saved, repeatedly) is kept for comparison.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from qgraph.errors import OptionError

#: site -> candidate -> (cost, error)
Options = dict[str, dict[str, tuple[float, float]]]


@dataclass
class Allocation:
    choice: dict[str, str]
    cost: float
    error: float
    method: str
    budget: float | None = None
    target: float | None = None
    feasible: bool = True
    notes: dict = field(default_factory=dict)

    def rows(self, options: Options) -> list[dict]:
        return [{"site": s, "choice": c, "cost": options[s][c][0], "error": options[s][c][1]}
                for s, c in self.choice.items()]


def _totals(options: Options, choice: dict[str, str]) -> tuple[float, float]:
    return (sum(options[s][c][0] for s, c in choice.items()), sum(options[s][c][1] for s, c in choice.items()))


def _check(options: Options) -> None:
    if not options:
        raise OptionError("nothing to allocate: no site has a candidate")
    for s, cands in options.items():
        if not cands:
            raise OptionError(f"site '{s}' has no candidate")


def _table(options: Options, resolution: int):
    """DP over integer cost units: best[c] = least error at total units exactly c; choice per site."""
    sites = list(options)
    top = sum(max(k for k, _ in options[s].values()) for s in sites)
    unit = max(1.0, math.ceil(top / resolution)) if top > 0 else 1.0
    units = {s: {c: int(math.ceil(k / unit - 1e-9)) for c, (k, _) in options[s].items()} for s in sites}
    size = sum(max(u.values()) for u in units.values()) + 1
    best = np.full(size, np.inf)
    best[0] = 0.0
    picks = np.full((len(sites), size), -1, np.int16)
    for i, s in enumerate(sites):
        new = np.full(size, np.inf)
        for j, (c, (_, e)) in enumerate(options[s].items()):
            k = units[s][c]
            cand = np.full(size, np.inf)
            cand[k:] = best[:size - k] + e
            better = cand < new
            new[better] = cand[better]
            picks[i, better] = j
        best = new
    return sites, unit, best, picks


def _backtrack(options: Options, sites, unit, picks, c: int) -> dict[str, str]:
    units = {s: {cand: int(math.ceil(k / unit - 1e-9)) for cand, (k, _) in options[s].items()} for s in sites}
    choice = {}
    for i in range(len(sites) - 1, -1, -1):
        s = sites[i]
        j = int(picks[i, c])
        cand = list(options[s])[j]
        choice[s] = cand
        c -= units[s][cand]
    return {s: choice[s] for s in sites}


def solve(options: Options, budget: float, *, resolution: int = 20000) -> Allocation:
    """Least total error with total cost <= ``budget`` (exact DP; see the module doc)."""
    _check(options)
    sites, unit, best, picks = _table(options, resolution)
    limit = min(len(best) - 1, int(math.floor(budget / unit + 1e-9)))
    if limit < 0 or not np.isfinite(best[:limit + 1]).any():
        cheapest = {s: min(c, key=lambda x: c[x][0]) for s, c in options.items()}
        cost, err = _totals(options, cheapest)
        return Allocation(cheapest, cost, err, "dp", budget=budget, feasible=False,
                          notes={"why": f"the smallest configuration needs {cost:.6g} > budget {budget:.6g}"})
    c = int(np.argmin(best[:limit + 1]))
    choice = _backtrack(options, sites, unit, picks, c)
    cost, err = _totals(options, choice)
    return Allocation(choice, cost, err, "dp", budget=budget, notes={"unit": unit})


def min_cost(options: Options, target: float, *, resolution: int = 20000) -> Allocation:
    """The cheapest configuration whose total error is <= ``target`` (or the least-error one, infeasible)."""
    _check(options)
    sites, unit, best, picks = _table(options, resolution)
    ok = np.flatnonzero(best <= target * (1 + 1e-12))
    feasible = ok.size > 0
    c = int(ok[0]) if feasible else int(np.argmin(best))
    choice = _backtrack(options, sites, unit, picks, c)
    cost, err = _totals(options, choice)
    notes = {"unit": unit}
    if not feasible:
        notes["why"] = f"the least predicted error {err:.4g} is above the target {target:.4g}"
    return Allocation(choice, cost, err, "dp", target=target, feasible=feasible, notes=notes)


def pareto(options: Options, *, resolution: int = 20000) -> list[Allocation]:
    """Every configuration on the cost-error frontier (each strictly better than all cheaper ones)."""
    _check(options)
    sites, unit, best, picks = _table(options, resolution)
    out, lowest = [], np.inf
    for c in np.flatnonzero(np.isfinite(best)):
        if best[c] < lowest - 1e-15:
            lowest = best[c]
            choice = _backtrack(options, sites, unit, picks, int(c))
            cost, err = _totals(options, choice)
            out.append(Allocation(choice, cost, err, "dp"))
    return out


def greedy(options: Options, budget: float) -> Allocation:
    """Start every site at its most expensive candidate; while over budget, take the step (to a cheaper
    candidate of one site) with the least error increase per unit of cost saved."""
    _check(options)
    choice = {s: max(c, key=lambda x: (c[x][0], -c[x][1])) for s, c in options.items()}
    cost, _ = _totals(options, choice)
    while cost > budget + 1e-9:
        best = None
        for s, c in options.items():
            k0, e0 = c[choice[s]]
            for cand, (k, e) in c.items():
                if k < k0:
                    ratio = (e - e0) / (k0 - k)
                    if best is None or ratio < best[0]:
                        best = (ratio, s, cand)
        if best is None:
            break
        choice[best[1]] = best[2]
        cost, _ = _totals(options, choice)
    cost, err = _totals(options, choice)
    return Allocation(choice, cost, err, "greedy", budget=budget, feasible=cost <= budget + 1e-9)


def brute_force(options: Options, budget: float) -> tuple[float, dict[str, str]] | None:
    """Every combination (for tests on small cases): the least error within ``budget``."""
    import itertools
    sites = list(options)
    best = None
    for combo in itertools.product(*(list(options[s]) for s in sites)):
        choice = dict(zip(sites, combo))
        cost, err = _totals(options, choice)
        if cost <= budget + 1e-9 and (best is None or err < best[0] - 1e-15):
            best = (err, choice)
    return best
