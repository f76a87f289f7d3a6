"""The dashboard page: a summary header and every view's figure, plotly.js embedded so it works offline.

Figures travel as JSON blocks (``<script type="application/json" id="fig-NAME">``) that a short script plots; a
click on a frontier point redraws the per-layer bits with that point's config. The script records JavaScript errors
and the rendering time on ``<body>`` (``data-errors``, ``data-render-ms``, ``data-rendered``) so a headless browser
can check the page.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Iterable

from mpq.artifacts import read_run
from mpq.dashboards import views as V
from mpq.dashboards.figures import frontier_figure

FRONTIER_HEADING = "Frontier"  # the frontier overlays every run; the other views are registered plug-ins


def dashboard_data(run_dirs: str | Path | Iterable[str | Path], side_by_side: bool = False) -> dict:
    """Every view's plain data. Several runs overlay on the frontier (or, ``side_by_side``, get a panel each) and
    share the header; the per-layer views show the first run."""
    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    runs = [read_run(d) for d in dirs]
    first = runs[0]
    frontiers = [V.frontier_view(r, prefix=f"{i}:" if len(runs) > 1 else "") for i, r in enumerate(runs)]
    for f, r in zip(frontiers, runs):
        f["title"] = f"{r.get('target') or r.get('device')} ({r.get('fingerprint', {}).get('name')})"
    # the click handler shows the first run's layers; points of other runs map by layer name onto them
    layers = V.bits_view(first)["layers"]
    merged = V._Choices(layers)
    for f in frontiers:
        pos = {l: i for i, l in enumerate(f["layers"])}
        opts = f["choices"]["options"]
        for pid, idx in f["choices"]["points"].items():
            merged.add(pid, {l: opts[idx[pos[l]]] for l in layers if l in pos})
    choices = merged.as_dict()
    views = {v.name: v.extract(first) for v in V.registered_views()}
    return {"summaries": [V.summary_view(r) for r in runs], "frontier": frontiers, **views, "choices": choices,
            "layers": layers, "side_by_side": side_by_side, "views": [v.name for v in V.registered_views()]}


def all_figures(views: dict) -> dict[str, dict]:
    """The frontier's figure and every registered view's that has data for this run."""
    figs = {"frontier": frontier_figure(views["frontier"], views.get("side_by_side", False))}
    for view in V.registered_views():
        if views.get(view.name):
            figs[view.name] = view.figure(views[view.name])
    return figs


def _header(summaries: list[dict]) -> str:
    parts = []
    for s in summaries:
        rows = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in (
                r["label"], _fmt(r["size_mb"]), _fmt(r["latency_predicted_ms"]), _fmt(r["latency_measured_ms"]),
                _fmt(r["metric_fakequant"]), _fmt(r["metric_real"]))) + "</tr>" for r in s["rows"])
        ratios = []
        if s["size_vs_float"]:
            ratios.append(f"{s['size_vs_float']:.2f}x the float size")
        if s["latency_vs_float"]:
            ratios.append(f"{s['latency_vs_float']:.2f}x the float latency (measured)")
        arrow = "higher is better" if s["higher_is_better"] else "lower is better"
        parts.append(
            f"<h2>{html.escape(s['title'])}</h2><p class='meta'>run <code>{html.escape(s['run'])}</code> &middot; "
            f"budget <b>{html.escape(str(s['budget']))}</b> &middot; estimator {html.escape(str(s['estimator']))}"
            f" &middot; solver {html.escape(str(s['solver']))} &middot; chosen: {', '.join(ratios)}</p>"
            f"<table><tr><th>config</th><th>size (MB)</th><th>latency predicted (ms)</th>"
            f"<th>latency measured (ms)</th><th>{html.escape(s['metric'])} fake-quant</th>"
            f"<th>{html.escape(s['metric'])} real kernels ({arrow})</th></tr>{rows}</table>")
    return "\n".join(parts)


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4g}"


SCRIPT = """
window.mpqErrors = [];
window.addEventListener('error', e => {
  window.mpqErrors.push(String(e.message));
  document.body.dataset.errors = JSON.stringify(window.mpqErrors);
});
(function () {
  const t0 = performance.now();
  const names = JSON.parse(document.getElementById('fig-names').textContent);
  for (const name of names) {
    const fig = JSON.parse(document.getElementById('fig-' + name).textContent);
    Plotly.newPlot('plot-' + name, fig.data, fig.layout, {responsive: true, displaylogo: false});
  }
  const choices = JSON.parse(document.getElementById('choices').textContent);
  const layers = JSON.parse(document.getElementById('layers').textContent);
  document.getElementById('plot-frontier').on('plotly_click', ev => {
    const id = ev.points[0].customdata && ev.points[0].customdata[0];
    const c = choices.points[id];
    if (!c) return;
    Plotly.restyle('plot-bits', {x: [c.map(i => choices.bits[i])], text: [c.map(i => choices.options[i])]}, [0]);
    Plotly.relayout('plot-bits', {'title.text': 'Per-layer weight bits: ' + id});
    document.getElementById('plot-bits').scrollIntoView({behavior: 'smooth'});
  });
  document.body.dataset.renderMs = String(performance.now() - t0);
  document.body.dataset.rendered = String(names.length);
})();
"""

STYLE = """body{font-family:system-ui,-apple-system,sans-serif;margin:24px auto;max-width:1400px;color:#222;padding:0 16px}
table{border-collapse:collapse;margin:8px 0 20px}td,th{border:1px solid #ddd;padding:4px 10px;text-align:right}
th{background:#f4f4f4}td:first-child{text-align:left}.meta{color:#555}section{margin-top:28px}
h3{border-bottom:1px solid #eee;padding-bottom:4px}"""


def build_dashboard_html(data: dict) -> str:
    from plotly.offline import get_plotlyjs

    figs = all_figures(data)
    headings = {"frontier": FRONTIER_HEADING, **{v.name: v.heading for v in V.registered_views()}}
    names = [n for n in headings if n in figs]
    blocks = "\n".join(f"<script type='application/json' id='fig-{n}'>{_json(figs[n])}</script>" for n in names)
    sections = "\n".join(f"<section><h3>{headings[n]}</h3><div id='plot-{n}'></div></section>" for n in names)
    return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>mpq: "
            f"{html.escape(data['summaries'][0]['title'])}</title><style>{STYLE}</style>"
            f"<script>{get_plotlyjs()}</script></head><body>\n{_header(data['summaries'])}\n{sections}\n{blocks}\n"
            f"<script type='application/json' id='fig-names'>{_json(names)}</script>\n"
            f"<script type='application/json' id='choices'>{_json(data['choices'])}</script>\n"
            f"<script type='application/json' id='layers'>{_json(data['layers'])}</script>\n"
            f"<script>{SCRIPT}</script></body></html>\n")


def _json(obj) -> str:
    from plotly.utils import PlotlyJSONEncoder

    # "</" cannot appear inside a script element
    return json.dumps(obj, cls=PlotlyJSONEncoder, separators=(",", ":")).replace("</", "<\\/")


def write_dashboard(run_dirs: str | Path | Iterable[str | Path], out: str | Path | None = None,
                    side_by_side: bool = False) -> Path:
    """Write the dashboard of one run (default ``RUN/dashboard.html``) or of several runs compared (``out``;
    ``side_by_side`` gives each run's frontier its own panel, as for one search on several devices)."""
    dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    path = Path(out) if out else Path(dirs[0]) / "dashboard.html"
    path.write_text(build_dashboard_html(dashboard_data(dirs, side_by_side)))
    return path


def figures_in(html_text: str) -> dict[str, dict]:
    """The figure JSON blocks of a dashboard page (for tests and tools)."""
    import re

    return {m.group(1): json.loads(m.group(2).replace("<\\/", "</"))
            for m in re.finditer(r"<script type='application/json' id='fig-([a-z]+)'>(.*?)</script>", html_text,
                                 flags=re.S) if m.group(1) != "names"}
