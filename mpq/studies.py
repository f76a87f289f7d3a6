"""A study: the expensive stages of a search run once, then any number of budgets solved in seconds.

    study = mpq.study(model, calib, eval_fn, device="cpu", out="runs/s")   # discovery, costs, latency, sensitivity
    for budget in ("size=0.25", "size=0.35", "latency=0.7"):
        result = study.solve(budget)                                        # a SearchResult, predicted
    best = study.solve("size=0.3", evaluate=True, out="runs/s/size-0.3")   # ... measured on the real kernels
    curve = study.frontier("latency_ms")                                    # the exact frontier

Stages run in order of cost: inputs checked (weights, calibration data, names, options), layers discovered, the
search space built from the device's kernels, size and BOPs of every option computed, and every budget given to
:func:`study` checked for reachability before anything is measured; then latencies (per phase the budgets name,
cached), the budgets' latency limits checked, and only then the sensitivity estimator. With ``out``, the study's
record (its options, tables and scores) is written there, so the same call resumes from it and ``mpq solve RUN``
or :func:`load_study` solve again without the model.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd

from mpq.budget import Budget, Phase
from mpq.config import Choice
from mpq.cost_stage import CostTables
from mpq.errors import BudgetError, ConfigError
from mpq.options import StudyOptions
from mpq.study_record import StudyRecord
from mpq.study_result import SearchResult

log = logging.getLogger(__name__)


class Study:
    """The stages of a search that do not depend on the budget, done once; :meth:`solve` for each budget.

    Made by :func:`study` (a live study: it holds the model, and can measure new latency phases and evaluate) or
    :func:`load_study` (from a run directory: tables only, solves without the model).
    """

    def __init__(self, record: StudyRecord, live: Any = None):
        self.record = record
        self.live = live  # mpq.study_run.LiveStudy, or None for a study read from disk
        self._frontiers: dict[tuple[str, int], pd.DataFrame] = {}
        self._latency_model = None  # mpq.study_verify.LatencyModel, chosen once per study

    def latency_model(self):
        """The predictor of whole-model latency this study uses (:mod:`mpq.study_verify`): on a live study, chosen
        once by held-out error over ``latency_configs`` configs timed end to end; on a study read from disk, the
        one it chose, fit again on the configs it measured; the table's sum where there are none."""
        from mpq.cost_stage import MAIN
        from mpq.study_verify import additive_model, calibrate, refit

        if self._latency_model is None:
            fixed = float(self.costs.fixed.get(MAIN, 0.0))
            count = self.options.profile.latency_configs
            if self.record.latency_info.get("selected"):
                self._latency_model = refit(self.table, fixed, self.record.latency_info)
            elif self.live is None or MAIN not in self.table.columns:
                self._latency_model = additive_model(fixed, "no whole-model measurements: a study loaded from disk")
            elif count == 0:
                self._latency_model = additive_model(fixed, "latency_configs=0")
            else:
                t0 = time.perf_counter()
                self._latency_model = calibrate(self, count)
                self.record.stages_seconds["latency_model"] = time.perf_counter() - t0
                self.record.latency_info = dict(self._latency_model.info)
                if self.out is not None:
                    self.record.save(self.out)
        return self._latency_model

    # --- what the study holds ------------------------------------------------------------------------------------
    @property
    def options(self) -> StudyOptions:
        return self.record.options

    @property
    def costs(self) -> CostTables:
        return self.record.costs

    @property
    def table(self) -> pd.DataFrame:
        """Per (layer, option): score columns and every cost column."""
        return self.record.table

    @property
    def sensitivity(self):
        return self.record.sensitivity

    @property
    def out(self) -> Path | None:
        return self.record.out

    def cost_columns(self) -> list[str]:
        return self.costs.columns()

    def column_of(self, phase: Phase) -> str:
        return phase.column(self.record.sequence_length)

    def __repr__(self) -> str:
        return (f"<Study {self.record.model_name} on {self.record.target}: {len(self.record.layers)} layers, "
                f"estimator {self.record.estimator}, columns {self.cost_columns()}"
                f"{'' if self.live else ', loaded (no model)'}>")

    # --- solving -------------------------------------------------------------------------------------------------
    def limits(self, budget: Budget | Mapping[str, float] | str) -> dict[str, float]:
        """The budget's absolute limits for this model; latency phases it names are measured first (live)."""
        budget = _budget(budget)
        self._ensure_phases(budget)
        return budget.resolve(self.costs.reference, self.column_of)

    def _ensure_phases(self, budget: Budget) -> None:
        missing = [(p, self.column_of(p)) for _, p, _, _ in budget.phase_limits()
                   if self.column_of(p) not in self.table.columns]
        if not missing:
            return
        if self.live is None:
            raise BudgetError(f"this study has no latency measured for {', '.join(c for _, c in missing)} (it was "
                              f"loaded from {self.out}); run mpq.study(..., budgets=[...]) with that phase, or "
                              f"mpq search --resume with the new --budget")
        for phase, column in missing:
            self.live.add_phase(self.record, phase, column)
        self._frontiers.clear()

    def solve(self, budget: Budget | Mapping[str, float] | str, *, evaluate: bool = False,
              out: str | Path | None = None, force: bool = False, **solve_options: Any) -> SearchResult:
        """The best allocation within ``budget`` (absolute ``size_mb``/``bops``/``latency_ms``, relative ``size``/
        ``latency``/``bops_ratio``, or per phase ``latency_ms@B``, ``decode@B``, ``prefill_ms@S``), from the
        study's tables: seconds, whatever the budget. ``solve_options`` override the study's :class:`SolveOptions`
        (``solver``, ``solver_options``, ``tie_tolerance``, ``frontier_points``) for this call.

        ``evaluate=True`` also applies the chosen config and the uniform INT8/INT4 baselines on the real kernels,
        times them end to end and runs ``eval_fn`` (and the fake-quant metric along the frontier); without it the
        result's measured columns are NaN. With ``out``, writes a run directory (config, tables, report,
        dashboard)."""
        from mpq.artifacts import prepare_run_dir
        from mpq.study_result import build_result

        t0 = time.perf_counter()
        budget = _budget(budget)
        if evaluate and self.live is None:
            raise ConfigError("evaluate=True needs the model: this study was loaded from disk; use "
                              "study.attach(model, calib, eval_fn) first, or mpq solve RUN --evaluate")
        out = prepare_run_dir(out, force)  # before the solver writes there (Optuna's study)
        solve = self.options.solve if not solve_options else \
            self.options.with_options(**_only_solve(solve_options)).solve
        limits = self.limits(budget)
        floor = self._check(budget, limits)
        with contextlib.nullcontext() if self.live is None else self.live.fanned_out():
            if floor is None:
                allocation = self.record.allocate(limits, solve, out, None if self.live is None else self.live.damage)
            else:  # below the table's floor, not below the measured one: the measured config is the start
                from mpq.study_verify import floor_allocation

                allocation = floor_allocation(self, floor)
            if floor is None and solve.check_uniform and self.live is not None:
                allocation = self._against_uniform(allocation, limits)
        frontier = self.frontier(points=solve.frontier_points, _with_phases=_phase_columns(limits))
        seconds = {"solve": time.perf_counter() - t0}
        model = self.latency_model()
        damage = None if self.live is None else self.live.damage
        resolve = functools.partial(self.record.allocate, solve=solve, out=out, damage=damage)
        allocation, verification = self._verify(allocation, limits, frontier, solve, model, resolve)
        seconds["verify"] = time.perf_counter() - t0 - seconds["solve"]
        return build_result(self, budget, limits, allocation, frontier, solve, evaluate, seconds, out, True,
                            model, verification)

    def _against_uniform(self, allocation, limits: Mapping[str, float], candidates: int = 4):
        """The solver's choice or a uniform config, whichever measures less damage on the calibration split: the
        ``candidates`` uniform configs of least predicted damage that fit every limit (latency by the study's
        predictor) are measured beside the choice. A per-layer table sums damages that interact; a uniform config
        is the one point such sums misprice most often (measured: bench/search_quality.py, issue 19)."""
        import dataclasses
        import math

        from mpq.cost_stage import MAIN
        from mpq.study_verify import config_totals, uniform_within

        table = self.table
        columns = [c for c in self.costs.columns() if c in table.columns]
        fitting = {n: c for n, c in uniform_within(table, self.costs.fixed, limits, columns).items()
                   if Choice(c).key != allocation.key}
        names = list(fitting)
        if names and MAIN in limits and not math.isinf(limits[MAIN]):
            predicted = self.latency_model().predict(table, [fitting[n] for n in names])
            names = [n for n, ms in zip(names, predicted) if ms <= limits[MAIN] * (1 + 1e-9) + 1e-12]
        score = {n: config_totals(table, {}, fitting[n], ["score"])["score"] for n in names}
        names = sorted(names, key=score.get)[:candidates]
        if not names:
            return allocation
        measured = self.live.damage([dict(allocation.choice), *[fitting[n] for n in names]])
        stats = {**dict(allocation.stats), "uniform_check": {"chosen": measured[0], **dict(zip(names, measured[1:]))}}
        best = min(range(len(names)), key=lambda i: measured[1 + i])
        if measured[1 + best] >= measured[0]:
            return dataclasses.replace(allocation, stats=stats)
        name = names[best]
        log.info("uniform check: %s measured %.4g damage on the calibration split vs %.4g for the solver's choice: "
                 "returned", name, measured[1 + best], measured[0])
        return dataclasses.replace(allocation, choice=Choice(fitting[name]), score=score[name],
                                   costs=config_totals(table, self.costs.fixed, fitting[name], columns),
                                   stats={**stats, "uniform_swap": name})

    def _verify(self, allocation, limits: Mapping[str, float], frontier: pd.DataFrame, solve, model, resolve):
        """Verify before choosing (:func:`mpq.study_verify.verify`) for a latency budget (any phase) on a live
        study, solving again with ``resolve(limits)`` where the choice measures over; the allocation unchanged
        and a record saying why not otherwise."""
        from mpq.study_verify import latency_limits, verify

        if not latency_limits(limits):
            return allocation, None  # size and BOPs are exact
        if not solve.verify:
            return allocation, {"met": None, "describe": "not verified (verify=False)"}
        if self.live is None:
            return allocation, {"met": None, "describe": "not verified: a study loaded from disk has no model to "
                                                         "measure (study.attach(model, ...) first)"}
        return verify(self, allocation, limits, frontier, model, resolve=resolve)

    def _check(self, budget: Budget, limits: Mapping[str, float] | None = None):
        """A :class:`BudgetError` for a budget no allocation meets. The main latency limit of a live study is
        checked against the latency measured end to end when the table's sum says no
        (:func:`mpq.study_verify.check_latency_floor`): returns the measured floor's config when it meets the
        limit, None otherwise."""
        from mpq.cost_stage import MAIN, check_reachable

        try:
            check_reachable(self.costs, budget, self.record.restrictions(), self.column_of)
        except BudgetError as e:
            if limits is None or self.live is None or MAIN not in limits:
                raise
            from mpq.study_verify import check_latency_floor

            return check_latency_floor(self, e, limits, self.latency_model())
        return None

    # --- frontiers -----------------------------------------------------------------------------------------------
    def frontier(self, resource: str | None = None, points: int | None = None, *,
                 _with_phases: Iterable[str] = ()) -> pd.DataFrame:
        """The exact frontier of (score, ``resource``): every non-dominated allocation when there are at most
        ``points`` (default: the study's ``frontier_points``), else those plus ``points`` more spread over the
        range, each exact at its cost. ``resource`` None: size and latency (and every measured phase), one table
        with ``swept`` naming each. Computed once per study and resource."""
        from mpq.study_record import frontier as exact_frontier

        points = points or self.options.solve.frontier_points
        if resource is None:
            resources = ["size_mb", "latency_ms", *[c for c in _with_phases if c != "latency_ms"]]
        else:
            resources = [resource]
        parts = []
        for r in dict.fromkeys(resources):
            if (r, points) not in self._frontiers:
                self._frontiers[(r, points)] = exact_frontier(self.table, self.costs.fixed, r, points)
            parts.append(self._frontiers[(r, points)])
        return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()

    # --- a loaded study gets its model back ----------------------------------------------------------------------
    def attach(self, model, calib_data, eval_fn: Callable | None = None, loss_fn=None) -> Study:
        """Give a study loaded from disk its model back (the same model: checked by its hash), so that it can
        evaluate and measure new phases."""
        from mpq.study_run import LiveStudy

        self.live = LiveStudy.attach(self.record, model, calib_data, eval_fn, loss_fn)
        return self


def _budget(budget) -> Budget:
    budget = Budget.parse(budget)
    if budget.is_unlimited:
        raise ConfigError("search needs a budget: e.g. budget='size=0.3' (30% of the float size), "
                          "'latency=0.6', or absolute 'size_mb=0.5', 'latency_ms=2', 'bops=1e9'")
    return budget


def _only_solve(options: Mapping[str, Any]) -> dict[str, Any]:
    owner = StudyOptions.names()
    other = sorted(k for k in options if owner.get(k) != "solve")
    if other:
        raise ConfigError(f"solve() takes the solve options (solver, solver_options, tie_tolerance, "
                          f"frontier_points), not {', '.join(other)}: those belong to the study")
    return dict(options)


def _phase_columns(limits: Mapping[str, float]) -> list[str]:
    return [c for c in limits if "_ms@" in c]


def study(model, calib_data, eval_fn: Callable | None = None, *, budgets: Iterable[Any] = (),
          out: str | Path | None = None, force: bool = False, loss_fn=None, model_name: str | None = None,
          progress: bool = True, command: str | None = None, **options: Any) -> Study:
    """Run the budget-independent stages of a search once: checks, layers, search space, costs, latency (cached),
    sensitivity (reused from ``out`` when it holds the same study). Returns a :class:`Study` to :meth:`~Study.solve`.

    ``options`` are the stages' options (:mod:`mpq.options`: ``device``, ``allowed``, ``pinned``, ``sensitivity``,
    ``sensitivity_options``, ``quantizer``, ``quantizer_options``, ``profile``, ``address``, ``workers``,
    ``threads``, ``repeats``, ``warmup``, ``batch_size``, ``cache``, ``solver``, ``solver_options``,
    ``tie_tolerance``, ``frontier_points``, ``evaluate_frontier``, ``evaluate_workers``, ``metric``,
    ``higher_is_better``), all validated before anything runs. ``budgets`` are checked for reachability as soon as
    their costs are known (an impossible size or BOPs budget fails before anything is measured or scored) and
    their latency phases measured. ``out`` must be new, empty or an mpq run directory (``force`` writes into any).
    """
    from mpq.study_run import LiveStudy

    opts = StudyOptions.from_kwargs(**options)
    budgets = [_budget(b) for b in (budgets if isinstance(budgets, (list, tuple)) else [budgets])]
    record, live = LiveStudy.run(model, calib_data, eval_fn, opts, budgets, out=out, force=force, loss_fn=loss_fn,
                                 model_name=model_name, progress=progress, command=command)
    made = Study(record, live)
    made.latency_model()  # budget-independent (whole-model timings of a few dozen configs): here, not in a solve
    return made


def load_study(run_dir: str | Path) -> Study:
    """A study from the run directory it wrote (no model: it solves; :meth:`Study.attach` lets it evaluate)."""
    return Study(StudyRecord.load(run_dir))


def resume_study(run_dir: str | Path, model, calib_data, eval_fn: Callable | None = None, *,
                 budgets: Iterable[Any] = (), loss_fn=None, progress: bool = True) -> Study:
    """Run (or finish) the study in ``run_dir`` again with the options its record holds: finished sensitivities are
    reused, measured latencies come from the profile cache."""
    run_dir = Path(run_dir)
    meta = StudyRecord.read_meta(run_dir)
    options = StudyOptions.from_dict(meta["options"]).flat()
    return study(model, calib_data, eval_fn, budgets=budgets, out=run_dir, loss_fn=loss_fn,
                 model_name=meta.get("model"), progress=progress, command=meta.get("command"), **options)


__all__ = ["Study", "SearchResult", "study", "load_study", "resume_study"]
