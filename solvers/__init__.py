"""Solvers: turn per-(layer, option) scores and costs into per-layer choices under a budget.

Every solver has the signature ``solver(table, limits, fixed, **options) -> Allocation`` (``ilp``, ``pareto``,
``greedy``, ``optuna``, ``exhaustive``); the XGBoost predictors live in :mod:`mpq.solvers.predictors`.
Solvers take plain tables (pandas, no torch): a row per (layer, option) with ``score`` and cost columns
(``size_mb``, ``bops``, ``latency_ms``), limits per cost column, and fixed costs outside the layers. They return
:class:`Allocation` objects, so the API, the report and the dashboard treat every solver alike.
"""

from typing import Callable

from mpq.errors import ConfigError
from mpq.solvers.base import Allocation, check_table, restrict, smallest_reachable, totals_of
from mpq.solvers.exhaustive import exhaustive_allocate, exhaustive_frontier
from mpq.solvers.greedy import greedy_allocate
from mpq.solvers.optuna_search import optuna_allocate
from mpq.solvers.ilp import ilp_allocate
from mpq.solvers.pareto import (frontier_3d, hull_frontier, pareto_allocate, pareto_filter, pareto_filter_nd,
                                pareto_frontier, sweep_frontier, walk_frontier)

SOLVERS: dict[str, Callable[..., Allocation]] = {"ilp": ilp_allocate, "exhaustive": exhaustive_allocate,
                                                 "pareto": pareto_allocate, "greedy": greedy_allocate,
                                                 "optuna": optuna_allocate}


def get_solver(name: str | Callable[..., Allocation]) -> Callable[..., Allocation]:
    """The allocation function registered as ``name`` (signature ``(table, limits, fixed) -> Allocation``)."""
    if callable(name):
        return name
    if name not in SOLVERS:
        raise ConfigError(f"unknown solver {name!r}; available: {', '.join(SOLVERS)}")
    return SOLVERS[name]


__all__ = ["Allocation", "check_table", "restrict", "smallest_reachable", "totals_of", "ilp_allocate",
           "exhaustive_allocate", "exhaustive_frontier", "sweep_frontier", "walk_frontier", "hull_frontier",
           "pareto_frontier", "frontier_3d", "pareto_allocate", "pareto_filter", "pareto_filter_nd", "SOLVERS",
           "get_solver", "greedy_allocate", "optuna_allocate"]
