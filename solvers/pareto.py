"""Pareto frontier of (total score, cost) by sweeping one resource's budget through the ILP (HAWQ-V2 / ZeroQ).

Each sweep point solves the ILP with that resource limited (plus any other fixed limits); the distinct solutions
are kept and dominated points are dropped. This is an inner approximation of the frontier: every point is optimal
for its budget, but points between budgets may be missing.
"""

from __future__ import annotations

import json
import logging
from typing import Mapping

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from mpq.errors import BudgetError
from mpq.solvers.base import COST_COLUMNS, largest_reachable, smallest_reachable
from mpq.solvers.ilp import ilp_allocate

log = logging.getLogger(__name__)


def pareto_filter(points: pd.DataFrame, cost: str, score: str = "score") -> pd.DataFrame:
    """Rows not dominated in (score, cost), sorted by cost (both minimised)."""
    pts = points.sort_values([cost, score]).reset_index(drop=True)
    keep, best = [], np.inf
    for i, s in enumerate(pts[score]):
        if s < best - 1e-15 * max(1.0, abs(best) if np.isfinite(best) else 1.0):
            keep.append(i)
            best = s
    return pts.iloc[keep].reset_index(drop=True)


def sweep_frontier(table: pd.DataFrame, resource: str, fixed: Mapping[str, float] | None = None,
                   limits: Mapping[str, float] | None = None, points: int = 12, progress: bool = False,
                   backend: str = "cbc") -> pd.DataFrame:
    """Frontier of score vs ``resource``: ILP solutions at ``points`` budgets from smallest to largest reachable.

    Returns one row per non-dominated allocation: score, every cost column, the budget that produced it, and the
    allocation as JSON (``choice``).
    """
    lo = smallest_reachable(table, fixed)[resource]
    hi = largest_reachable(table, fixed)[resource]
    budgets = np.unique(np.concatenate([np.linspace(lo, hi, points), [hi]]))
    rows, seen = [], set()
    for b in tqdm(budgets, desc=f"frontier ({resource})", disable=not progress, leave=False):
        try:
            alloc = ilp_allocate(table, {**(limits or {}), resource: float(b) * (1 + 1e-9)}, fixed, backend=backend)
        except BudgetError:
            continue  # infeasible together with the other limits
        key = tuple(sorted(alloc.choice.items()))
        if key in seen:
            continue
        seen.add(key)
        rows.append({"swept": resource, "budget": float(b), "score": alloc.score,
                     **{c: alloc.costs.get(c, np.nan) for c in COST_COLUMNS},
                     "choice": json.dumps(dict(sorted(alloc.choice.items())))})
    if not rows:
        return pd.DataFrame(columns=["swept", "budget", "score", *COST_COLUMNS, "choice"])
    return pareto_filter(pd.DataFrame(rows), resource)
