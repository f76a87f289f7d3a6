"""Solvers: turn per-(layer, option) scores and costs into per-layer choices under a budget.

Every solver is a :class:`Solver` plug-in (``ilp``, ``pareto``, ``greedy``, ``optuna``, ``exhaustive``, ``ilp+refine``; add one with
:func:`register_solver` or the ``mpq.solvers`` entry point) with one method, ``solve(problem) -> Allocation``, over a
plain :class:`Problem` (pandas, no torch): a row per (layer, option) with ``score`` and cost columns (``size_mb``,
``bops``, ``latency_ms``, and one column per latency phase), limits per cost column, fixed costs outside the layers,
caps, restrictions and a tie-break. Each declares the constraints it honours and refuses the others. The
function forms (``ilp_allocate(table, limits, fixed, ...)``) stay for direct use; the XGBoost predictors live in
:mod:`mpq.solvers.predictors`.
"""

from typing import Any, Callable

from mpq.plugins import SOLVERS
from mpq.solvers.base import (CONSTRAINTS, Allocation, Problem, Solver, check_table, register_solver, restrict,
                              smallest_reachable, solve_table, split_options, totals_of)
from mpq.solvers.exhaustive import ExhaustiveSolver, exhaustive_allocate, exhaustive_frontier
from mpq.solvers.greedy import GreedySolver, greedy_allocate
from mpq.solvers.ilp import ILPSolver, ilp_allocate
from mpq.solvers.optuna_search import OptunaSolver, optuna_allocate
from mpq.solvers.refine import RefineSolver, refine_allocate
from mpq.solvers.pareto import (ParetoSolver, frontier_3d, hull_frontier, main_resource, pareto_allocate,
                                pareto_filter, pareto_filter_nd, pareto_frontier, sweep_frontier, walk_frontier)


def get_solver(name: str | Callable[..., Allocation]) -> Callable[..., Allocation]:
    """The solver registered as ``name`` in its plain-table form, ``(table, limits, fixed, **options) ->
    Allocation``: options that are :class:`Problem` fields (caps, objective, ...) go to the problem, the rest to the
    solver, and an unknown option or a constraint the solver does not honour is an error."""
    if callable(name) and not isinstance(name, type):
        return name
    cls = SOLVERS.get(name) if isinstance(name, str) else name

    def allocate(table, limits=None, fixed=None, **options: Any) -> Allocation:
        return solve_table(cls.name, table, limits, fixed, **options)

    allocate.__name__ = f"{cls.name}_solver"
    allocate.__doc__ = cls.__doc__
    return allocate


def available_solvers() -> list[str]:
    return SOLVERS.names()


__all__ = ["Allocation", "Problem", "Solver", "CONSTRAINTS", "register_solver", "solve_table", "split_options",
           "check_table", "restrict", "smallest_reachable", "totals_of", "ilp_allocate", "ILPSolver",
           "exhaustive_allocate", "exhaustive_frontier", "ExhaustiveSolver", "sweep_frontier", "walk_frontier",
           "hull_frontier", "pareto_frontier", "frontier_3d", "pareto_allocate", "pareto_filter", "pareto_filter_nd",
           "ParetoSolver", "main_resource", "get_solver", "available_solvers", "greedy_allocate", "GreedySolver",
           "optuna_allocate", "OptunaSolver", "RefineSolver", "refine_allocate", "SOLVERS"]
