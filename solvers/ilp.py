"""Integer program (HAWQ-V3, "Improving PTQ", MixDQ): one binary per (layer, option), one option per layer;
minimise the total score (or a weighted sum of score columns) subject to any combination of size, BOPs and latency
limits and caps on other columns (e.g. a per-metric damage table of the ``decoupled`` estimator).

The model is built once as matrices and solved by CBC (through PuLP, the default) or HiGHS (through
``scipy.optimize.milp``, always installed with SciPy). Coefficients are scaled (the objective to a mean coefficient of 1,
each constraint by its limit) so that tiny scores and BOPs in the 1e9s do not meet the solvers' absolute
tolerances. With ``secondary``, a second solve keeps the objective within ``slack`` of the optimum and minimises
that cost column instead: among allocations whose predicted damage is the same for practical purposes, the
cheapest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
import warnings
from typing import Iterable, Mapping

import numpy as np
import pandas as pd

from mpq.errors import BudgetError, ConfigError
from mpq.solvers.base import (CONSTRAINTS, Allocation, Problem, Solver, check_reachable, check_table, finite_limits,
                              objective_values, register_solver, restrict, smallest_reachable, totals_of)

log = logging.getLogger(__name__)
BACKENDS = ("cbc", "highs")


class Infeasible(Exception):
    pass


class TimeLimitWithoutSolution(BudgetError):
    """The solver ran out of time before it found any allocation that meets the limits."""


@contextlib.contextmanager
def _quiet_native_output():
    """Silence what native code writes to the process's stdout/stderr (HiGHS prints debug lines of its own)."""
    try:
        fds = [sys.stdout.fileno(), sys.stderr.fileno()]
    except (AttributeError, OSError, ValueError):  # captured streams without file descriptors
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(fd) for fd in fds]
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in fds:
            os.dup2(devnull, fd)
        yield
    finally:
        for fd, copy in zip(fds, saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


class BinaryProgram:
    """``min c.x`` over binaries with one option per layer and ``A_ub x <= b_ub`` rows; re-solvable with other
    objectives and extra rows (for lexicographic tie-breaks and frontier sweeps)."""

    def __init__(self, table: pd.DataFrame, backend: str = "cbc", time_limit: float | None = None):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown ILP backend {backend!r}: use one of {', '.join(BACKENDS)}")
        self.table = table
        self.backend = backend
        self.time_limit = time_limit
        self.layer_codes, self.layers = pd.factorize(table["layer"], sort=False)
        self.rows: list[tuple[np.ndarray, float]] = []
        self.solves = 0
        self.status = "optimal"  # "time_limit" once any solve stopped at the time limit with a feasible incumbent

    def add_row(self, coeffs: np.ndarray, bound: float) -> None:
        """``coeffs . x <= bound``."""
        self.rows.append(self._scaled(coeffs, bound))

    @staticmethod
    def _scaled(coeffs: np.ndarray, bound: float) -> tuple[np.ndarray, float]:
        """The row divided by ``|bound|``, or by its mean coefficient when the bound is (near) zero."""
        coeffs = np.asarray(coeffs, float)
        scale = max(abs(bound), float(np.abs(coeffs).mean())) or 1.0
        return coeffs / scale, bound / scale

    def solve(self, c: np.ndarray, extra: Iterable[tuple[np.ndarray, float]] = (),
              scale: float | None = None) -> np.ndarray:
        """The optimal 0/1 vector, or :class:`Infeasible`.

        The objective is divided by ``scale``, by default its mean coefficient: an allocation then totals about the
        number of layers, far above the solvers' absolute tolerances (at a total near 0.01 CBC stopped 4e-5 short
        of the optimum). Callers that know the optimum's magnitude pass it.
        """
        scale = scale or float(np.abs(c).mean()) or 1.0
        rows = list(self.rows) + [self._scaled(coeffs, bound) for coeffs, bound in extra]
        self.solves += 1
        solver = self._highs if self.backend == "highs" else self._cbc
        return solver(np.asarray(c, float) / scale, rows)

    def _highs(self, c, rows):
        from scipy.optimize import Bounds, LinearConstraint, milp
        from scipy.sparse import csr_matrix, vstack

        n = len(c)
        eq = csr_matrix((np.ones(n), (self.layer_codes, np.arange(n))), shape=(len(self.layers), n))
        cons = [LinearConstraint(eq, 1, 1)]
        if rows:
            cons.append(LinearConstraint(vstack([csr_matrix(r[0][None, :]) for r in rows]), -np.inf,
                                         np.array([r[1] for r in rows]) + 1e-9))
        opts = {"mip_rel_gap": 0.0, **({"time_limit": self.time_limit} if self.time_limit else {})}
        with _quiet_native_output():
            res = milp(c, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1), options=opts)
        if res.status == 1:  # iteration or time limit: the incumbent, if HiGHS found one, is feasible
            return self._at_time_limit("HiGHS", None if res.x is None else res.x > 0.5)
        if res.status == 2 or res.x is None:
            raise Infeasible(res.message)
        if res.status != 0:
            raise BudgetError(f"HiGHS ended with status {res.status}: {res.message}")
        return res.x > 0.5

    def _at_time_limit(self, solver: str, x: np.ndarray | None) -> np.ndarray:
        limit = f"its time limit of {self.time_limit:g} s" if self.time_limit else "its iteration limit"
        if x is None:
            raise TimeLimitWithoutSolution(f"{solver} stopped at {limit} before it found any allocation within the "
                                           f"limits: raise time_limit (solver_options={{'time_limit': ...}}) or "
                                           f"drop it")
        log.warning("%s stopped at %s: using the best allocation found, not proven optimal", solver, limit)
        self.status = "time_limit"
        return x

    def _cbc(self, c, rows):
        import pulp

        prob = pulp.LpProblem("mpq_bit_allocation", pulp.LpMinimize)
        x = [prob.add_variable(f"x{i}", cat=pulp.LpBinary) for i in range(len(c))]

        def expr(coeffs) -> pulp.LpAffineExpression:  # built from pairs: far faster than lpSum of products
            nz = np.flatnonzero(coeffs)
            return pulp.LpAffineExpression([(x[i], float(coeffs[i])) for i in nz])

        prob += expr(c)
        members: dict[int, list] = {}
        for i, code in enumerate(self.layer_codes):
            members.setdefault(int(code), []).append((x[i], 1.0))
        for code, pairs in members.items():
            prob += pulp.LpConstraint(pulp.LpAffineExpression(pairs), pulp.LpConstraintEQ, f"one_option_{code}", 1)
        for k, (coeffs, bound) in enumerate(rows):
            prob += pulp.LpConstraint(expr(coeffs), pulp.LpConstraintLE, f"row_{k}", bound + 1e-9)
        with warnings.catch_warnings():
            # PuLP 3.x warns that 4.0 moves CBC into an extra; 3.x (pinned) bundles it, which is what we want.
            warnings.simplefilter("ignore", DeprecationWarning)
            cmd = pulp.PULP_CBC_CMD(msg=False, timeLimit=self.time_limit, gapRel=0.0, gapAbs=0.0)
        status = pulp.LpStatus[prob.solve(cmd)]
        if status == "Infeasible":
            raise Infeasible(status)
        # PuLP reports "Optimal" for a CBC run stopped at its time limit with an incumbent; the solution status
        # tells the two apart (LpSolutionIntegerFeasible: found, not proven optimal)
        if status == "Not Solved" and self.time_limit:
            return self._at_time_limit("CBC", None)
        if status != "Optimal":
            raise BudgetError(f"CBC ended with status {status!r}")
        values = np.array([(v.value() or 0) > 0.5 for v in x])
        if prob.sol_status == pulp.LpSolutionIntegerFeasible:
            return self._at_time_limit("CBC", values)
        if prob.sol_status != pulp.LpSolutionOptimal:
            return self._at_time_limit("CBC", None) if self.time_limit else self._cbc_failed(prob)
        return values

    @staticmethod
    def _cbc_failed(prob):
        import pulp

        raise BudgetError(f"CBC ended without a solution (solution status "
                          f"{pulp.LpSolution.get(prob.sol_status, prob.sol_status)!r})")


def ilp_allocate(table: pd.DataFrame, limits: Mapping[str, float] | None = None,
                 fixed: Mapping[str, float] | None = None, backend: str = "cbc", time_limit: float | None = None,
                 secondary: str | None = None, slack: float = 0.0, objective: str | Mapping[str, float] = "score",
                 caps: Mapping[str, float] | None = None, allowed: Mapping[str, Iterable[str]] | None = None,
                 pinned: Mapping[str, str] | None = None, min_bits: Mapping[str, int] | None = None
                 ) -> Allocation:
    """Minimise the objective with one option per layer and ``sum(column) + fixed <= limit`` per limit.

    ``table``: columns layer, option, score and the cost columns. ``limits``: cost column -> limit (inf or absent =
    none); ``fixed``: costs outside the layers. ``objective``: a column or ``{column: weight}``. ``caps``: further
    ``sum(column) <= cap`` rows (e.g. per-metric damage). ``allowed``/``pinned``/``min_bits`` restrict layers'
    options. ``secondary`` breaks ties: the cheapest allocation within ``slack`` of the optimum.
    """
    t0 = time.perf_counter()
    limits, caps, fixed = finite_limits(limits), finite_limits(caps), dict(fixed or {})
    table = restrict(table, allowed, pinned, min_bits)
    check_table(table, [*limits, *caps, *([secondary] if secondary else [])])
    c = objective_values(table, objective)
    check_reachable(table, {**limits, **caps}, fixed)
    prog = BinaryProgram(table, backend, time_limit)
    for col, lim in {**limits, **caps}.items():
        prog.add_row(table[col].to_numpy(float), lim - fixed.get(col, 0.0))
    try:
        x = prog.solve(c)
        best = float(c[x].sum())
        if secondary is not None:
            x = prog.solve(table[secondary].to_numpy(float), [(c, best + slack)])
    except Infeasible:
        smallest = smallest_reachable(table, fixed, [*limits, *caps])
        given = ", ".join(f"{k} <= {v:.6g}" for k, v in {**limits, **caps}.items())
        reach = ", ".join(f"{k} >= {v:.6g}" for k, v in smallest.items())
        raise BudgetError(f"no allocation meets all limits together ({given}); each alone can reach {reach}",
                          smallest) from None
    choice = dict(zip(table.loc[x, "layer"], table.loc[x, "option"]))
    score, costs = totals_of(table, choice, fixed)
    seconds = time.perf_counter() - t0
    log.debug("ilp(%s): %d layers, %d binaries, score %.4g in %.3fs", backend, len(choice), len(table), score, seconds)
    return Allocation(choice, score, costs, solver=f"ilp-{backend}", status=prog.status,
                      stats={"seconds": seconds, "variables": len(table), "constraints": len(prog.rows),
                             "solves": prog.solves, "limits": limits, "caps": caps, "optimal_score": best,
                             "objective": objective if isinstance(objective, str) else dict(objective),
                             "secondary": secondary, "slack": slack})


@register_solver
class ILPSolver(Solver):
    """The integer program (:func:`ilp_allocate`): honours every constraint, exact up to the solvers' tolerances."""

    name = "ilp"
    honours = frozenset(CONSTRAINTS)
    exact = True

    def __init__(self, backend: str = "cbc", time_limit: float | None = None):
        if backend not in BACKENDS:
            raise ConfigError(f"unknown ILP backend {backend!r}: use one of {', '.join(BACKENDS)}")
        if time_limit is not None and not (isinstance(time_limit, (int, float)) and time_limit > 0):
            raise ConfigError(f"time_limit {time_limit!r} must be a positive number of seconds (or None)")
        self.backend, self.time_limit = backend, time_limit

    def solve(self, p: Problem) -> Allocation:
        return ilp_allocate(p.table, p.limits, p.fixed, self.backend, self.time_limit, p.secondary, p.slack,
                            p.objective, p.caps, p.allowed, p.pinned, p.min_bits)
