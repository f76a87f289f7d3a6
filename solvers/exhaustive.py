"""Exhaustive search: the exact optimum (and the exact frontier) by enumeration, for small instances and as the
reference the ILP and the Pareto solvers are tested against."""

from __future__ import annotations

import itertools
import math
import time
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from mpq.config import choice_key
from mpq.errors import BudgetError, ConfigError
from mpq.solvers.base import (CONSTRAINTS, COST_COLUMNS, Allocation, Problem, Solver, check_reachable, check_table,
                              finite_limits, objective_values, register_solver, restrict, smallest_reachable,
                              totals_of)

MAX_CONFIGS = 2_000_000


def _enumerate(table: pd.DataFrame, columns: Iterable[str], objective) -> tuple[list, np.ndarray, dict]:
    """Every allocation as option indices per layer, with its objective and column totals (vectorised)."""
    groups = [(layer, g.reset_index(drop=True)) for layer, g in table.groupby("layer", sort=False)]
    n = math.prod(len(g) for _, g in groups)
    if n > MAX_CONFIGS:
        raise ConfigError(f"exhaustive search over {n} configs refused (limit {MAX_CONFIGS}): use ilp_allocate")
    idx = np.array(list(itertools.product(*(range(len(g)) for _, g in groups))), dtype=np.int64)
    obj = objective_values(table, objective)
    starts = np.cumsum([0] + [len(g) for _, g in groups[:-1]])
    flat = idx + starts  # row positions in `table` (groupby keeps first-appearance order of layers)
    order = np.concatenate([np.flatnonzero(table["layer"].to_numpy() == layer) for layer, _ in groups])
    rows = order[flat]
    totals = {c: table[c].to_numpy(float)[rows].sum(1) for c in columns}
    return [(layer, g) for layer, g in groups], rows, {"objective": obj[rows].sum(1), **totals}


def exhaustive_allocate(table: pd.DataFrame, limits: Mapping[str, float] | None = None,
                        fixed: Mapping[str, float] | None = None, secondary: str | None = None,
                        slack: float = 0.0, objective: str | Mapping[str, float] = "score",
                        caps: Mapping[str, float] | None = None, allowed=None, pinned=None, min_bits=None
                        ) -> Allocation:
    """Enumerate every allocation (refused over ``MAX_CONFIGS``); same arguments as :func:`ilp_allocate`."""
    t0 = time.perf_counter()
    limits, caps, fixed = finite_limits(limits), finite_limits(caps), dict(fixed or {})
    table = restrict(table, allowed, pinned, min_bits)
    bounded = {**limits, **caps}
    check_table(table, [*bounded, *([secondary] if secondary else [])])
    check_reachable(table, bounded, fixed)
    columns = sorted(set(bounded) | ({secondary} if secondary else set()))
    groups, rows, totals = _enumerate(table, columns, objective)
    ok = np.ones(len(rows), bool)
    for c, lim in bounded.items():
        ok &= totals[c] + fixed.get(c, 0.0) <= lim * (1 + 1e-9) + 1e-12
    if not ok.any():
        raise BudgetError("no allocation meets all limits together", smallest_reachable(table, fixed, bounded))
    obj = np.where(ok, totals["objective"], np.inf)
    best = float(obj.min())
    pick = int(obj.argmin())
    if secondary is not None:
        near = ok & (totals["objective"] <= best + slack + 1e-12 * max(1.0, abs(best)))
        pick = int(np.where(near, totals[secondary], np.inf).argmin())
    layer_rows = rows[pick]
    choice = dict(zip(table["layer"].to_numpy()[layer_rows], table["option"].to_numpy()[layer_rows]))
    score, costs = totals_of(table, choice, fixed)
    return Allocation(choice, score, costs, solver="exhaustive",
                      stats={"seconds": time.perf_counter() - t0, "configs": len(rows), "optimal_score": best})


def exhaustive_frontier(table: pd.DataFrame, resource: str, fixed: Mapping[str, float] | None = None,
                        objective: str | Mapping[str, float] = "score") -> pd.DataFrame:
    """Every non-dominated (objective, resource) point of the whole space (one allocation per point)."""
    fixed = dict(fixed or {})
    check_table(table, [resource])
    groups, rows, totals = _enumerate(table, [resource, *[c for c in COST_COLUMNS if c in table.columns]],
                                      objective)
    cost = totals[resource] + fixed.get(resource, 0.0)
    order = np.lexsort((cost, totals["objective"]))  # by objective, then cost
    keep, best_cost = [], np.inf
    for i in order:  # walking up in objective, a point is non-dominated iff it is cheaper than all before it
        if cost[i] < best_cost - 1e-12 * max(1.0, abs(best_cost) if np.isfinite(best_cost) else 1.0):
            keep.append(i)
            best_cost = cost[i]
    layers, options = table["layer"].to_numpy(), table["option"].to_numpy()
    out = []
    for i in keep:
        choice = dict(zip(layers[rows[i]], options[rows[i]]))
        out.append({"score": float(totals["objective"][i]), resource: float(cost[i]),
                    "choice": choice_key(choice)})
    return pd.DataFrame(out).sort_values(resource).reset_index(drop=True)


@register_solver
class ExhaustiveSolver(Solver):
    """:func:`exhaustive_allocate`: enumeration, the reference the others are tested against."""

    name = "exhaustive"
    honours = frozenset(CONSTRAINTS)
    exact = True

    def solve(self, p: Problem) -> Allocation:
        return exhaustive_allocate(p.table, p.limits, p.fixed, p.secondary, p.slack, p.objective, p.caps,
                                   p.allowed, p.pinned, p.min_bits)
