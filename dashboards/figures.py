"""Plotly figures for each view (data from :mod:`mpq.dashboards.views`)."""

from __future__ import annotations


BASELINE_STYLE = {"float": ("square", "#444444"), "uniform_int8": ("diamond", "#1f77b4"),
                  "uniform_int4": ("triangle-up", "#9467bd"), "chosen": ("star", "#d62728")}
SOURCE_COLORS = ["#2ca02c", "#17becf", "#bcbd22", "#e377c2", "#8c564b", "#7f7f7f"]
BITS_COLORS = [[0.0, "#b2182b"], [0.2, "#ef8a62"], [0.4, "#fddbc7"], [0.6, "#d1e5f0"], [0.8, "#67a9cf"],
               [1.0, "#2166ac"]]


def _go():
    import plotly.graph_objects as go

    return go


def _scatter(n: int):
    go = _go()
    return go.Scattergl if n > 500 else go.Scatter


def _layer_height(n: int) -> int:
    return int(min(max(320, 18 * n + 120), 9200))


def frontier_figure(views: list[dict], side_by_side: bool = False) -> dict:
    """Metric vs latency / size / BOPs (buttons switch the x axis); every source's points, the baselines, the chosen
    config. Several runs overlay (one colour set per run), or with ``side_by_side`` get one panel each sharing the
    metric axis (one run per target device: latencies of different devices do not share an axis)."""
    go = _go()
    panels = side_by_side and len(views) > 1
    if panels:
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=len(views), shared_yaxes=True, horizontal_spacing=0.04,
                            subplot_titles=[v.get("title") or v["run"] for v in views])
    else:
        fig = go.Figure()
    groups = {x: [] for x in views[0]["x_axes"]}
    for r, view in enumerate(views):
        tag = f" [{view['run']}]" if len(views) > 1 else ""
        where = {"row": 1, "col": r + 1} if panels else {}
        for x in view["x_axes"]:
            for s, (source, pts) in enumerate(view["sources"].items()):
                pts = [p for p in pts if p.get(x) is not None and p["y"] is not None]
                pts.sort(key=lambda p: p[x])
                line = source == x
                fig.add_trace(_scatter(len(pts))(
                    x=[p[x] for p in pts], y=[p["y"] for p in pts], mode="lines+markers" if line else "markers",
                    name=(f"frontier ({source})" if source in view["x_axes"] else f"{source} points") + tag,
                    legendgroup=f"{r}:{source}", visible=x == "latency_ms",
                    marker=dict(size=7 if line else 6, color=SOURCE_COLORS[(s + 3 * r) % len(SOURCE_COLORS)],
                                symbol="circle" if all(p["exact"] for p in pts) else "circle-open",
                                opacity=1.0 if line else 0.6),
                    customdata=[[p["id"], p["size_mb"], p["latency_ms"], p["bops"], p["score"],
                                 ", ".join(f"{k}:{v}" for k, v in p["histogram"].items())] for p in pts],
                    hovertemplate="size %{customdata[1]:.4g} MB<br>latency %{customdata[2]:.4g} ms (predicted)<br>"
                                  "%{customdata[3]:.4g} GBOPs<br>score %{customdata[4]:.3g}<br>y %{y:.4g}<br>"
                                  "%{customdata[5]}<br><i>click: per-layer bits</i><extra></extra>"), **where)
                groups.setdefault(x, []).append(len(fig.data) - 1)
            for b in view["baselines"]:
                if b.get(x) is None or b["y"] is None:
                    continue
                symbol, color = BASELINE_STYLE.get(b["name"], ("circle", "#888888"))
                measured = "" if b["latency_measured_ms"] is None else f"{b['latency_measured_ms']:.4g}"
                fig.add_trace(go.Scatter(
                    x=[b[x]], y=[b["y"]], mode="markers", name=b["label"] + tag, legendgroup=f"{r}:{b['name']}",
                    visible=x == "latency_ms",
                    marker=dict(size=17 if b["name"] == "chosen" else 12, symbol=symbol, color=color,
                                line=dict(width=1, color="white")),
                    customdata=[[b["id"], b["size_mb"], b["latency_ms"], b["bops"], measured,
                                 ", ".join(f"{k}:{v}" for k, v in b["histogram"].items()), b["metric_real"]]],
                    hovertemplate=f"<b>{b['label']}</b><br>size %{{customdata[1]:.4g}} MB<br>latency "
                                  "%{customdata[2]:.4g} ms predicted, %{customdata[4]} ms measured<br>"
                                  "%{customdata[3]:.4g} GBOPs<br>" + view["metric"] + " real kernels "
                                  "%{customdata[6]}<br>%{customdata[5]}<extra></extra>"), **where)
                groups.setdefault(x, []).append(len(fig.data) - 1)
            if x == "latency_ms":
                meas = [b for b in view["baselines"] if b["latency_measured_ms"] is not None and b["y"] is not None]
                fig.add_trace(go.Scatter(
                    x=[b["latency_measured_ms"] for b in meas], y=[b["y"] for b in meas], mode="markers",
                    name="measured latency (applied)" + tag, visible=True,
                    marker=dict(size=10, symbol="x", color="#ff7f0e"), text=[b["label"] for b in meas],
                    hovertemplate="%{text}: measured %{x:.4g} ms<extra></extra>"), **where)
                groups.setdefault(x, []).append(len(fig.data) - 1)
    buttons = []
    for x, label in views[0]["x_axes"].items():
        vis = [i in groups.get(x, []) for i in range(len(fig.data))]
        axes = [f"xaxis{i + 1 if i else ''}.title.text" for i in range(len(views) if panels else 1)]
        buttons.append(dict(label=label.split(" (")[0].replace("per forward", "").strip(), method="update",
                            args=[{"visible": vis}, {a: label for a in axes}]))
    for i in range(len(views) if panels else 1):
        fig.update_xaxes(title_text=views[0]["x_axes"]["latency_ms"], row=1 if panels else None,
                         col=i + 1 if panels else None)
    fig.update_layout(
        title="Pareto frontier: pick a point (hover for its numbers, click for its per-layer bits)",
        yaxis_title=views[0]["y_label"], template="plotly_white",
        height=580, legend=dict(orientation="v", x=1.02, y=1), margin=dict(t=110, r=40, l=80, b=60),
        updatemenus=[dict(type="buttons", direction="right", x=1.0, y=1.16, xanchor="right", yanchor="bottom",
                          buttons=buttons, pad=dict(r=4, t=4))])
    return fig.to_plotly_json()


def bits_figure(view: dict) -> dict:
    go = _go()
    n = len(view["layers"])
    fig = go.Figure(go.Bar(y=view["layers"], x=view["bits"], orientation="h", text=view["options"],
                           textposition="outside", marker_color="#17becf",
                           hovertemplate="%{y}: %{text} (%{x} weight bits)<extra></extra>"))
    fig.update_layout(title="Per-layer weight bits: chosen config (click a frontier point to show its)",
                      xaxis=dict(title="weight bits (32 = float)", type="log", tickvals=[2, 3, 4, 8, 16, 32],
                                 range=[0.2, 1.75]),
                      yaxis=dict(autorange="reversed", automargin=True), template="plotly_white",
                      height=_layer_height(n), margin=dict(t=60, r=60))
    return fig.to_plotly_json()


def heatmap_figure(view: dict) -> dict:
    go = _go()
    fig = go.Figure(go.Heatmap(z=view["z"], x=view["columns"], y=view["layers"], text=view["text"], zmin=2,
                               zmax=32, colorscale=BITS_COLORS, colorbar=dict(title="weight bits"),
                               hovertemplate="%{y} at %{x}: %{text}<extra></extra>"))
    fig.update_layout(title="Bits of every layer along the size frontier (cheapest left)",
                      xaxis=dict(title="frontier point (model size)", tickangle=-45, automargin=True),
                      yaxis=dict(autorange="reversed", automargin=True), template="plotly_white",
                      height=_layer_height(len(view["layers"])))
    return fig.to_plotly_json()


def sensitivity_figure(view: dict) -> dict:
    go = _go()
    n = len(view["layers"])
    fig = go.Figure()
    if n <= 60:
        for name, vals in view["series"].items():
            fig.add_trace(go.Bar(y=view["layers"], x=vals, name=name, orientation="h",
                                 hovertemplate=f"{name}<br>%{{y}}: %{{x:.3g}}<extra></extra>"))
        fig.update_layout(barmode="group", xaxis_title="normalised score of the most aggressive option")
    else:
        names = list(view["series"])
        fig.add_trace(go.Heatmap(z=[[view["series"][s][i] for s in names] for i in range(n)], x=names,
                                 y=view["layers"], colorscale="Viridis", colorbar=dict(title="score")))
    fig.update_layout(title="Per-layer sensitivity, estimator by estimator", template="plotly_white",
                      yaxis=dict(autorange="reversed", automargin=True), height=_layer_height(n))
    return fig.to_plotly_json()


def latency_figure(view: dict) -> dict:
    go = _go()
    fig = go.Figure()
    for key, name, color in (("float", "float (table)", "#bbbbbb"), ("predicted", "chosen: table", "#2ca02c"),
                             ("measured", "chosen: timed in place", "#ff7f0e")):
        if any(v is not None for v in view[key]):
            fig.add_trace(go.Bar(y=view["layers"], x=view[key], name=name, orientation="h", marker_color=color,
                                 text=view["options"] if key != "float" else None,
                                 hovertemplate=f"{name}<br>%{{y}}: %{{x:.4g}} ms<extra></extra>"))
    fig.update_layout(title="Per-layer latency of the chosen config: predicted (profile table) vs measured in place",
                      barmode="group", xaxis_title="ms per forward", template="plotly_white",
                      yaxis=dict(autorange="reversed", automargin=True), height=_layer_height(len(view["layers"])))
    return fig.to_plotly_json()


def quality_figure(view: dict) -> dict:
    go = _go()
    from plotly.subplots import make_subplots

    names = list(view["estimators"])
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    titles = [f"{n} (config tau {view['estimators'][n]['tau']:.2f})" if view["estimators"][n]["tau"] is not None
              else n for n in names]
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles)
    for i, n in enumerate(names):
        fig.add_trace(go.Scatter(x=view["estimators"][n]["x"], y=view["truth"], mode="markers", name=n,
                                 showlegend=False), row=i // cols + 1, col=i % cols + 1)
        fig.update_xaxes(title_text="summed score", row=i // cols + 1, col=i % cols + 1)
        fig.update_yaxes(title_text="measured loss increase", row=i // cols + 1, col=i % cols + 1)
    fig.update_layout(title="Estimator quality: summed score vs measured damage of random configs",
                      template="plotly_white", height=320 * rows + 80)
    return fig.to_plotly_json()
