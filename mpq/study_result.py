"""A :class:`~mpq.study_result.SearchResult` from one solve: the config, the candidates' predicted (and, when evaluated,
measured) numbers, the per-layer table, the run's info, and its run directory."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch

from mpq.budget import Budget
from mpq.config import FLOAT, Choice
from mpq.cost_stage import MAIN

log = logging.getLogger(__name__)


@dataclass
class SearchResult:
    """What a search found: the chosen config, the frontier, per-layer tables, and measured numbers."""

    config: Any  # BitConfig
    frontier: pd.DataFrame
    layers: pd.DataFrame
    table: pd.DataFrame
    summary: pd.DataFrame
    info: dict[str, Any]
    latency: Any = None  # mpq.workers.LatencyTable (or its frame, for a study loaded from disk)
    sensitivity: Any = None  # mpq.sensitivity.SensitivityResult
    inventory: Any = None  # LayerInventory of a live study
    run_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> dict[str, Any]:
        return self.summary.set_index("name").loc[name].to_dict()

    @property
    def measured(self) -> dict[str, Any]:
        """The applied (real-kernel) model's measured latency and metric for the chosen config (NaN before it is
        evaluated)."""
        r = self.row("chosen")
        return {"latency_ms": r["latency_measured_ms"], "metric": r["metric_real"],
                "metric_fakequant": r["metric_fakequant"], "latency_predicted_ms": r["latency_predicted_ms"]}

    def __repr__(self) -> str:
        r = self.row("chosen")
        return (f"SearchResult({self.config!r}, size {r['size_mb']:.4g} MB, predicted {r['latency_predicted_ms']:.4g} "
                f"ms, measured {r['latency_measured_ms']:.4g} ms, {self.info.get('metric')} {r['metric_real']})")


def build_result(study, budget: Budget, limits: Mapping[str, float], allocation, frontier: pd.DataFrame, solve,
                 evaluate: bool, seconds: dict[str, float], out: str | Path | None, force: bool,
                 latency_model=None, verification: Mapping[str, Any] | None = None):
    from mpq.evaluate_stage import candidates_of, evaluate as measure, predicted_summary
    from mpq.study_record import combined_frontier

    record = study.record
    frontier = combined_frontier([frontier], allocation)
    candidates = candidates_of(record.options_per_layer(), allocation.choice)
    summary = predicted_summary(record.table, record.costs.fixed, candidates, record.costs.latency_columns())
    summary = with_latency_model(summary, frontier, record.table, latency_model, candidates)
    summary = with_bits(summary, study, candidates)
    summary = with_verified(summary, verification)
    in_model: dict[str, float] = {}
    frontier["metric"] = float("nan")
    if evaluate:
        t0 = time.perf_counter()
        summary, in_model = measure(study.live.context(), summary, candidates, frontier)
        seconds["evaluate"] = time.perf_counter() - t0
    if len(frontier):
        frontier["chosen"] = frontier["choice"] == allocation.key
        frontier.insert(0, "point", range(len(frontier)))
    config = allocation.choice.to_config(record.quantizer, model=record.model_name, device=record.device,
                                         budget=str(budget), estimator=record.estimator, solver=allocation.solver)
    layers = layer_table(record, allocation.choice, in_model)
    info = run_info(record, budget, limits, allocation, solve, evaluate, seconds)
    info["latency_model"] = {k: v for k, v in (latency_model.info if latency_model else {}).items()
                             if k != "configs"}
    if verification is not None:
        from mpq.study_verify import to_json

        info["verification"] = to_json(verification)
    main = record.costs.latency.get(MAIN)
    result = SearchResult(config, frontier, layers, record.table, summary, info, main, record.sensitivity,
                          study.live.inventory if study.live else None,
                          extra={"kept_float": record.kept_float, "allocation": allocation})
    if out is not None:
        write(result, out, force)
    return result


def with_latency_model(summary: pd.DataFrame, frontier: pd.DataFrame, table: pd.DataFrame, model,
                       candidates: Mapping[str, Choice]) -> pd.DataFrame:
    """``latency_predicted_ms`` from the study's latency predictor (the table's sum kept as
    ``latency_additive_ms``), in the summary and along the frontier."""
    summary = summary.copy()
    summary.insert(list(summary.columns).index("latency_predicted_ms") + 1, "latency_additive_ms",
                   summary["latency_predicted_ms"])
    frontier["latency_predicted_ms"] = float("nan")
    if model is None or MAIN not in table.columns:
        return summary
    summary["latency_predicted_ms"] = model.predict(table, [candidates[n] for n in summary["name"]])
    if len(frontier):
        keys = list(dict.fromkeys(frontier["choice"]))
        by_key = dict(zip(keys, model.predict(table, [Choice.from_key(k) for k in keys])))
        frontier["latency_predicted_ms"] = [float(by_key[k]) for k in frontier["choice"]]
    return summary


def with_bits(summary: pd.DataFrame, study, candidates: Mapping[str, Choice]) -> pd.DataFrame:
    """Each row's average bits per weight over the quantizable layers, as the device's kernels store them
    (:func:`mpq.costs.bits_per_weight`; NaN for a study read from disk, which holds no layer inventory)."""
    from mpq.costs import bits_per_weight

    inventory = study.live.inventory if study.live is not None else study.costs.inventory
    summary = summary.copy()
    for col in ("bits_per_weight", "bits_per_weight_nominal"):
        summary[col] = float("nan")
    if inventory is None:
        return summary
    for i, name in enumerate(summary["name"]):
        bpw = bits_per_weight(inventory, dict(candidates[name]), study.record.device)
        summary.loc[i, ["bits_per_weight", "bits_per_weight_nominal"]] = [bpw.with_overhead, bpw.without_overhead]
    return summary


def with_verified(summary: pd.DataFrame, verification: Mapping[str, Any] | None) -> pd.DataFrame:
    """The measured latency of each row that verification timed end to end (evaluation measures them again)."""
    rows = {r["choice"]: (r.get("columns") or {MAIN: r}).get(MAIN) for r in (verification or {}).get("rows", [])}
    summary = summary.copy()
    for i, key in enumerate(summary["choice"]):
        r = rows.get(key)
        if r is not None:  # a row verified at the calibration batch (a phase's timing is not this column's)
            summary.loc[i, ["latency_measured_ms", "latency_measured_q1_ms", "latency_measured_q3_ms"]] = \
                [r["measured_ms"], r.get("q1_ms", float("nan")), r.get("q3_ms", float("nan"))]
    return summary


def write(result, out: str | Path, force: bool = False) -> Path:
    """The run directory of a result: tables, config, report and dashboard."""
    from mpq.artifacts import prepare_run_dir, write_run
    from mpq.dashboards import write_dashboard
    from mpq.report import write_report

    out = prepare_run_dir(out, force)
    write_run(result, out)
    write_report(out)
    write_dashboard(out)
    return out


def layer_table(record, choice: Choice, in_model: Mapping[str, float]) -> pd.DataFrame:
    """Per layer: its facts, its options, the chosen one with its score and costs, and its float costs."""
    idx = record.table.set_index(["layer", "option"])
    options = record.options_per_layer()
    rows = []
    for facts in record.layers.to_dict("records"):
        name = facts["layer"]
        opt = choice.get(name, FLOAT.name)
        r = idx.loc[(name, opt)]
        flt = idx.loc[(name, FLOAT.name)] if (name, FLOAT.name) in idx.index else None
        rows.append({
            **{k: facts[k] for k in ("layer", "kind", "weight_shape", "params", "macs", "calls")},
            "options": " ".join(options[name]), "option": opt, "w_bits": r["w_bits"], "a_bits": r["a_bits"],
            "group_size": r["group_size"], "score": r["score"], "size_mb": r["size_mb"], "bops": r["bops"],
            "latency_ms": r[MAIN], "latency_in_model_ms": in_model.get(name, float("nan")),
            "float_latency_ms": None if flt is None else flt[MAIN], "float_size_mb": facts["float_size_mb"]})
    out = pd.DataFrame(rows)
    stats = getattr(record.sensitivity, "layer_stats", None)
    if stats is not None and len(stats) and "layer" in stats.columns:
        out = out.merge(stats, on="layer", how="left")
    return out


def run_info(record, budget: Budget, limits: Mapping[str, float], allocation, solve, evaluate: bool,
             seconds: Mapping[str, float]) -> dict[str, Any]:
    """What run.json, the report and the dashboard say about how a result was found."""
    opts = record.options
    profile = dict(record.profile_info.get(MAIN, {}))
    return {
        "model": record.model_name, "device": record.device, "target": record.target, "mode": record.mode,
        "target_spec": record.options.space.device,
        "fingerprint": profile.pop("fingerprint", {}), "fingerprint_id": profile.pop("fingerprint_id", None),
        "metric": opts.evaluate.metric, "higher_is_better": opts.evaluate.higher_is_better,
        "budget": budget.given(), "budget_text": str(budget), "limits": dict(limits),
        "reference": dict(record.costs.reference), "fixed": dict(record.costs.fixed),
        "float_layers_latency_ms": record.costs.float_layers_ms.get(MAIN), "batch_size": record.batch_size,
        "threads": record.threads, "estimator": record.estimator,
        "quantizer": None if record.quantizer is None else record.quantizer.to_dict(),
        "sensitivity_cost": getattr(record.sensitivity, "cost", {}), "solver": allocation.solver,
        "solver_status": allocation.status, "tie_tolerance": solve.tie_tolerance if solve.breaks_ties else None,
        "sensitivity_tables": sorted(getattr(record.sensitivity, "tables", {})),
        "solver_stats": dict(allocation.stats), "chosen_score": allocation.score, "profile": profile,
        "phases": dict(record.costs.phases), "evaluated": evaluate,
        "layers": len(record.layers), "kept_float": len(record.kept_float), "space_size": record.space_size,
        "space_notes": dict(record.space_notes), "stages_seconds": {**record.stages_seconds, **seconds},
        "study_dir": None if record.out is None else str(record.out), "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": record.command,
    }


__all__ = ["SearchResult", "build_result", "layer_table", "run_info", "write"]
