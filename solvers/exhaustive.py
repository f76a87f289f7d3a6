"""Exhaustive search: the exact optimum by enumeration, for small instances and as the ILP's reference."""

from __future__ import annotations

import itertools
import math
import time
from typing import Mapping

import numpy as np
import pandas as pd

from mpq.errors import BudgetError, ConfigError
from mpq.solvers.base import Allocation, check_reachable, check_table, smallest_reachable

MAX_CONFIGS = 2_000_000


def exhaustive_allocate(table: pd.DataFrame, limits: Mapping[str, float] | None = None,
                        fixed: Mapping[str, float] | None = None, secondary: str | None = None,
                        slack: float = 0.0) -> Allocation:
    """Enumerate every allocation; refuse spaces over ``MAX_CONFIGS``. ``secondary``/``slack`` as in the ILP."""
    limits = {c: float(v) for c, v in (limits or {}).items() if not math.isinf(float(v))}
    fixed = dict(fixed or {})
    check_table(table, {**limits, **({secondary: 0.0} if secondary else {})})
    check_reachable(table, limits, fixed)
    t0 = time.perf_counter()
    groups = [(layer, g.reset_index(drop=True)) for layer, g in table.groupby("layer", sort=False)]
    n = math.prod(len(g) for _, g in groups)
    if n > MAX_CONFIGS:
        raise ConfigError(f"exhaustive search over {n} configs refused (limit {MAX_CONFIGS}): use ilp_allocate")
    cols = list(limits)
    feasible = []  # (score, index) of every allocation within the limits
    for idx in itertools.product(*(range(len(g)) for _, g in groups)):
        if all(sum(g[c].iat[i] for (_, g), i in zip(groups, idx)) + fixed.get(c, 0.0) <= limits[c] * (1 + 1e-9)
               for c in cols):
            feasible.append((sum(g["score"].iat[i] for (_, g), i in zip(groups, idx)), idx))
    if not feasible:
        raise BudgetError("no allocation meets all limits together", smallest_reachable(table, fixed))
    best, best_idx = min(feasible)
    if secondary is not None:
        near = [idx for score, idx in feasible if score <= best + slack + 1e-12 * max(1.0, abs(best))]
        best_idx = min(near, key=lambda idx: sum(g[secondary].iat[i] for (_, g), i in zip(groups, idx)))
        best = sum(g["score"].iat[i] for (_, g), i in zip(groups, best_idx))
    choice = {layer: g["option"].iat[i] for (layer, g), i in zip(groups, best_idx)}
    picked = pd.concat([g.iloc[[i]] for (_, g), i in zip(groups, best_idx)])
    costs = {c: float(np.sum(picked[c])) + fixed.get(c, 0.0) for c in ("size_mb", "bops", "latency_ms")
             if c in picked.columns}
    return Allocation(choice, float(best), costs, solver="exhaustive",
                      stats={"seconds": time.perf_counter() - t0, "configs": n})
