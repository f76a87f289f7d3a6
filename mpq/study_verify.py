"""Whole-model latency a live study stands behind: configs applied on the real kernels and timed end to end in the
target's mode (:func:`mpq.workers.measure_configs`, cached in the profile cache like layer rows), for two uses.

- **The latency predictor** (:func:`calibrate`): after the layer table, ``latency_configs`` configs (the uniform
  ones, points of the latency frontier, random ones) are measured, and the predictor of
  :mod:`mpq.solvers.predictors` that predicts held-out configs of this model best is kept
  (:func:`~mpq.solvers.predictors.select_latency_predictor`). Its predictions are the frontier's and the summary's
  ``latency_predicted_ms``; the table's sum stays as ``latency_additive_ms``. The measured configs are saved with
  the study, so a study read back from disk refits the same predictor.
- **Verify before choosing** (:func:`verify`): for latency limits (the calibration batch's and each phase's:
  ``decode_ms@1``, ``prefill_ms@2048``), the solver's choice, its nearest neighbours on each limited column's
  frontier and the uniform baselines (float, INT8, INT4) that meet the budget's other limits are measured, each
  column at its own input; the returned config is the least-damage one whose measured latencies all meet the
  budget within their spread, never one measured slower everywhere than a fitting uniform baseline of no more
  predicted damage (:func:`mpq.workers.verify_columns`). When the solver's choice measures over a limit, the
  solver runs again with that limit scaled by the choice's measured-over-table ratio (a phase's table can be off
  by tens of percent: 7B-shaped decode on the H200 measured 0.490 ms where its table summed 0.422), and what it
  returns is measured too. Size and BOPs are exact: they need no verification.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from mpq.config import Choice
from mpq.cost_stage import MAIN

log = logging.getLogger(__name__)
Measure = Callable[[list[Mapping[str, str]]], list[dict[str, Any]]]


# --------------------------------------------------------------------------------------------------------------------
# measuring configs of a live study
# --------------------------------------------------------------------------------------------------------------------
def _build(model, device: str, inventory, quantizer, choice: Mapping[str, str]):
    from mpq.apply_kernels import apply

    return apply(copy.deepcopy(model), Choice(choice).to_config(), device, inventory, quantizer=quantizer)


def config_timer(study, column: str = MAIN) -> Measure:
    """``measure(choices) -> rows``: each config applied on the real kernels and timed end to end on the study's
    target, in its mode, at ``column``'s input (the profiled calibration batch, or a phase's: ``decode_ms@1``,
    ``prefill_ms@2048``; :func:`mpq.workers.measure_configs`; cached)."""
    from mpq.apply_kernels import eval_mode
    from mpq.budget import Phase
    from mpq.cost_stage import phase_example
    from mpq.workers import measure_configs, model_key
    from mpq.workers.cluster import run_on_target, runs_remotely

    live, record = study.live, study.record
    profile = live.options.profile
    table = record.costs.latency.get(column)
    if column == MAIN:
        example = live.example
    else:
        info = record.costs.phases[column]
        example = phase_example(live.calib.example, Phase(info["kind"], info["n"]))
    remote = runs_remotely(live.target, profile.profile)
    runner = functools.partial(run_on_target, target=live.target, backend=profile.profile, cpus=live.threads,
                               address=profile.address) if remote else None
    build = functools.partial(_build, live.model, live.target.device, live.inventory, live.quantizer)
    key = model_key(live.model, example)

    def measure(choices: list[Mapping[str, str]]) -> list[dict[str, Any]]:
        with eval_mode(live.model):
            return measure_configs(build, choices, example, live.target, key, cache=profile.cache,
                                   threads=live.threads, warmup=profile.warmup, repeats=profile.repeats,
                                   fingerprint=getattr(table, "fingerprint", None) if remote else None,
                                   runner=runner)

    return measure


# --------------------------------------------------------------------------------------------------------------------
# the latency predictor
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class LatencyModel:
    """The latency predictor a study uses: ``name`` (``additive`` when none was selected), the fitted predictor,
    and what it was chosen on (``info``: held-out scores, the measured configs)."""

    name: str
    predictor: Any  # an AdditiveLatency subclass of mpq.solvers.predictors
    info: dict[str, Any] = field(default_factory=dict)

    def predict(self, table: pd.DataFrame, choices: Sequence[Mapping[str, str]]) -> np.ndarray:
        return np.asarray(self.predictor.predict(table, [dict(c) for c in choices]), float)

    def describe(self) -> str:
        return self.info.get("describe") or f"latency predictor: {self.name} (the profile table's sum)"


def additive_model(fixed_ms: float, why: str) -> LatencyModel:
    from mpq.solvers.predictors import AdditiveLatency

    return LatencyModel("additive", AdditiveLatency(fixed_ms), {"name": "additive", "selected": False,
                                                                "describe": f"latency predictor: additive ({why})"})


def _latency_frontier_choices(study, points: int) -> list[dict[str, str]]:
    front = study.frontier(MAIN, points)
    keys = list(dict.fromkeys(front["choice"]))
    idx = sorted(set(np.linspace(0, len(keys) - 1, min(points, len(keys))).round().astype(int))) if keys else []
    return [dict(Choice.from_key(keys[i])) for i in idx]


def calibrate(study, count: int, folds: int = 4, seed: int = 0) -> LatencyModel:
    """Measure ``count`` configs of the live study end to end (uniform ones, latency-frontier points, random ones)
    and select the latency predictor that validates best on held-out ones (``folds``-fold)."""
    from mpq.solvers.predictors import calibration_configs

    table, fixed = study.table, float(study.costs.fixed[MAIN])
    front = _latency_frontier_choices(study, max(2, count // 4))
    configs = calibration_configs(table, front, random=max(1, count // 4), seed=seed)
    names = spread_configs(configs, table, fixed, max(count, 4))
    rows = config_timer(study)([configs[n] for n in names])
    measured = [{"name": n, "choice": Choice(configs[n]).key, "measured_ms": float(r["median_ms"]),
                 "q1_ms": r.get("q1_ms"), "q3_ms": r.get("q3_ms"), "trusted": int(bool(r.get("trusted"))),
                 "source": r.get("source")} for n, r in zip(names, rows)]
    return fit_model(table, fixed, measured, folds, seed)


def spread_configs(configs: Mapping[str, Mapping[str, str]], table: pd.DataFrame, fixed_ms: float, count: int
                   ) -> list[str]:
    """``count`` names of ``configs`` to measure: every frontier and random one, and uniform ones spread evenly
    over the table's latency range (float and the fastest and slowest among them). A space with 30-odd uniform
    configs would otherwise fill the set with the first ones by name (all 2- to 4-bit), and the predictor would
    extrapolate to INT8 and float, the configs a search compares against."""
    from mpq.solvers.predictors import AdditiveLatency

    uniform = [n for n in configs if n.startswith("uniform-")]
    others = [n for n in configs if not n.startswith("uniform-")]
    k = max(2, count - len(others))
    if uniform:
        ms = AdditiveLatency(fixed_ms).predict(table, [dict(configs[n]) for n in uniform])
        ordered = [uniform[i] for i in np.argsort(ms, kind="stable")]
        idx = sorted(set(np.linspace(0, len(ordered) - 1, min(k, len(ordered))).round().astype(int)))
        picked = [ordered[i] for i in idx]
        if "uniform-float" in configs and "uniform-float" not in picked:
            picked[len(picked) // 2] = "uniform-float"
    else:
        picked = []
    return (picked + others)[:count]


def _choices_and_ms(measured: list[dict[str, Any]]) -> tuple[list[dict[str, str]], list[float]]:
    return [dict(Choice.from_key(r["choice"])) for r in measured], [float(r["measured_ms"]) for r in measured]


def fit_model(table: pd.DataFrame, fixed_ms: float, measured: list[dict[str, Any]], folds: int = 4,
              seed: int = 0) -> LatencyModel:
    """The predictor that validates best on whole-model ``measured`` rows (``choice`` key, ``measured_ms``)."""
    from mpq.solvers.predictors import select_latency_predictor

    choices, ms = _choices_and_ms(measured)
    sel = select_latency_predictor(table, fixed_ms, choices, ms, folds=folds, seed=seed)
    untrusted = sum(1 for r in measured if not r.get("trusted"))
    text = sel.describe() + (f"; {untrusted} of {len(measured)} configs measured under load" if untrusted else "")
    info = {"name": sel.name, "selected": True, "folds": sel.folds, "scores": sel.scores, "describe": text,
            "configs": measured, "untrusted": untrusted}
    log.info(text)
    return LatencyModel(sel.name, sel.predictor, info)


def refit(table: pd.DataFrame, fixed_ms: float, info: Mapping[str, Any]) -> LatencyModel:
    """The predictor a study selected, fit again on the configs it measured (a study read from disk)."""
    from mpq.solvers.predictors import LATENCY_PREDICTORS

    name = info.get("name", "additive")
    if not info.get("selected") or name not in LATENCY_PREDICTORS or not info.get("configs"):
        return additive_model(fixed_ms, "no whole-model measurements were recorded")
    try:
        predictor = LATENCY_PREDICTORS[name](fixed_ms).fit(table, *_choices_and_ms(list(info["configs"])))
    except Exception as e:  # noqa: BLE001 - e.g. the boosted tree without xgboost installed here
        return additive_model(fixed_ms, f"the selected {name} could not be fit here: {type(e).__name__}: {e}")
    return LatencyModel(name, predictor, dict(info))


# --------------------------------------------------------------------------------------------------------------------
# verify before choosing
# --------------------------------------------------------------------------------------------------------------------
def config_totals(table: pd.DataFrame, fixed: Mapping[str, float], choice: Mapping[str, str],
                  columns: Sequence[str]) -> dict[str, float]:
    idx = table.set_index(["layer", "option"])
    picked = idx.loc[list(Choice(choice).items())]
    return {c: float(picked[c].sum()) + float(fixed.get(c, 0.0)) for c in columns}


def latency_limits(limits: Mapping[str, float]) -> dict[str, float]:
    """The finite latency limits in ``limits``, the main column first, then each phase's (``decode_ms@1``,
    ``prefill_ms@2048``, ``latency_ms@8``): what verification measures."""
    cols = sorted((c for c in limits if (c == MAIN or "_ms@" in c) and not math.isinf(limits[c])),
                  key=lambda c: c != MAIN)
    return {c: float(limits[c]) for c in cols}


def _fits_exact(totals: Mapping[str, float], limits: Mapping[str, float], measured: Sequence[str] = (MAIN,)) -> bool:
    """Within every limit but the ``measured`` ones (those are verified by measurement)."""
    return all(totals[c] <= v * (1 + 1e-9) + 1e-12 for c, v in limits.items()
               if c not in measured and c in totals and not math.isinf(v))


def uniform_within(table: pd.DataFrame, fixed: Mapping[str, float], limits: Mapping[str, float],
                   columns: Sequence[str]) -> dict[str, dict[str, str]]:
    """The uniform configs (``uniform-<option>`` -> choice) whose options all exist in ``table`` (a pinned layer
    has no float) and that meet every limit but the main latency one (that one needs a measurement or the
    study's predictor)."""
    from mpq.solvers.predictors import calibration_configs

    pairs = set(zip(table["layer"], table["option"]))
    return {n: c for n, c in calibration_configs(table, (), random=0).items()
            if n.startswith("uniform-") and all(p in pairs for p in c.items())
            and _fits_exact(config_totals(table, fixed, c, columns), limits)}


def neighbours(frontier: pd.DataFrame, chosen_key: str, chosen_ms: float, k: int, column: str = MAIN) -> list[str]:
    """The ``k`` points of ``column``'s frontier just faster and the ``k`` just slower than the chosen config."""
    part = frontier[frontier["swept"] == column] if "swept" in frontier else frontier
    part = part.drop_duplicates("choice").sort_values(column)
    part = part[part["choice"] != chosen_key]
    faster = part[part[column] <= chosen_ms]["choice"].tolist()[-k:]
    slower = part[part[column] > chosen_ms]["choice"].tolist()[:k]
    return faster[::-1] + slower


def verify(study, allocation, limits: Mapping[str, float], frontier: pd.DataFrame, model: LatencyModel,
           measure: Measure | Mapping[str, Measure] | None = None, k: int = 2,
           resolve: Callable[[dict[str, float]], Any] | None = None, rounds: int = 2):
    """Verify ``allocation`` against every latency limit in ``limits`` by measurement, each at its own input (see
    the module docstring). When the solver's choice measures over a limit, the limit the solver sees is scaled by
    that choice's measured-over-table ratio and ``resolve(limits)`` solves again (up to ``rounds`` times); every
    config measured on the way is a candidate. ``measure``: the main column's timer, or one per column (default:
    :func:`config_timer`). Returns (the allocation to return, the verification's record for run.json)."""
    from mpq.errors import BudgetError
    from mpq.evaluate_stage import candidates_of
    from mpq.solvers import Allocation
    from mpq.workers import Candidate

    budgets = latency_limits(limits)
    table, fixed = study.table, study.costs.fixed
    columns = [c for c in study.costs.columns() if c in table.columns]
    timers = _timers(study, budgets, measure)
    cands: list[Candidate] = []
    seen: dict[str, str] = {}
    allocations = {"chosen": allocation}

    def add(name: str, choice: Mapping[str, str], uniform: bool = False, force: bool = False) -> None:
        key = Choice(choice).key
        if key in seen or not (force or _fits_exact(config_totals(table, fixed, choice, columns), limits, budgets)):
            return
        seen[key] = name
        cands.append(Candidate(name, dict(choice), float(config_totals(table, {}, choice, ["score"])["score"]),
                               float("nan"), uniform))

    def add_around(alloc, tag: str) -> None:
        for col in budgets:
            at = config_totals(table, fixed, alloc.choice, [col])[col]
            for i, key in enumerate(neighbours(frontier, alloc.key, at, k, col)):
                add(f"{tag}neighbour-{i}" + ("" if col == MAIN else f"@{col}"), Choice.from_key(key))

    add("chosen", allocation.choice, force=True)
    base = candidates_of(study.record.options_per_layer(), allocation.choice)
    for name in ("float", "uniform_int8", "uniform_int4"):
        add(name, base[name], uniform=True)
    add_around(allocation, "")
    verdict = _measure(study, model, cands, budgets, timers)
    current, name, steered, history = allocation, "chosen", dict(limits), []
    for r in range(1, rounds + 1 if resolve is not None else 1):
        row = verdict.row(name)
        if row["fits"]:
            break
        for col, at in row["columns"].items():  # table units: what the solver constrains
            if not at["fits"]:
                table_ms = config_totals(table, fixed, current.choice, [col])[col]
                steered[col] = budgets[col] * table_ms / at["measured_ms"]
        try:
            current = resolve(dict(steered))
        except BudgetError as e:
            history.append({"round": r, "limits": _plain(steered), "stopped": str(e).splitlines()[0]})
            break
        if current.key in seen:
            history.append({"round": r, "limits": _plain(steered), "choice": current.key, "stopped": "measured"})
            break
        name = f"resolved-{r}"
        allocations[name] = current
        add(name, current.choice, force=True)
        add_around(current, f"{name}-")
        history.append({"round": r, "limits": _plain(steered), "choice": current.key})
        verdict = _measure(study, model, cands, budgets, timers)
    first = next(iter(budgets))
    record = {"budget_ms": budgets[first], "column": first, "budgets": budgets, "predictor": model.name,
              "met": verdict.chosen is not None, "fastest": list(verdict.fastest) if verdict.fastest else None,
              "resolved": history,
              "rows": [{**r, "choice": Choice(c.choice).key} for r, c in zip(verdict.rows, cands)]}
    solver_row = verdict.row("chosen")
    if verdict.chosen is None:
        record.update(returned="chosen", swapped_from=None,
                      reason=f"no candidate measured within the budget; the fastest measured "
                             f"({first}) is {verdict.fastest[0]} at {verdict.fastest[1]:.4g} ms")
        log.warning("latency budget not met by measurement: %s", record["reason"])
        record["describe"] = _describe(record, solver_row)
        return allocation, record
    won = verdict.row(verdict.chosen.name)
    swapped = verdict.chosen.name != "chosen"
    record.update(returned=verdict.chosen.name, swapped_from="chosen" if swapped else None,
                  reason=_why(solver_row, won, budgets) if swapped else None)
    record["describe"] = _describe(record, won, solver_row)
    log.info(record["describe"])
    if not swapped:
        return allocation, record
    if verdict.chosen.name in allocations:
        picked = allocations[verdict.chosen.name]
        return dataclasses.replace(picked, stats={**dict(picked.stats), "verified_swap": verdict.chosen.name}), record
    costs = config_totals(table, fixed, verdict.chosen.choice, columns)
    stats = {**dict(allocation.stats), "verified_swap": verdict.chosen.name}
    return Allocation(Choice(verdict.chosen.choice), won["damage"], costs, allocation.solver, allocation.status,
                      stats, allocation.frontier), record


def _timers(study, budgets: Mapping[str, float], measure: Measure | Mapping[str, Measure] | None
            ) -> dict[str, Measure]:
    given = measure if isinstance(measure, Mapping) else ({MAIN: measure} if measure is not None else {})
    return {c: given.get(c) or config_timer(study, c) for c in budgets}


def _measure(study, model: LatencyModel, cands, budgets: Mapping[str, float], timers: Mapping[str, Measure]):
    """Every candidate timed at every limited column: the main one predicted by the study's predictor, a phase
    by its profile table's sum (the solver's view of it)."""
    from mpq.workers import verify_columns

    choices = [dict(c.choice) for c in cands]
    predicted = {c: (model.predict(study.table, choices) if c == MAIN else
                     [config_totals(study.table, study.costs.fixed, ch, [c])[c] for ch in choices]) for c in budgets}
    return verify_columns(cands, budgets, timers, predicted)


def _plain(limits: Mapping[str, float]) -> dict[str, float]:
    return {c: float(v) for c, v in limits.items() if not math.isinf(v)}


def measured_floor(study, limits: Mapping[str, float], model: LatencyModel, measure: Measure | None = None,
                   uniform: int = 4, table: pd.DataFrame | None = None):
    """The smallest latency measured among the fastest configs that meet ``limits``' other limits: the
    predictor's fastest config and the ``uniform`` uniform configs of smallest predicted latency
    (:func:`mpq.workers.reachable_floor`; cached like every whole-model timing). None when no such config fits
    the other limits (then the table's floor is all there is to report). ``table``: the cost table to read
    (default the study's; before the estimator has run, its cost table)."""
    from mpq.solvers.predictors import fastest_choice
    from mpq.workers import reachable_floor

    table = study.table if table is None else table
    fixed = study.costs.fixed
    columns = [c for c in study.costs.columns() if c in table.columns]
    fitting = uniform_within(table, fixed, limits, columns)
    fast = fastest_choice(table, model.predictor)
    if _fits_exact(config_totals(table, fixed, fast, columns), limits):
        fitting = {"fastest": fast, **fitting}
    if not fitting:
        return None
    names = list(fitting)
    predicted = model.predict(table, [fitting[n] for n in names])
    keep = ["fastest"] if "fastest" in fitting else []
    keep += [n for _, n in sorted(zip(predicted, names)) if n != "fastest"][:uniform]
    return reachable_floor({n: fitting[n] for n in keep}, measure or config_timer(study))


def check_latency_floor(study, error, limits: Mapping[str, float], model: LatencyModel,
                        table: pd.DataFrame | None = None, measure: Measure | None = None):
    """A main latency limit below the profile table's floor (``error``, a :class:`~mpq.errors.BudgetError`) on a
    live study, checked by measurement: the table's sum is a prediction. Returns the measured
    :class:`~mpq.workers.Floor` when a config measured end to end meets the limit; otherwise raises a
    ``BudgetError`` whose smallest reachable latency is the one measured (the table's is kept in the message).
    ``error`` is raised unchanged when another limit fails too or nothing fits the other limits."""
    from mpq.errors import BudgetError

    failing = {c for c, lim in limits.items() if c in error.smallest and lim < error.smallest[c] - 1e-12}
    if failing != {MAIN}:
        raise error
    floor = measured_floor(study, limits, model, measure, table=table)
    if floor is None:
        raise error
    limit = float(limits[MAIN])
    if floor.ms <= limit:
        log.info("latency_ms <= %.4g ms is below the profile table's floor %.4g ms but %s measured %.4g ms end to "
                 "end: reachable", limit, error.smallest[MAIN], floor.name, floor.ms)
        return floor
    raise BudgetError(
        f"budget cannot be met: latency_ms <= {limit:.6g} ms is below the smallest latency measured end to end, "
        f"{floor.ms:.6g} ms ({floor.name}, in the target's mode; the profile table's sum says "
        f"{error.smallest[MAIN]:.6g} ms)", {**error.smallest, MAIN: floor.ms}) from None


def floor_allocation(study, floor):
    """The measured floor's config as the solver's allocation (the table's sum rules it out; the measurement
    does not): verification then measures it beside its frontier neighbours and the uniform baselines."""
    from mpq.solvers import Allocation

    table = study.table
    columns = [c for c in study.costs.columns() if c in table.columns]
    return Allocation(Choice(floor.choice), config_totals(table, {}, floor.choice, ["score"])["score"],
                      config_totals(table, study.costs.fixed, floor.choice, columns), "measured-floor", "feasible",
                      {"measured_floor_ms": floor.ms, "measured_floor_config": floor.name})


def _at(row: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
    return dict(row.get("columns") or {"latency_ms": row})


def _why(solver_row: Mapping[str, Any], won: Mapping[str, Any], budgets: Mapping[str, float]) -> str:
    parts = []
    if not solver_row["fits"]:
        over = [f"{c} {v['measured_ms']:.4g} ms (predicted {v['predicted_ms']:.4g} ms)"
                for c, v in _at(solver_row).items() if not v["fits"]]
        parts.append(f"the solver's choice measured {', '.join(over)}, over the budget "
                     f"({', '.join(f'{c} {budgets[c]:.4g} ms' for c in budgets)})")
    if solver_row["dominated_by"]:
        parts.append(f"{'it' if parts else 'the solver' + chr(39) + 's choice'} measured slower than the uniform "
                     f"{solver_row['dominated_by']} at no more predicted damage")
    if not parts:
        parts.append(f"{won['name']} also measured within the budget ({_ms(won)}) with less predicted damage "
                     f"({won['damage']:.4g} vs {solver_row['damage']:.4g})")
    return "; ".join(parts) + f"; returned {won['name']}, measured {_ms(won)}"


def _ms(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{c} {v['measured_ms']:.4g} ms" for c, v in _at(row).items())


def _describe(record: Mapping[str, Any], row: Mapping[str, Any], solver_row: Mapping[str, Any] | None = None) -> str:
    budgets = record.get("budgets") or {"latency_ms": record["budget_ms"]}
    text = "verified: " + "; ".join(
        f"{c} measured {v['measured_ms']:.4g} ms vs predicted {v['predicted_ms']:.4g} ms "
        f"({record['predictor'] if c == MAIN else 'table sum'}), budget {budgets[c]:.4g} ms"
        for c, v in _at(row).items()) + f" for {row['name']}"
    if record.get("resolved"):
        text += f"; solved again {len(record['resolved'])} time(s) with the limits scaled by measured/table"
    if not record["met"]:
        return text + f"; NOT met: {record['reason']}"
    if record.get("swapped_from"):
        text += f"; swapped from the solver's choice because {record['reason']}"
    return text


def to_json(record: Mapping[str, Any] | None) -> Any:
    """A verification record as plain JSON values (NaN and numpy scalars made plain)."""
    return json.loads(json.dumps(record, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


__all__ = ["config_timer", "LatencyModel", "additive_model", "calibrate", "fit_model", "refit", "verify", "latency_limits",
           "spread_configs", "measured_floor", "check_latency_floor", "floor_allocation", "uniform_within",
           "neighbours", "to_json"]
