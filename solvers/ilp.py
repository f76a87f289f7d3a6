"""Integer program (HAWQ-V3 / "Improving PTQ" style): one binary per (layer, option), one option per layer,
minimise total score subject to any combination of size, BOPs and latency limits. Solved with PuLP (CBC bundled;
HiGHS when installed).

Coefficients are scaled (scores by the largest score, each constraint by its limit) so that tiny scores and BOPs in
the 1e9s do not meet the solver's absolute tolerances.

With ``secondary``, a second solve keeps the total score within ``slack`` of the optimum and minimises that cost
column instead: among allocations whose predicted damage is the same for practical purposes, the cheapest.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from typing import Mapping

import pandas as pd

from mpq.errors import BudgetError, ConfigError
from mpq.solvers.base import Allocation, check_reachable, check_table, smallest_reachable, totals_of

log = logging.getLogger(__name__)


def _pulp_solver(name: str, time_limit: float | None):
    import pulp

    name = name.lower()
    if name == "cbc":
        with warnings.catch_warnings():
            # PuLP 3.x warns that 4.0 moves CBC into an extra; 3.x (pinned) bundles it, which is what we want.
            warnings.simplefilter("ignore", DeprecationWarning)
            return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=0.0)
    if name == "highs":
        for cls in ("HiGHS", "HiGHS_CMD"):
            solver = getattr(pulp, cls, None)
            if solver is not None and solver(msg=False).available():
                return solver(msg=False, timeLimit=time_limit, gapRel=0.0)
        raise ConfigError("solver 'highs' is not installed: pip install highspy (or use solver='cbc')")
    raise ConfigError(f"unknown ILP backend {name!r}: use 'cbc' or 'highs'")


def ilp_allocate(table: pd.DataFrame, limits: Mapping[str, float] | None = None,
                 fixed: Mapping[str, float] | None = None, backend: str = "cbc", time_limit: float | None = None,
                 secondary: str | None = None, slack: float = 0.0) -> Allocation:
    """Minimise ``sum(score)`` with one option per layer and ``sum(cost) + fixed <= limit`` per limited column.

    ``table`` has columns layer, option, score and the cost columns; ``limits`` maps cost columns to limits (inf or
    absent = no limit); ``fixed`` adds costs outside the layers (kept-float parameters, the rest of the forward).
    ``secondary`` (a cost column) breaks ties: the cheapest allocation whose score is within ``slack`` of the optimum.
    """
    import pulp

    limits = {c: float(v) for c, v in (limits or {}).items() if not math.isinf(float(v))}
    fixed = dict(fixed or {})
    check_table(table, {**limits, **({secondary: 0.0} if secondary else {})})
    check_reachable(table, limits, fixed)
    t0 = time.perf_counter()

    prob = pulp.LpProblem("mpq_bit_allocation", pulp.LpMinimize)
    rows = list(table[["layer", "option"]].itertuples(index=False, name=None))
    x = {key: prob.add_variable(f"x{i}", cat=pulp.LpBinary) for i, key in enumerate(rows)}
    scores = dict(zip(rows, table["score"].astype(float)))
    scale = max((abs(s) for s in scores.values()), default=1.0) or 1.0
    objective = pulp.lpSum((scores[k] / scale) * x[k] for k in rows)
    prob += objective
    for i, (layer, group) in enumerate(table.groupby("layer", sort=False)):
        prob += pulp.lpSum(x[(layer, o)] for o in group["option"]) == 1, f"one_option_{i}"
    for col, lim in limits.items():
        costs = dict(zip(rows, table[col].astype(float)))
        prob += (pulp.lpSum((costs[k] / lim) * x[k] for k in rows) <= 1.0 - fixed.get(col, 0.0) / lim), f"limit_{col}"

    status_name = pulp.LpStatus[prob.solve(_pulp_solver(backend, time_limit))]
    best = None
    if status_name == "Optimal" and secondary is not None:
        best = sum(scores[k] for k in rows if (x[k].value() or 0) > 0.5)
        prob += objective <= (best + slack) / scale + 1e-9, "score_within_slack"
        costs2 = dict(zip(rows, table[secondary].astype(float)))
        norm = max((abs(c) for c in costs2.values()), default=1.0) or 1.0
        prob.setObjective(pulp.lpSum((costs2[k] / norm) * x[k] for k in rows))
        status_name = pulp.LpStatus[prob.solve(_pulp_solver(backend, time_limit))]
    seconds = time.perf_counter() - t0
    if status_name != "Optimal":
        smallest = smallest_reachable(table, fixed)
        if status_name == "Infeasible":
            given = ", ".join(f"{c} <= {v:.6g}" for c, v in limits.items())
            reach = ", ".join(f"{c} >= {v:.6g}" for c, v in smallest.items() if c in limits)
            raise BudgetError(f"no allocation meets all limits together ({given}); each alone can reach {reach}",
                              smallest)
        raise BudgetError(f"ILP solver ended with status {status_name!r} after {seconds:.2f}s", smallest)
    choice = {}
    for (layer, option), var in x.items():
        if var.value() is not None and var.value() > 0.5:
            choice[layer] = option
    score, costs = totals_of(table, choice, fixed)
    log.debug("ilp: %d layers, %d vars, score %.4g in %.3fs", len(choice), len(x), score, seconds)
    return Allocation(choice, score, costs, solver=f"ilp-{backend}", status="optimal",
                      stats={"seconds": seconds, "variables": len(x), "constraints": prob.numConstraints(),
                             "limits": dict(limits), "optimal_score": score if best is None else best,
                             "secondary": secondary, "slack": slack})
