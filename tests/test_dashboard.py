"""Dashboards of real runs of both reference models: every view with the right data (from the embedded figure
JSON), the comparison of runs, the 500-layer decimation, and a headless-Chromium render without JavaScript errors."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pandas as pd
import pytest

import mpq
from conftest import between_fastest_and_float
from mpq.artifacts import read_run
from mpq.dashboards import dashboard_data, figures_in, write_dashboard

QUICK = dict(profile="inprocess", repeats=3, warmup=1, frontier_points=5, progress=False)


@pytest.fixture(scope="module")
def runs(digits_task, lm_task, tmp_path_factory):
    out = {"digits": tmp_path_factory.mktemp("digits"), "lm": tmp_path_factory.mktemp("lm")}
    t = digits_task
    mpq.search(t.model, t.calib[:2], t.eval_fn, budget="size=0.3", out=out["digits"], model_name=t.name, **QUICK)
    # The LM's latency limit comes from its own measurements (a fixed fraction of float may be unreachable on a
    # machine whose integer kernels are no faster than float).
    t = lm_task
    study = mpq.study(t.model, t.calib[:2], t.eval_fn, model_name=t.name, metric="perplexity",
                      higher_is_better=False, batch_size=2, **QUICK)
    study.solve(f"latency_ms={between_fastest_and_float(study)!r}", evaluate=True, out=out["lm"], force=True)
    mpq.sensitivity_report(digits_task.model, digits_task.calib[:2], digits_task.heldout[:1],
                           estimators=("lrp", "entropy"), n_configs=10, out=out["digits"], progress=False)
    for d in out.values():
        write_dashboard(d)
    return out


def _figs(run_dir):
    return figures_in((run_dir / "dashboard.html").read_text())


@pytest.mark.parametrize("name", ["digits", "lm"])
def test_every_view_holds_the_run_data(runs, name):
    d = runs[name]
    run = read_run(d)
    figs = _figs(d)
    assert {"frontier", "bits", "heatmap", "sensitivity", "latency"} <= set(figs)
    summary = run["summary_table"].set_index("name")
    layers = run["layers_table"]

    # frontier: three switchable x axes, every source, the baselines; the chosen point where the summary says
    front = figs["frontier"]
    buttons = front["layout"]["updatemenus"][0]["buttons"]
    assert [b["label"] for b in buttons] == ["latency", "size", "GBOPs"]
    chosen = [t for t in front["data"] if t["name"] == "chosen (mixed)"]
    assert len(chosen) == 3  # one per x axis: latency (shown first), size, GBOPs
    c = summary.loc["chosen"]
    assert [t["x"][0] for t in chosen] == pytest.approx([c["latency_predicted_ms"], c["size_mb"], c["bops"] / 1e9])
    assert [t["visible"] for t in chosen] == [True, False, False]
    assert all(t["customdata"][0][0] == "baseline:chosen" for t in chosen)  # the id the click handler looks up
    sources = {t["name"] for t in front["data"]}
    assert {"frontier (size_mb)", "frontier (latency_ms)", "uniform INT8", "float"} <= sources
    size_line = [t for t in front["data"] if t["name"] == "frontier (size_mb)" and t["mode"] == "lines+markers"]
    f = run["frontier_table"]
    assert sorted(size_line[0]["x"]) == pytest.approx(sorted(f.loc[f.swept == "size_mb", "size_mb"]))

    # per-layer bits of the chosen config
    bits = figs["bits"]["data"][0]
    assert list(bits["y"]) == list(layers["layer"]) and list(bits["text"]) == list(layers["option"])

    # heatmap: layers x frontier points, each cell the bits of that point's option
    heat = figs["heatmap"]["data"][0]
    size_front = f[f.swept == "size_mb"].drop_duplicates("choice").sort_values("size_mb")
    assert len(heat["z"]) == len(layers) and len(heat["z"][0]) == len(size_front)
    first = size_front.iloc[0]["choice"]  # read_run gives allocation keys back as Choice objects
    assert [row[0] for row in heat["text"]] == [first[l] for l in layers["layer"]]

    # sensitivity: the run's estimator per layer; latency: predicted = the layer table's
    sens = {t["name"]: t for t in figs["sensitivity"]["data"]}
    assert run["estimator"] in sens
    lat = {t["name"]: t for t in figs["latency"]["data"]}
    assert list(lat["chosen: table"]["x"]) == pytest.approx(list(layers["latency_ms"]))
    assert list(lat["chosen: timed in place"]["x"]) == pytest.approx(list(layers["latency_in_model_ms"]))
    assert all(v > 0 for v in lat["chosen: timed in place"]["x"])


def test_quality_view_when_the_run_has_a_report(runs):
    figs = _figs(runs["digits"])
    assert "quality" in figs and "quality" not in _figs(runs["lm"])
    report = pd.read_csv(runs["digits"] / "estimators.csv").set_index("estimator")
    titles = [a["text"] for a in figs["quality"]["layout"]["annotations"]]
    assert any(t.startswith("lrp (config tau") and f"{report.loc['lrp', 'tau_config']:.2f}" in t for t in titles)
    sens = {t["name"] for t in figs["sensitivity"]["data"]}
    assert {"lrp (report)", "entropy (report)"} <= sens


def test_compare_runs(runs, tmp_path):
    path = write_dashboard([runs["digits"], runs["digits"]], tmp_path / "cmp.html")
    front = figures_in(path.read_text())["frontier"]
    names = [t["name"] for t in front["data"]]
    assert sum(n.startswith("chosen (mixed) [") for n in names) == 2 * 3
    data = dashboard_data([runs["digits"], runs["lm"]])
    assert len(data["summaries"]) == 2 and any(k.startswith("1:") for k in data["choices"]["points"])


def test_large_run_is_decimated(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from dashboard_bench import write_synthetic_run

    d = write_synthetic_run(tmp_path / "big", layers=500, points=450)
    data = dashboard_data(d)
    assert len(data["heatmap"]["columns"]) <= 200 and len(data["heatmap"]["layers"]) == 500
    assert all(len(p) <= 200 for p in data["frontier"][0]["sources"].values())


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def render(path, tmp_path, screenshot=None, size="1400,3200"):
    """Load the page in headless Chromium; return the <body> data attributes the page script sets."""
    browser = _chromium()
    args = [browser, *CHROME_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", f"--window-size={size}",
            "--virtual-time-budget=15000"]
    dom = subprocess.run([*args, "--dump-dom", path.resolve().as_uri()], capture_output=True, text=True,
                         timeout=180).stdout
    if screenshot:
        subprocess.run([*args, f"--screenshot={screenshot}", path.resolve().as_uri()], capture_output=True,
                       timeout=180)
    body = re.search(r"<body([^>]*)>", dom)
    return dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1))) if body else {}


@pytest.mark.skipif(_chromium() is None, reason="no Chromium (CI installs Debian's chromium)")
@pytest.mark.parametrize("name", ["digits", "lm"])
def test_renders_in_chromium_without_errors(runs, name, tmp_path):
    path = runs[name] / "dashboard.html"
    shot = tmp_path / f"{name}.png"
    attrs = render(path, tmp_path, shot)
    assert "errors" not in attrs, attrs.get("errors")
    assert int(attrs["rendered"]) == len(_figs(runs[name]))
    assert float(attrs["render-ms"]) > 0
    assert shot.exists() and shot.stat().st_size > 20_000


@pytest.mark.skipif(_chromium() is None, reason="no Chromium (CI installs Debian's chromium)")
def test_click_on_a_point_shows_its_bits(runs, tmp_path):
    """A click on the uniform-INT8 marker redraws the per-layer bits with that config."""
    page = (runs["digits"] / "dashboard.html").read_text()
    probe = ("<script>const gd = document.getElementById('plot-frontier');"
             "gd.emit('plotly_click', {points: [{customdata: ['baseline:uniform_int8']}]});"
             "document.body.dataset.clicked = JSON.stringify(document.getElementById('plot-bits').data[0].text);"
             "</script></body>")
    path = tmp_path / "probe.html"
    path.write_text(page.replace("</body>", probe))
    attrs = render(path, tmp_path)
    shown = json.loads(attrs["clicked"].replace("&quot;", '"'))
    summary = read_run(runs["digits"])["summary_table"].set_index("name")
    expected = summary.loc["uniform_int8", "choice"]
    layers = list(read_run(runs["digits"])["layers_table"]["layer"])
    assert shown == [expected[l] for l in layers]
