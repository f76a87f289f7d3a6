"""Judging estimators against the measured truth.

For every estimator: how well its per-(layer, option) scores rank the measured single-layer damage (Kendall tau,
Spearman rho), and how well its *summed* scores rank the measured damage of random mixed configs, which is the
additivity the ILP relies on. The truth is the task-loss increase on held-out data (fake-quant with the target
kernels' numerics); the estimators see only the calibration data. Extra tables an estimator exposes (each entropy
proxy, each decoupled metric) are judged too, as ``estimator:table``.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import pandas as pd
from scipy.stats import kendalltau, spearmanr
from torch import nn

from mpq.calib import CalibrationSet, LossFn
from mpq.config import FLOAT
from mpq.layers import LayerInventory, discover_layers
from mpq.plugins import ESTIMATORS, accepted_options
from mpq.sensitivity.base import MapFn, get_estimator
from mpq.sensitivity.measured import config_damage, single_layer_deltas
from mpq.space import SearchSpace, build_search_space, generic_space

log = logging.getLogger(__name__)

ALL = ("fisher", "hessian", "lrp", "decoupled", "entropy", "measured")


@dataclass
class EstimatorReport:
    table: pd.DataFrame  # one row per estimator (and exposed table): correlations, cost
    options: pd.DataFrame  # per (layer, option): truth and every estimator's normalised score
    configs: pd.DataFrame  # per random config: truth and every estimator's summed score

    def best(self) -> dict[str, Any]:
        return self.table.sort_values("tau_config", ascending=False).iloc[0].to_dict()


def random_configs(space: SearchSpace, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` configs with every layer's option drawn uniformly from the space (float included)."""
    rng = np.random.default_rng(seed)
    return [{layer: opts[rng.integers(len(opts))].name for layer, opts in space.options.items()} for _ in range(n)]


def _corr(x: Iterable[float], y: Iterable[float]) -> tuple[float, float]:
    x, y = np.asarray(list(x), float), np.asarray(list(y), float)
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    return float(kendalltau(x, y).statistic), float(spearmanr(x, y).statistic)


def judge_estimators(model: nn.Module, calib: Any, heldout: Any, estimators: Iterable[str] = ALL,
                     n_configs: int = 50, device: str | None = "cpu", space: SearchSpace | None = None,
                     inventory: LayerInventory | None = None, loss_fn: LossFn | None = None, seed: int = 0,
                     options: Mapping[str, Mapping[str, Any]] | None = None, backend: str = "inprocess",
                     progress: bool = True, out: str | Path | None = None, map_fn: MapFn | None = None
                     ) -> EstimatorReport:
    """Run each estimator on ``calib`` and rank it against the measured damage on ``heldout``. ``backend="ray"``
    fans the measured damage (and the measuring estimators) out through ``map_fn``."""
    calib = CalibrationSet.from_any(calib)
    held = CalibrationSet.from_any(heldout)
    inventory = inventory or discover_layers(model, calib.example)
    if space is None:
        space = generic_space(inventory) if device is None else build_search_space(inventory, device)
    truth = single_layer_deltas(model, held, space, inventory, loss_fn, ("loss",), backend, progress=progress,
                                map_fn=map_fn)
    truth = truth.rename(columns={"loss": "truth"})
    configs = random_configs(space, n_configs, seed)
    damage = config_damage(model, held, configs, inventory, space.device, loss_fn, ("loss",), backend,
                           progress=progress, desc="random configs", quantizer=space.quantizer, map_fn=map_fn)
    cfg = pd.DataFrame({"config": [json.dumps(c, sort_keys=True) for c in configs],
                        "truth": [d["loss"] for d in damage]})

    quant = truth["option"] != FLOAT.name
    opt_table = truth.copy()
    rows = []

    def judge(label: str, scores: pd.DataFrame, column: str, cost: Mapping[str, Any]) -> None:
        merged = truth[["layer", "option"]].merge(scores[["layer", "option", column]], how="left")
        values = merged[column].astype(float).to_numpy()
        opt_table[label] = values
        lookup = dict(zip(zip(merged["layer"], merged["option"]), values))
        cfg[label] = [sum(lookup[(l, o)] for l, o in c.items()) for c in configs]
        tau_o, rho_o = _corr(values[quant.to_numpy()], truth.loc[quant, "truth"])
        tau_c, rho_c = _corr(cfg[label], cfg["truth"])
        rows.append({"estimator": label, "tau_option": tau_o, "rho_option": rho_o, "tau_config": tau_c,
                     "rho_config": rho_c, "seconds": cost.get("seconds"), "forward_passes": cost.get("forward_passes"),
                     "backward_passes": cost.get("backward_passes")})

    # the additivity ceiling: summed single-layer truths against the truth of each config
    judge("truth (single-layer sum)", truth, "truth", {})
    for name in estimators:
        t0 = time.perf_counter()
        est = get_estimator(name, map_fn, **_member_options(name, (options or {}).get(name, {}), backend))
        res = est.run(model, calib, space, inventory, loss_fn=loss_fn, progress=progress)
        res.cost.setdefault("seconds", time.perf_counter() - t0)
        # ranks are judged on raw scores: normalising is a positive scale (ranks unchanged) but clips negative raw
        # values (a measured loss *decrease*), which would hide part of what the estimator says
        judge(name, res.scores, "raw_score", res.cost)
        for table_name, table in res.tables.items():
            if "value" in table.columns and len(res.tables) > 1:
                judge(f"{name}:{table_name}", table, "value", {"seconds": res.cost.get("seconds")})
        log.info("%s: %s", name, rows[-1 - (len(res.tables) if len(res.tables) > 1 else 0)])
    report = EstimatorReport(pd.DataFrame(rows), opt_table, cfg)
    if out is not None:
        write_report(report, out)
    return report


def _member_options(name: str, given: Mapping[str, Any], backend: str) -> dict[str, Any]:
    """An estimator's options; one that measures runs where the judge's own measurements run unless told."""
    opts = dict(given)
    if "backend" in accepted_options(ESTIMATORS.get(name))[0]:
        opts.setdefault("backend", backend)
    return opts


def write_report(report: EstimatorReport, out: str | Path) -> Path:
    """``estimators.csv``, ``estimator_options.csv``, ``estimator_configs.csv`` and a scatter plot page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report.table.to_csv(out / "estimators.csv", index=False)
    report.options.to_csv(out / "estimator_options.csv", index=False)
    report.configs.to_csv(out / "estimator_configs.csv", index=False)
    try:
        (out / "estimators.html").write_text(_html(report))
    except ImportError:  # the tables are the result; the page needs the optional plotly
        log.warning("plotly is not installed: %s has the tables but no estimators.html", out)
    return out


def _html(report: EstimatorReport) -> str:
    import plotly.graph_objects as go
    import plotly.io as pio
    from plotly.subplots import make_subplots

    labels = [r for r in report.table["estimator"] if ":" not in r]
    cols = min(3, len(labels))
    rows = -(-len(labels) // cols)
    taus = dict(zip(report.table["estimator"], report.table["tau_config"]))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[f"{l} (config tau {taus[l]:.2f})" for l in labels])
    for i, label in enumerate(labels):
        fig.add_trace(go.Scatter(x=report.configs[label], y=report.configs["truth"], mode="markers", name=label,
                                 showlegend=False, hovertext=report.configs["config"]),
                      row=i // cols + 1, col=i % cols + 1)
        fig.update_xaxes(title_text="summed score", row=i // cols + 1, col=i % cols + 1)
        fig.update_yaxes(title_text="measured loss increase", row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(height=330 * rows, template="plotly_white",
                      title="Random configs: each estimator's summed score against the measured loss increase")
    table = report.table.round(4).to_html(index=False)
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mpq estimators</title></head><body "
            f"style='font-family:system-ui,sans-serif;margin:24px'><h2>Sensitivity estimators vs measured damage"
            f"</h2>{table}{pio.to_html(fig, include_plotlyjs=True, full_html=False)}</body></html>")
