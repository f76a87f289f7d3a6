"""Pareto frontiers of (total score, cost).

- :func:`walk_frontier`: the exact, complete frontier by an epsilon-constraint walk: from the cheapest-at-best-score
  allocation, repeatedly ask the ILP for the best score strictly below the last cost, then the cheapest allocation at
  that score (a lexicographic pair of solves). Every point it returns is non-dominated and, when it reaches the
  bottom, none is missing. Other limits (e.g. a size limit while walking latency) stay as constraints.
- :func:`hull_frontier`: for one resource without other limits, the supported points (the vertices of the
  frontier's convex hull) by the greedy LP solution of the multiple-choice knapsack: each is integral and LP-optimal
  at its cost, hence exactly optimal there. Thousands of layers take milliseconds; the points in the frontier's
  concave dents are not among them.
- :func:`sweep_frontier`: ILP optima at evenly spaced budgets (each point optimal for its budget).
- :func:`pareto_filter` / :func:`pareto_filter_nd`: non-dominated rows in 2 or more dimensions (the 3-D
  score/latency/size frontier is the filtered union of 2-D frontiers and budget-grid optima).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Iterable, Mapping

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mpq.config import choice_key
from mpq.errors import BudgetError, ConfigError
from mpq.solvers.base import (CONSTRAINTS, COST_COLUMNS, Allocation, Problem, Solver, check_table, finite_limits,
                              largest_reachable, objective_values, register_solver, restrict, smallest_reachable,
                              totals_of)
from mpq.solvers.ilp import BACKENDS, BinaryProgram, Infeasible, ilp_allocate

log = logging.getLogger(__name__)
FRONTIER_COLUMNS = ["swept", "budget", "score", *COST_COLUMNS, "exact", "method", "choice"]


def pareto_filter(points: pd.DataFrame, cost: str, score: str = "score") -> pd.DataFrame:
    """Rows not dominated in (score, cost), sorted by cost (both minimised)."""
    pts = points.sort_values([cost, score]).reset_index(drop=True)
    keep, best = [], np.inf
    for i, s in enumerate(pts[score]):
        if s < best - 1e-12 * max(1.0, abs(best) if np.isfinite(best) else 1.0):
            keep.append(i)
            best = s
    return pts.iloc[keep].reset_index(drop=True)


def pareto_filter_nd(points: pd.DataFrame, columns: Iterable[str]) -> pd.DataFrame:
    """Rows not dominated in every one of ``columns`` (all minimised); duplicates keep their first row."""
    cols = list(columns)
    values = points[cols].to_numpy(float)
    keep = []
    for i, v in enumerate(values):
        dominated = np.any(np.all(values <= v, axis=1) & np.any(values < v, axis=1))
        duplicate = any(np.array_equal(values[j], v) for j in keep)
        if not dominated and not duplicate:
            keep.append(i)
    return points.iloc[keep].reset_index(drop=True)


def _row(table, choice, fixed, swept, budget, exact, method) -> dict:
    score, costs = totals_of(table, choice, fixed)
    return {"swept": swept, "budget": budget, "score": score, **{c: costs.get(c, np.nan) for c in COST_COLUMNS},
            **{c: v for c, v in costs.items() if c not in COST_COLUMNS}, "exact": exact, "method": method,
            "choice": choice_key(choice)}


def _frame(rows: list[dict]) -> pd.DataFrame:
    extra = [c for c in dict.fromkeys(k for r in rows for k in r) if c not in FRONTIER_COLUMNS]
    return pd.DataFrame(rows, columns=FRONTIER_COLUMNS + extra)


def walk_frontier(table: pd.DataFrame, resource: str, fixed: Mapping[str, float] | None = None,
                  limits: Mapping[str, float] | None = None, objective: str | Mapping[str, float] = "score",
                  max_points: int = 200, backend: str = "highs", progress: bool = False) -> tuple[pd.DataFrame, bool]:
    """Every non-dominated point, most expensive first, up to ``max_points``; returns (frontier, complete)."""
    fixed, limits = dict(fixed or {}), finite_limits(limits)
    limits.pop(resource, None)
    check_table(table, [resource, *limits])
    c = objective_values(table, objective)
    cost = table[resource].to_numpy(float)
    prog = BinaryProgram(table, backend)
    for col, lim in limits.items():
        prog.add_row(table[col].to_numpy(float), lim - fixed.get(col, 0.0))
    rows, bound, complete = [], math.inf, False
    # A strict decrease the solvers can see: HiGHS accepts MIP solutions 1e-6 outside a (scaled) row, so cost
    # steps smaller than 1e-5 of the total are merged (the walk notices and stops rather than loop).
    gap = 1e-5 * max(float(table.groupby("layer")[resource].max().sum()), 1e-30)
    bar = tqdm(total=max_points, desc=f"exact frontier ({resource})", disable=not progress, leave=False)
    try:
        while len(rows) < max_points:
            extra = [] if math.isinf(bound) else [(cost, bound - fixed.get(resource, 0.0) - gap)]
            try:
                # the optimum here is at least the last point's score: scale to it, so that differences among
                # small scores stay above the solvers' absolute tolerances
                last = rows[-1]["score"] if rows else 0.0
                x = prog.solve(c, extra, scale=max(abs(last), 1e-6 * float(np.abs(c).mean())) or None)
            except Infeasible:
                complete = True
                break
            best = float(c[x].sum())
            try:
                cheapest = prog.solve(cost, extra + [(c, best)])  # the cheapest allocation at that score ...
            except Infeasible:  # ... which the solver's tolerances can call infeasible although x meets it
                cheapest = x
            if float(c[cheapest].sum()) <= best + 1e-12 * max(abs(best), 1.0):
                x = cheapest  # ... unless the solver's tolerance let a worse score through
            choice = dict(zip(table.loc[x, "layer"], table.loc[x, "option"]))
            row = _row(table, choice, fixed, resource, bound, True, "walk")
            if row[resource] > bound - gap / 2:
                log.warning("frontier walk stalled at %s=%.6g (solver tolerance); stopping", resource, bound)
                break
            rows.append(row)
            bound = row[resource]
            bar.update(1)
    finally:
        bar.close()
    return pareto_filter(_frame(rows), resource) if rows else _frame([]), complete


def _lower_hull(costs: np.ndarray, objs: np.ndarray) -> list[int]:
    """Indices of the options on the lower convex hull of (cost, objective), cheapest first, objective falling."""
    order = np.lexsort((objs, costs))
    pts: list[int] = []
    for i in order:  # drop dominated options: a costlier one must score strictly lower
        if pts and objs[i] >= objs[pts[-1]] - 1e-15:
            continue
        while len(pts) >= 2:
            a, b = pts[-2], pts[-1]
            # b is above the segment a -> i: not on the lower hull
            if (objs[b] - objs[a]) * (costs[i] - costs[a]) >= (objs[i] - objs[a]) * (costs[b] - costs[a]):
                pts.pop()
            else:
                break
        pts.append(i)
    return pts


def hull_frontier(table: pd.DataFrame, resource: str, fixed: Mapping[str, float] | None = None,
                  objective: str | Mapping[str, float] = "score", points: int | None = 50) -> pd.DataFrame:
    """The supported frontier points (the vertices of its convex hull), every one proven optimal for its cost.

    With one resource the LP relaxation of the multiple-choice knapsack is solved greedily: from each layer's
    best-scoring option, step down the layers' lower convex hulls in order of score added per cost saved. After
    every step the allocation is the LP optimum at its cost and is integral, so it is also the integer optimum
    there: exact. Non-supported points (in the frontier's concave dents) are not among them. ``points`` picks that
    many, evenly spread in cost (None keeps all).
    """
    fixed = dict(fixed or {})
    check_table(table, [resource])
    obj = objective_values(table, objective)
    cost = table[resource].to_numpy(float)
    layers, options = table["layer"].to_numpy(), table["option"].to_numpy()
    start: dict[str, int] = {}
    steps = []  # (ratio, layer, from row, to row)
    for layer, g in table.groupby("layer", sort=False):
        idx = g.index.to_numpy()
        hull = [int(idx[i]) for i in _lower_hull(cost[idx], obj[idx])]
        start[layer] = hull[-1]
        for k in range(len(hull) - 1, 0, -1):  # stepping from hull[k] to the cheaper hull[k-1]
            a, b = hull[k], hull[k - 1]
            steps.append(((obj[b] - obj[a]) / (cost[a] - cost[b]), layer, a, b))
    steps.sort(key=lambda s: s[0])
    totals = np.cumsum([sum(cost[i] for i in start.values())] + [cost[b] - cost[a] for _, _, a, b in steps])
    if points is None or len(totals) <= points:
        keep = set(range(len(totals)))
    else:
        keep = {int(np.argmin(np.abs(totals - t))) for t in np.linspace(totals.min(), totals.max(), points)}
    current, out = dict(start), []
    for k in range(len(totals)):  # replay the steps, recording the kept allocations
        if k:
            _, layer, _, b = steps[k - 1]
            current[layer] = b
        if k in keep:
            choice = {layers[i]: options[i] for i in current.values()}
            out.append(_row(table, choice, fixed, resource, float(totals[k]) + fixed.get(resource, 0.0), True,
                            "hull"))
    return pareto_filter(_frame(out), resource)


def sweep_frontier(table: pd.DataFrame, resource: str, fixed: Mapping[str, float] | None = None,
                   limits: Mapping[str, float] | None = None, points: int = 12, progress: bool = False,
                   backend: str = "cbc", objective: str | Mapping[str, float] = "score") -> pd.DataFrame:
    """ILP optima at ``points`` budgets of ``resource`` from the smallest to the largest reachable (with any other
    ``limits`` kept): each point is optimal for its budget, but points between budgets are not looked for."""
    lo = smallest_reachable(table, fixed, [resource])[resource]
    hi = largest_reachable(table, fixed, [resource])[resource]
    rows, seen = [], set()
    for b in tqdm(np.unique(np.linspace(lo, hi, points)), desc=f"frontier ({resource})", disable=not progress,
                  leave=False):
        try:
            alloc = ilp_allocate(table, {**(limits or {}), resource: float(b) * (1 + 1e-9)}, fixed,
                                 backend=backend, objective=objective)
        except BudgetError:
            continue  # infeasible together with the other limits
        key = tuple(sorted(alloc.choice.items()))
        if key not in seen:
            seen.add(key)
            rows.append(_row(table, alloc.choice, fixed, resource, float(b), True, "sweep"))
    return pareto_filter(_frame(rows), resource) if rows else _frame([])


def pareto_frontier(table: pd.DataFrame, resource: str, fixed: Mapping[str, float] | None = None,
                    limits: Mapping[str, float] | None = None, points: int = 50,
                    objective: str | Mapping[str, float] = "score", backend: str = "highs",
                    progress: bool = False) -> tuple[pd.DataFrame, bool]:
    """The frontier of ``resource``: complete (walk) when it has at most ``points`` points; otherwise the walk's
    points plus ``points`` more spread over the range (the convex hull's vertices without other limits, ILP optima
    at budgets with them), every one exact. Returns (frontier, complete)."""
    frontier, complete = walk_frontier(table, resource, fixed, limits, objective, points, backend, progress)
    if complete:
        return frontier, True
    others = {k: v for k, v in finite_limits(limits).items() if k != resource}
    spread = hull_frontier(table, resource, fixed, objective, points) if not others else \
        sweep_frontier(table, resource, fixed, others, points, progress, backend, objective)
    merged = pd.concat([frontier, spread], ignore_index=True).drop_duplicates("choice")
    return pareto_filter(merged, resource), False


def frontier_3d(table: pd.DataFrame, fixed: Mapping[str, float] | None = None, points: int = 12,
                resources: tuple[str, str] = ("latency_ms", "size_mb"), backend: str = "highs") -> pd.DataFrame:
    """Non-dominated (score, resource 1, resource 2) points: both 2-D frontiers plus ILP optima on a grid of
    joint budgets, filtered in 3-D. A filtered set: points between the grid's budgets may be missing."""
    a, b = resources
    parts = [pareto_frontier(table, r, fixed, points=points, backend=backend)[0] for r in resources]
    lo, hi = smallest_reachable(table, fixed, resources), largest_reachable(table, fixed, resources)
    rows = []
    for ba in np.linspace(lo[a], hi[a], max(3, points // 3)):
        for bb in np.linspace(lo[b], hi[b], max(3, points // 3)):
            try:
                alloc = ilp_allocate(table, {a: ba * (1 + 1e-9), b: bb * (1 + 1e-9)}, fixed, backend=backend)
            except BudgetError:
                continue
            rows.append(_row(table, alloc.choice, fixed, f"{a}+{b}", float(ba), True, "grid"))
    merged = pd.concat([*parts, _frame(rows)], ignore_index=True).drop_duplicates("choice")
    return pareto_filter_nd(merged, ["score", a, b])


def main_resource(limits: Mapping[str, float]) -> str:
    """The resource a frontier is drawn for: latency (a latency column of any phase), else size, else BOPs."""
    latency = [c for c in limits if c == "latency_ms" or c.startswith("latency_ms@") or c.endswith("_ms")]
    return latency[0] if latency else next((r for r in ("size_mb", "bops") if r in limits), "size_mb")


def pareto_allocate(table: pd.DataFrame, limits: Mapping[str, float] | None = None,
                    fixed: Mapping[str, float] | None = None, points: int = 50, backend: str = "highs",
                    objective: str | Mapping[str, float] = "score", secondary: str | None = None,
                    slack: float = 0.0, allowed=None, pinned=None, min_bits=None,
                    caps: Mapping[str, float] | None = None) -> Allocation:
    """The solver form: the exact frontier of the budget's main resource (latency, else size, else BOPs) within the
    other limits and the caps (attached as ``.frontier``), and on it the exact optimum at the budget itself, which is
    chosen (the frontier's own points may straddle the budget)."""
    t0 = time.perf_counter()
    limits, caps, fixed = finite_limits(limits), finite_limits(caps), dict(fixed or {})
    table = restrict(table, allowed, pinned, min_bits)
    resource = main_resource(limits)
    # caps are further rows for the walk, like the other limits; the resource's own limit is the walk's end
    frontier, complete = pareto_frontier(table, resource, fixed, {**caps, **limits}, points, objective, backend)
    at_budget = ilp_allocate(table, limits, fixed, backend=backend, objective=objective, secondary=secondary,
                             slack=slack, caps=caps)
    chosen = dict(at_budget.choice)
    frontier = pd.concat([frontier, _frame([_row(table, chosen, fixed, resource, limits.get(resource), True,
                                                 "ilp-at-budget")])], ignore_index=True).drop_duplicates("choice")
    score, costs = totals_of(table, chosen, fixed)
    return Allocation(chosen, score, costs, solver=f"pareto-{backend}",
                      stats={"seconds": time.perf_counter() - t0, "resource": resource, "points": len(frontier),
                             "complete": complete, "exact_points": int(frontier["exact"].sum()),
                             "optimal_score": score},
                      frontier=frontier)


@register_solver
class ParetoSolver(Solver):
    """:func:`pareto_allocate`: the exact frontier of the main resource, and the ILP optimum at the budget."""

    name = "pareto"
    honours = frozenset(CONSTRAINTS)
    exact = True

    def __init__(self, points: int = 50, backend: str = "highs"):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown ILP backend {backend!r}: use one of {', '.join(BACKENDS)}")
        if not isinstance(points, int) or points < 1:
            raise ConfigError(f"points {points!r} must be a positive whole number")
        self.points, self.backend = points, backend

    def solve(self, p: Problem) -> Allocation:
        return pareto_allocate(p.table, p.limits, p.fixed, self.points, self.backend, p.objective, p.secondary,
                               p.slack, p.allowed, p.pinned, p.min_bits, p.caps)
