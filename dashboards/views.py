"""Plain data for every view of the dashboard, extracted from a run directory (no Plotly here: testable alone).

Every function takes the dict :func:`mpq.artifacts.read_run` returns (its ``choice`` cells are already
:class:`~mpq.config.Choice` objects, its ``histogram`` cells dicts) and gives lists and numbers. Views other than
the frontier (which overlays runs) are plug-ins: :func:`register_view` pairs a data function with its figure,
under a heading and an order, in the ``mpq.views`` registry.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from mpq.config import LayerBits
from mpq.plugins import VIEWS

MAX_POINTS = 200  # frontier points per source and heatmap columns, beyond which views are decimated
LABELS = {"float": "float", "chosen": "chosen (mixed)", "uniform_int8": "uniform INT8", "uniform_int4": "uniform INT4"}
X_AXES = {"latency_ms": "latency per forward (ms)", "size_mb": "size (MB)", "bops": "GBOPs"}


@dataclass(frozen=True)
class View:
    """A dashboard view: ``extract(run) -> data`` (None: nothing to show for this run) and ``figure(data) ->
    plotly JSON``, shown under ``heading`` in ``order``."""

    name: str
    heading: str
    extract: Callable[[dict], dict | None]
    figure: Callable[[dict], dict]
    order: int = 100


def register_view(name: str, heading: str, figure: Callable[[dict], dict], order: int = 100):
    """Decorator for a view's data function: ``@register_view("mine", "My view", my_figure)``."""
    def decorate(extract: Callable[[dict], dict | None]) -> Callable[[dict], dict | None]:
        VIEWS.add(name, View(name, heading, extract, figure, order))
        return extract

    return decorate


def registered_views() -> list[View]:
    return sorted((v for _, v in VIEWS.items()), key=lambda v: (v.order, v.name))


def _finite(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _bits(option: str) -> int:
    return LayerBits.parse(option).w_bits or 32


def _decimate(n: int, keep: int = MAX_POINTS) -> np.ndarray:
    """Indices of at most ``keep`` of ``n`` items, evenly spread, first and last included."""
    if n <= keep:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, keep).round().astype(int))


def _histogram(choice: dict[str, str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for opt in choice.values():
        out[opt] = out.get(opt, 0) + 1
    return dict(sorted(out.items()))


def run_label(run: dict) -> str:
    device = run.get("target") or run.get("device")
    return f"{Path(run['run_dir']).name} ({run.get('model')}, {device}, {run.get('estimator')})"


def summary_view(run: dict) -> dict:
    rows = []
    for r in run["summary_table"].to_dict("records"):
        rows.append({"name": r["name"], "label": LABELS.get(r["name"], r["name"]), "size_mb": _finite(r["size_mb"]),
                     "bops": _finite(r["bops"]), "latency_predicted_ms": _finite(r["latency_predicted_ms"]),
                     "latency_measured_ms": _finite(r["latency_measured_ms"]),
                     "metric_fakequant": _finite(r["metric_fakequant"]), "metric_real": _finite(r["metric_real"]),
                     "score": _finite(r["score"])})
    by = {r["name"]: r for r in rows}
    chosen, flt = by.get("chosen", {}), by.get("float", {})

    def ratio(a, b):
        return None if not a or not b else a / b

    device = run.get("target") or run.get("device")
    return {"title": f"{run.get('model')} on {device} ({run.get('fingerprint', {}).get('name')})",
            "run": run_label(run), "budget": run.get("budget_text"), "metric": run.get("metric", "metric"),
            "higher_is_better": run.get("higher_is_better", True), "rows": rows,
            "size_vs_float": ratio(chosen.get("size_mb"), flt.get("size_mb")),
            "latency_vs_float": ratio(chosen.get("latency_measured_ms"), flt.get("latency_measured_ms")),
            "solver": run.get("solver"), "estimator": run.get("estimator")}


class _Choices:
    """Per-point configs stored compactly: each point as a list of indices into one list of option names."""

    def __init__(self, layers: list[str]):
        self.layers, self.options, self.points = layers, [], {}
        self._index: dict[str, int] = {}

    def add(self, pid: str, choice: dict[str, str]) -> None:
        idx = []
        for l in self.layers:
            opt = choice.get(l, "float")
            if opt not in self._index:
                self._index[opt] = len(self.options)
                self.options.append(opt)
            idx.append(self._index[opt])
        self.points[pid] = idx

    def as_dict(self) -> dict:
        return {"options": self.options, "bits": [_bits(o) for o in self.options], "points": self.points}


def frontier_view(run: dict, prefix: str = "") -> dict:
    """Frontier points of every source (each sweep and the solver's own), the baselines, and per-point choices."""
    frontier: pd.DataFrame = run["frontier_table"]
    has_metric = "metric" in frontier.columns and frontier["metric"].notna().any()
    y_key = "metric" if has_metric else "score"
    layers = list(run["layers_table"]["layer"])
    phase_axes = [c for c in frontier.columns if "_ms@" in c and frontier[c].notna().any()]
    sources, choices = {}, _Choices(layers)
    for source, part in frontier.groupby("swept", sort=False):
        part = part.sort_values(source if source in part.columns else "latency_ms").reset_index(drop=True)
        pts = []
        for i in _decimate(len(part)):
            r = part.iloc[int(i)]
            choice = r["choice"]
            pid = f"{prefix}{source}:{int(r['point']) if 'point' in r else int(i)}"
            choices.add(pid, choice)
            pts.append({"id": pid, "size_mb": _finite(r["size_mb"]), "latency_ms": _finite(r["latency_ms"]),
                        "bops": _finite(r["bops"]) / 1e9 if _finite(r["bops"]) is not None else None,
                        **{c: _finite(r[c]) for c in phase_axes if c in r},
                        "y": _finite(r[y_key]), "score": _finite(r["score"]), "exact": bool(r.get("exact", True)),
                        "chosen": bool(r.get("chosen", False)), "histogram": _histogram(choice)})
        sources[str(source)] = pts
    baselines = []
    for r in run["summary_table"].to_dict("records"):
        choice = r["choice"]
        pid = f"{prefix}baseline:{r['name']}"
        choices.add(pid, choice)
        baselines.append({"id": pid, "name": r["name"], "label": LABELS.get(r["name"], r["name"]),
                          "size_mb": _finite(r["size_mb"]), "latency_ms": _finite(r["latency_predicted_ms"]),
                          "latency_measured_ms": _finite(r["latency_measured_ms"]),
                          "bops": (_finite(r["bops"]) or 0) / 1e9,
                          "y": _finite(r["metric_fakequant"] if has_metric else r["score"]),
                          **{c: _finite(r.get(f"{c}_predicted")) for c in phase_axes},
                          "metric_real": _finite(r["metric_real"]), "histogram": r["histogram"]})
    return {"sources": sources, "baselines": baselines, "choices": choices.as_dict(), "layers": layers,
            "y_label": f"{run.get('metric', 'metric')} (fake-quant)" if has_metric else "score (normalised)",
            "metric": run.get("metric", "metric"), "run": run_label(run),
            "x_axes": {**X_AXES, **{c: f"latency at {c.partition('@')[0][:-3]} {c.partition('@')[2]} (ms)"
                                    for c in phase_axes}}}


from mpq.dashboards import figures as _fig  # noqa: E402  (the figures pair with the views registered below)


@register_view("bits", "Per-layer bits", _fig.bits_figure, order=10)
def bits_view(run: dict) -> dict:
    """The chosen config's per-layer bits (the click target's initial state)."""
    layers = run["layers_table"]
    return {"layers": list(layers["layer"]), "options": list(layers["option"]),
            "bits": [_bits(o) for o in layers["option"]]}


@register_view("heatmap", "Bits along the frontier", _fig.heatmap_figure, order=20)
def heatmap_view(run: dict) -> dict:
    """Bits of every layer along the size frontier (columns cheapest to largest), decimated to ``MAX_POINTS``."""
    frontier = run["frontier_table"]
    part = frontier[frontier["swept"] == "size_mb"] if (frontier["swept"] == "size_mb").any() else frontier
    part = part.drop_duplicates("choice").sort_values("size_mb").reset_index(drop=True)
    cols = [part.iloc[int(i)] for i in _decimate(len(part))]
    layers = list(run["layers_table"]["layer"])
    choices = [c["choice"] for c in cols]
    return {"layers": layers, "columns": [f"{c['size_mb']:.4g} MB" for c in cols],
            "z": [[_bits(ch.get(l, "float")) for ch in choices] for l in layers],
            "text": [[ch.get(l, "float") for ch in choices] for l in layers]}


@register_view("sensitivity", "Sensitivity per layer", _fig.sensitivity_figure, order=30)
def sensitivity_view(run: dict) -> dict:
    """Per layer, each estimator's normalised score of its most aggressive option (the run's own estimator, the
    tables it exposes, and every estimator a sensitivity report in the run directory judged)."""
    costs = run["costs_table"]
    layers = list(run["layers_table"]["layer"])
    series: dict[str, list[float]] = {}
    for col in [c for c in costs.columns if c == "score" or c.startswith("score_")]:
        per = costs.groupby("layer")[col].max()
        series[run.get("estimator", "score") if col == "score" else col[len("score_"):]] = [
            _finite(per.get(l)) or 0.0 for l in layers]
    opts = run.get("estimator_options_table")
    if opts is not None and len(opts):
        for col in [c for c in opts.columns if c not in ("layer", "option", "truth") and ":" not in c]:
            per = opts.groupby("layer")[col].max()
            total = float(per.clip(lower=0).sum()) or 1.0
            series.setdefault(f"{col} (report)", [(_finite(per.get(l)) or 0.0) / total for l in layers])
    return {"layers": layers, "series": series}


@register_view("latency", "Latency per layer", _fig.latency_figure, order=40)
def latency_view(run: dict) -> dict:
    """The chosen config's per-layer latency: the profile table's (predicted) and timed in place (measured)."""
    t = run["layers_table"]
    return {"layers": list(t["layer"]), "options": list(t["option"]),
            "predicted": [_finite(v) for v in t["latency_ms"]],
            "measured": [_finite(v) for v in t.get("latency_in_model_ms", pd.Series([None] * len(t)))],
            "float": [_finite(v) for v in t["float_latency_ms"]]}


@register_view("quality", "Estimator quality", _fig.quality_figure, order=50)
def quality_view(run: dict) -> dict | None:
    """Estimator quality from a sensitivity report in the run directory: summed score vs measured damage."""
    configs, table = run.get("estimator_configs_table"), run.get("estimators_table")
    if configs is None or table is None or not len(configs):
        return None
    taus = dict(zip(table["estimator"], table["tau_config"]))
    names = [c for c in configs.columns if c not in ("config", "truth") and ":" not in c]
    return {"truth": [float(v) for v in configs["truth"]],
            "estimators": {n: {"x": [float(v) for v in configs[n]], "tau": _finite(taus.get(n))} for n in names}}
