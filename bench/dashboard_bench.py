"""How fast a dashboard of a large run renders in a browser: a synthetic run directory with 500 layers and 200
frontier points per sweep, rendered in headless Chromium (the page records its own rendering time).

    python bench/dashboard_bench.py [--layers 500] [--points 200]
    python bench/dashboard_bench.py --reference     # dashboards of both reference models' demo searches

Writes bench/results/dashboard_render.json and screenshots beside it (dashboard_500_layers.png; with
--reference, dashboard_digits-cnn.png and dashboard_char-lm.png).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))

OPTIONS = [("float", None, None, None), ("w8a8", 8, 8, None), ("w8a16", 8, 16, None), ("w4a16g128", 4, 16, 128),
           ("w4a16g32", 4, 16, 32)]


def write_synthetic_run(out: Path, layers: int = 500, points: int = 200, seed: int = 0) -> Path:
    """A run directory with the schema ``mpq search`` writes, filled with synthetic numbers."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    names = [f"blocks.{i // 7}.{['q', 'k', 'v', 'o', 'gate', 'up', 'down'][i % 7]}_proj" for i in range(layers)]
    costs = []
    for n in names:
        params = int(rng.integers(1e5, 2e7))
        curvature = rng.lognormal(0, 1)
        for opt, w, a, g in OPTIONS:
            bits = w or 32
            costs.append({"layer": n, "option": opt, "w_bits": w, "a_bits": a, "group_size": g,
                          "size_mb": params * bits / 8e6, "bops": params * 16.0 * bits * (a or 32),
                          "latency_ms": params * bits / 8e9 * rng.uniform(0.8, 1.2) + 0.01,
                          "score": 0.0 if w is None else curvature * 4.0 ** -bits * (1.5 if a == 8 else 1.0)})
    table = pd.DataFrame(costs)
    table["score"] /= table.groupby("layer")["score"].max().sum()
    from mpq.solvers import hull_frontier

    parts = [hull_frontier(table, r, points=points).assign(swept=r) for r in ("size_mb", "latency_ms")]
    frontier = pd.concat(parts, ignore_index=True)
    frontier["metric"] = 3.0 + 5 * frontier["score"]
    frontier["chosen"] = False
    frontier.insert(0, "point", range(len(frontier)))
    chosen = json.loads(frontier.iloc[len(parts[0]) // 2]["choice"])
    frontier.loc[len(parts[0]) // 2, "chosen"] = True
    idx = table.set_index(["layer", "option"])
    rows = []
    for name, choice in (("float", {n: "float" for n in names}), ("chosen", chosen),
                         ("uniform_int8", {n: "w8a8" for n in names}), ("uniform_int4", {n: "w4a16g128" for n in names})):
        picked = idx.loc[list(choice.items())]
        hist = pd.Series(list(choice.values())).value_counts().to_dict()
        rows.append({"name": name, "score": picked["score"].sum(), "size_mb": picked["size_mb"].sum(),
                     "bops": picked["bops"].sum(), "latency_predicted_ms": picked["latency_ms"].sum(),
                     "latency_measured_ms": picked["latency_ms"].sum() * 1.1, "metric_fakequant": 3 + 5 * picked[
                         "score"].sum(), "metric_real": 3 + 5 * picked["score"].sum(), "histogram": json.dumps(hist),
                     "choice": json.dumps(choice)})
    pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)
    picked = idx.loc[list(chosen.items())].reset_index()
    flt = idx.xs("float", level="option")
    layer_rows = picked.assign(kind="linear", latency_in_model_ms=picked["latency_ms"] * 1.1,
                               float_latency_ms=flt.loc[picked["layer"], "latency_ms"].to_numpy(),
                               float_size_mb=flt.loc[picked["layer"], "size_mb"].to_numpy())
    layer_rows.to_csv(out / "layers.csv", index=False)
    frontier.to_csv(out / "frontier.csv", index=False)
    table.to_csv(out / "costs.csv", index=False)
    pd.DataFrame(columns=["name", "type", "params", "bytes", "reason"]).to_csv(out / "kept_float.csv", index=False)
    (out / "run.json").write_text(json.dumps({
        "format": "mpq.run", "version": 1, "model": f"synthetic-{layers}", "device": "cpu",
        "fingerprint": {"name": "synthetic"}, "metric": "perplexity", "higher_is_better": False,
        "budget_text": "size=0.3", "estimator": "hessian", "solver": "ilp-cbc"}))
    return out


def main() -> None:
    from common import environment, write_result

    from mpq.dashboards import write_dashboard

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=500)
    p.add_argument("--points", type=int, default=200)
    p.add_argument("--reference", action="store_true", help="screenshot both reference models' dashboards")
    args = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("needs Chromium (Debian: apt-get install chromium)")
    tmp = Path(tempfile.mkdtemp(prefix="mpq-dash-"))
    run = write_synthetic_run(tmp / "run", args.layers, args.points)
    t0 = time.perf_counter()
    page = write_dashboard(run)
    build_s = time.perf_counter() - t0
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp / 'profile'}", "--window-size=1400,3000"]
    t0 = time.perf_counter()
    dom = subprocess.run([browser, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True,
                         timeout=300).stdout
    browser_s = time.perf_counter() - t0
    import re

    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', re.search(r"<body([^>]*)>", dom).group(1)))
    shot = Path(__file__).parent / "results" / "dashboard_500_layers.png"
    subprocess.run([browser, *flags, "--virtual-time-budget=15000", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=300)
    if args.reference:
        import os

        import mpq
        from mpq.models import load_reference

        os.environ.setdefault("MPQ_CACHE_DIR", str(tmp / "cache"))
        for name, budget in (("digits-cnn", "size=0.3"), ("char-lm", "latency=0.8")):
            task = load_reference(name)
            d = tmp / name
            mpq.search(task.model, task.calib, task.eval_fn, budget=budget, out=d, metric=task.metric,
                       higher_is_better=task.higher_is_better, model_name=name, profile="inprocess",
                       progress=False)
            mpq.sensitivity_report(task.model, task.calib, task.heldout, n_configs=30, out=d, progress=False,
                                   estimators=("hessian", "lrp", "decoupled", "entropy"),
                                   options={"decoupled": {"backend": "inprocess"}})
            write_dashboard(d)
            subprocess.run([browser, *flags[:-1], "--window-size=1400,4200", "--virtual-time-budget=15000",
                            f"--screenshot={Path(__file__).parent / 'results' / f'dashboard_{name}.png'}",
                            (d / "dashboard.html").as_uri()], capture_output=True, timeout=300)
            print(f"screenshot of {name}'s dashboard written")
    result = {"benchmark": "dashboard_render", **environment(), "layers": args.layers, "points_per_sweep":
              args.points, "html_mb": page.stat().st_size / 1e6, "build_seconds": build_s,
              "render_ms_in_page": float(attrs.get("render-ms", "nan")), "browser_wall_seconds": browser_s,
              "errors": attrs.get("errors"), "figures": int(attrs.get("rendered", 0))}
    print(json.dumps(result, indent=2))
    write_result("dashboard_render", result)


if __name__ == "__main__":
    main()
