"""The run dashboard: metric vs latency and vs size along the frontier, the chosen point and the uniform baselines,
and the per-layer bits of the chosen config. Reads only the run directory, never the model."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from mpq.artifacts import read_run

BASELINE_STYLE = {"float": ("float", "square", "#444444"), "uniform_int8": ("uniform INT8", "diamond", "#1f77b4"),
                  "uniform_int4": ("uniform INT4", "triangle-up", "#9467bd"),
                  "chosen": ("chosen (mixed)", "star", "#d62728")}


def _finite(v: Any) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def dashboard_data(run_dir: str | Path) -> dict[str, Any]:
    """Plain data for every view of the dashboard."""
    run = read_run(run_dir)
    frontier = run["frontier_table"]
    summary = run["summary_table"]
    layers = run["layers_table"]
    has_metric = "metric" in frontier.columns and frontier["metric"].notna().any()
    y_key = "metric" if has_metric else "score"
    y_label = run.get("metric", "metric") + " (fake-quant)" if has_metric else "predicted loss increase"
    points = []
    for r in frontier.to_dict("records"):
        hist: dict[str, int] = {}
        for opt in json.loads(r["choice"]).values():
            hist[opt] = hist.get(opt, 0) + 1
        points.append({"point": int(r["point"]), "swept": r["swept"], "size_mb": r["size_mb"],
                       "latency_ms": r["latency_ms"], "bops": r["bops"], "score": r["score"], "y": r[y_key],
                       "chosen": bool(r.get("chosen", False)), "histogram": hist})
    baselines = []
    for r in summary.to_dict("records"):
        y = r["metric_fakequant"] if has_metric else r["score"]
        baselines.append({"name": r["name"], "size_mb": r["size_mb"], "latency_predicted_ms": r["latency_predicted_ms"],
                          "latency_measured_ms": r["latency_measured_ms"], "y": y, "metric_real": r["metric_real"],
                          "histogram": json.loads(r["histogram"])})
    bits = [{"layer": r["layer"], "option": r["option"], "w_bits": r["w_bits"] if _finite(r["w_bits"]) else 32,
             "a_bits": r["a_bits"] if _finite(r["a_bits"]) else 32, "score": r["score"],
             "latency_ms": r["latency_ms"], "float_latency_ms": r["float_latency_ms"], "size_mb": r["size_mb"]}
            for r in layers.to_dict("records")]
    return {"title": f"mpq: {run.get('model')} on {run.get('device')} ({run.get('fingerprint', {}).get('name')})",
            "budget": run.get("budget_text"), "metric": run.get("metric"), "y_label": y_label,
            "higher_is_better": run.get("higher_is_better", True), "frontier": points, "baselines": baselines,
            "layers": bits, "reference": run.get("reference", {})}


def draw_dashboard(data: dict[str, Any]):
    """A Plotly figure: two frontier panels on top, per-layer bits of the chosen config below."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=2, cols=2, specs=[[{}, {}], [{"colspan": 2}, None]], vertical_spacing=0.16,
                        subplot_titles=(f"{data['y_label']} vs predicted latency",
                                        f"{data['y_label']} vs size", "chosen config: bits per layer"))
    for col, x_key, x_title in ((1, "latency_ms", "latency per forward (ms)"), (2, "size_mb", "size (MB)")):
        # the frontier swept on this panel's resource is the line; the other sweep's points are context
        for own in (True, False):
            line = sorted((p for p in data["frontier"] if (p["swept"] == x_key) == own), key=lambda p: p[x_key])
            if not line:
                continue
            fig.add_trace(go.Scatter(
                x=[p[x_key] for p in line], y=[p["y"] for p in line], mode="lines+markers" if own else "markers",
                name="frontier (ILP)" if own else "other sweep's points", legendgroup=f"frontier{own}",
                showlegend=col == 1, marker=dict(size=7 if own else 6, color="#2ca02c" if own else "#b5dcb5"),
                customdata=[[p["point"], p["swept"], p["size_mb"], p["latency_ms"], p["score"],
                             ", ".join(f"{k}:{v}" for k, v in sorted(p["histogram"].items()))] for p in line],
                hovertemplate="point %{customdata[0]} (swept %{customdata[1]})<br>size %{customdata[2]:.4g} MB<br>"
                              "latency %{customdata[3]:.4g} ms<br>predicted loss increase %{customdata[4]:.3g}"
                              "<br>y %{y:.4g}<br>%{customdata[5]}<extra></extra>"), row=1, col=col)
        for b in data["baselines"]:
            label, symbol, color = BASELINE_STYLE.get(b["name"], (b["name"], "circle", "#888"))
            x = b["latency_predicted_ms"] if x_key == "latency_ms" else b["size_mb"]
            fig.add_trace(go.Scatter(
                x=[x], y=[b["y"]], mode="markers", name=label, legendgroup=b["name"], showlegend=col == 1,
                marker=dict(size=16 if b["name"] == "chosen" else 11, symbol=symbol, color=color,
                            line=dict(width=1, color="white")),
                hovertemplate=f"{label}<br>size {b['size_mb']:.4g} MB<br>latency predicted "
                              f"{b['latency_predicted_ms']:.4g} ms, measured {b['latency_measured_ms']:.4g} ms"
                              f"<br>{data['metric']} real kernels {b['metric_real']}<extra></extra>"),
                row=1, col=col)
        if x_key == "latency_ms":
            meas = [b for b in data["baselines"] if _finite(b["latency_measured_ms"])]
            fig.add_trace(go.Scatter(
                x=[b["latency_measured_ms"] for b in meas], y=[b["y"] for b in meas], mode="markers",
                name="measured latency (applied model)", marker=dict(size=9, symbol="x", color="#ff7f0e"),
                text=[BASELINE_STYLE.get(b["name"], (b["name"],))[0] for b in meas],
                hovertemplate="%{text}: measured %{x:.4g} ms<extra></extra>"), row=1, col=1)
        fig.update_xaxes(title_text=x_title, row=1, col=col)
        fig.update_yaxes(title_text=data["y_label"], row=1, col=col)
    layers = data["layers"]
    fig.add_trace(go.Bar(
        x=[l["layer"] for l in layers], y=[l["w_bits"] for l in layers], name="weight bits",
        marker_color="#17becf", text=[l["option"] for l in layers], textposition="outside",
        customdata=[[l["a_bits"], l["score"], l["latency_ms"], l["float_latency_ms"], l["size_mb"]] for l in layers],
        hovertemplate="%{x}: %{text}<br>weight bits %{y}, activation bits %{customdata[0]}<br>predicted loss "
                      "increase %{customdata[1]:.3g}<br>latency %{customdata[2]:.4g} ms (float %{customdata[3]:.4g})"
                      "<br>size %{customdata[4]:.4g} MB<extra></extra>"), row=2, col=1)
    fig.update_yaxes(title_text="weight bits (32 = float)", type="log", tickvals=[2, 4, 8, 16, 32], row=2, col=1)
    fig.update_xaxes(tickangle=-45 if len(layers) > 8 else 0, row=2, col=1)
    fig.update_layout(height=900, template="plotly_white", legend=dict(orientation="h", y=1.08),
                      margin=dict(t=110, l=70, r=30, b=90))
    return fig


def build_dashboard_html(data: dict[str, Any]) -> str:
    """A standalone page: a summary header and the figure, plotly.js embedded so it works offline."""
    import plotly.io as pio

    fig_html = pio.to_html(draw_dashboard(data), include_plotlyjs=True, full_html=False, div_id="mpq-dashboard")
    rows = []
    for b in data["baselines"]:
        label = BASELINE_STYLE.get(b["name"], (b["name"],))[0]
        cells = [label, f"{b['size_mb']:.4g}", f"{b['latency_predicted_ms']:.4g}", f"{b['latency_measured_ms']:.4g}",
                 "n/a" if not _finite(b["metric_real"]) else f"{b['metric_real']:.4g}"]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    head = ("<tr><th>config</th><th>size (MB)</th><th>latency predicted (ms)</th><th>latency measured (ms)</th>"
            f"<th>{html.escape(str(data['metric']))} (real kernels)</th></tr>")
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(data['title'])}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;margin:8px 0 16px}}
td,th{{border:1px solid #ddd;padding:4px 10px;text-align:right}} th{{background:#f4f4f4}} td:first-child{{text-align:left}}</style>
</head><body>
<h2>{html.escape(data['title'])}</h2>
<p>budget: {html.escape(str(data['budget']))}</p>
<table>{head}{''.join(rows)}</table>
{fig_html}
</body></html>
"""


def write_dashboard(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``dashboard.html`` for a run directory; returns its path."""
    path = Path(out) if out else Path(run_dir) / "dashboard.html"
    path.write_text(build_dashboard_html(dashboard_data(run_dir)))
    return path
