"""Greedy allocation (MPTQ-ViT's "Greedy MP"), the baseline the exact solvers are compared with.

Start with every layer at its best-scoring option; while a limit (or a cap) is exceeded, move one layer to a
cheaper option, choosing the move that adds the least score per unit of (normalised) cost saved on the exceeded
limits. It has no notion of "within slack of the optimum", so it refuses a ``secondary`` tie-break.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import pandas as pd

from mpq.errors import BudgetError
from mpq.solvers.base import (Allocation, Problem, Solver, check_reachable, check_table, finite_limits,
                              objective_values, register_solver, restrict, totals_of)


def greedy_allocate(table: pd.DataFrame, limits: Mapping[str, float] | None = None,
                    fixed: Mapping[str, float] | None = None, objective: str | Mapping[str, float] = "score",
                    allowed=None, pinned=None, min_bits=None, caps: Mapping[str, float] | None = None
                    ) -> Allocation:
    """Greedy moves until every limit and cap holds (caps are limits on further columns)."""
    t0 = time.perf_counter()
    limits, fixed = {**finite_limits(limits), **finite_limits(caps)}, dict(fixed or {})
    table = restrict(table, allowed, pinned, min_bits)
    check_table(table, limits)
    check_reachable(table, limits, fixed)
    obj = objective_values(table, objective)
    frame = table.assign(_obj=obj).reset_index(drop=True)
    groups = {layer: g for layer, g in frame.groupby("layer", sort=False)}
    current = {layer: int(g.sort_values(["_obj", *limits]).index[0]) for layer, g in groups.items()}
    totals = {c: float(frame.loc[list(current.values()), c].sum()) + fixed.get(c, 0.0) for c in limits}
    moves = 0
    while True:
        over = {c: totals[c] - lim for c, lim in limits.items() if totals[c] > lim + 1e-12 * max(abs(lim), 1.0)}
        if not over:
            break
        best = None
        for layer, g in groups.items():
            cur = frame.loc[current[layer]]
            for i, row in g.iterrows():
                saved = sum((cur[c] - row[c]) / max(abs(limits[c]), 1e-12) for c in over)
                if saved <= 0:
                    continue
                ratio = (row["_obj"] - cur["_obj"]) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, layer, i)
        if best is None:
            raise BudgetError(f"greedy allocation got stuck with limits exceeded by {over}")
        _, layer, i = best
        for c in limits:
            totals[c] += float(frame.at[i, c] - frame.at[current[layer], c])
        current[layer] = i
        moves += 1
    choice = {layer: frame.at[i, "option"] for layer, i in current.items()}
    score, costs = totals_of(table, choice, fixed)
    return Allocation(choice, score, costs, solver="greedy", status="feasible",
                      stats={"seconds": time.perf_counter() - t0, "moves": moves,
                             "optimal_score": float(np.nan)})


@register_solver
class GreedySolver(Solver):
    """:func:`greedy_allocate`: feasible, not optimal; no tie-break."""

    name = "greedy"
    honours = frozenset({"limits", "caps", "allowed", "pinned", "min_bits", "objective"})

    def solve(self, p: Problem) -> Allocation:
        return greedy_allocate(p.table, p.limits, p.fixed, p.objective, p.allowed, p.pinned, p.min_bits, p.caps)
