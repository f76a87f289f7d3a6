"""A solver plug-in: subclass ``mpq.solvers.Solver``, say which constraints it honours, register it.

    python examples/custom_solver.py

Once registered (here by importing this module; a package of your own declares an ``mpq.solvers`` entry point
instead, see README "Plug-ins"), it is ``solver="smallest_first"`` everywhere: ``mpq.search``, ``study.solve``,
``mpq search --solver``. A constraint it does not declare (here ``caps`` and the ``secondary`` tie-break) is refused
with an error, never dropped; an option its ``__init__`` does not take is refused too.
"""

from __future__ import annotations

import pandas as pd

from mpq.errors import BudgetError
from mpq.solvers import Allocation, Problem, Solver, register_solver, restrict, totals_of


@register_solver
class SmallestFirstSolver(Solver):
    """Every layer at its best-scoring option, then the layers whose cheapest option saves the most size are
    moved to it until the size limit holds (a baseline, not an optimum)."""

    name = "smallest_first"
    honours = frozenset({"limits", "allowed", "pinned", "min_bits"})

    def __init__(self, column: str = "size_mb"):
        self.column = column

    def solve(self, p: Problem) -> Allocation:
        table = restrict(p.table, p.allowed, p.pinned, p.min_bits)
        best = table.loc[table.groupby("layer")["score"].idxmin()].set_index("layer")
        cheapest = table.loc[table.groupby("layer")[self.column].idxmin()].set_index("layer")
        choice = dict(best["option"])
        limit = p.limits.get(self.column, float("inf"))
        savings = (best[self.column] - cheapest[self.column]).sort_values(ascending=False)
        for layer in savings.index:
            if totals_of(table, choice, p.fixed)[1][self.column] <= limit:
                break
            choice[layer] = cheapest.loc[layer, "option"]
        score, costs = totals_of(table, choice, p.fixed)
        if costs[self.column] > limit * (1 + 1e-12):
            raise BudgetError(f"{self.column} <= {limit:g} is below what {self.name} reaches ({costs[self.column]:g})")
        return Allocation(choice, score, costs, solver=self.name, status="feasible")


def main() -> None:
    from mpq.solvers import get_solver

    table = pd.DataFrame([{"layer": l, "option": o, "score": s, "size_mb": m}
                          for l in ("fc1", "fc2") for o, s, m in (("float", 0.0, 4.0), ("w8a8", 0.1, 1.0),
                                                                  ("w4a16g32", 0.4, 0.6))])
    print(get_solver("smallest_first")(table, {"size_mb": 5.0}))
    try:
        get_solver("smallest_first")(table, {"size_mb": 5.0}, caps={"score": 0.3})
    except ValueError as e:
        print(f"refused: {e}")


if __name__ == "__main__":
    main()
