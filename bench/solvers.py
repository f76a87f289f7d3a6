"""Solver benchmarks: scale on synthetic instances, quality on the reference models, the latency predictor.

    python bench/solvers.py scale        # ILP 1000 layers x 8 options x 3 limits; exact 50-point frontier
    python bench/solvers.py quality      # both models, 3 size budgets: ILP, Pareto, Optuna(+XGBoost), greedy,
                                         # uniform, and the 90th percentile of 100 random configs in budget
    python bench/solvers.py latency      # XGBoost latency predictor vs the additive table on measured configs

Results: bench/results/solvers_<part>.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).parent))

from common import environment, write_result  # noqa: E402


def synthetic(layers: int = 1000, options: int = 8, seed: int = 0):
    """Realistic structure: sizes spread over three decades, error ~ 4^-bits, curvature log-normal across layers,
    latency ~ bytes moved with +-10% kernel variation."""
    rng = np.random.default_rng(seed)
    bits = [32, 16, 8, 8, 6, 4, 4, 3][:options]
    rows = []
    for l in range(layers):
        n = int(rng.integers(1e4, 1e7))
        curvature = rng.lognormal(0, 1)
        for o, b in enumerate(bits):
            err = 0.0 if b == 32 else n * 4.0 ** (-b) * rng.uniform(0.8, 1.2)
            rows.append({"layer": f"l{l}", "option": f"o{o}", "score": curvature * err, "size_mb": n * b / 8e6,
                         "bops": float(n * rng.integers(1, 64) * b * 8),
                         "latency_ms": n * b / 8e9 * rng.uniform(0.9, 1.1) + 0.01})
    table = pd.DataFrame(rows)
    lo = table.groupby("layer")[["size_mb", "bops", "latency_ms"]].min().sum()
    hi = table.groupby("layer")[["size_mb", "bops", "latency_ms"]].max().sum()
    limits = {c: float(lo[c] + f * (hi[c] - lo[c])) for c, f in (("size_mb", .2), ("bops", .3), ("latency_ms", .25))}
    return table, limits


def part_scale() -> dict:
    from mpq.solvers import hull_frontier, ilp_allocate, walk_frontier

    table, limits = synthetic()
    out = {"instance": {"layers": 1000, "options": 8, "limits": list(limits)}}
    for backend in ("cbc", "highs"):
        t0 = time.perf_counter()
        a = ilp_allocate(table, limits, backend=backend)
        out[f"ilp_{backend}_seconds"] = time.perf_counter() - t0
        out[f"ilp_{backend}_score"] = a.score
    t0 = time.perf_counter()
    f = hull_frontier(table, "size_mb", points=50)
    out["frontier_hull_50_seconds"] = time.perf_counter() - t0
    out["frontier_hull_points"] = len(f)
    out["frontier_hull_exact"] = int(f["exact"].sum())
    small, _ = synthetic(layers=100)
    t0 = time.perf_counter()
    w, complete = walk_frontier(small, "size_mb", max_points=50)
    out["walk_100_layers_50_points_seconds"] = time.perf_counter() - t0
    out["walk_points"], out["walk_complete"] = len(w), complete
    for k, v in out.items():
        print(f"{k}: {v}")
    return out


def _measure(task, inv, configs, device="cpu", data=None) -> list[float]:
    """Loss increase of each config on ``data`` (the held-out batches by default)."""
    from mpq.calib import CalibrationSet
    from mpq.sensitivity.measured import config_damage

    held = CalibrationSet.from_any(task.heldout if data is None else data)
    return [d["loss"] for d in config_damage(task.model, held, configs, inv, device, progress=False)]


def _random_in_budget(table, limits, fixed, n, rng, tries=200_000):
    """``n`` random configs that meet the limits (options drawn with a bias to cheap ones, then kept if feasible)."""
    layers = list(dict.fromkeys(table["layer"]))
    opts = {l: table[table["layer"] == l] for l in layers}
    out = []
    for _ in range(tries):
        c = {}
        for l in layers:
            g = opts[l]
            w = 1.0 / g["size_mb"].to_numpy()
            c[l] = g["option"].iloc[rng.choice(len(g), p=w / w.sum())]
        picked = table.set_index(["layer", "option"]).loc[list(c.items())]
        if all(picked[k].sum() + fixed.get(k, 0.0) <= v for k, v in limits.items()):
            out.append(c)
            if len(out) == n:
                break
    return out


def part_quality(models, budgets, trials) -> dict:
    import mpq
    from mpq.models import load_reference
    from mpq.solvers import get_solver, ilp_allocate
    from mpq.solvers.predictors import AccuracyPredictor

    results = []
    for name in models:
        task = load_reference(name)
        base = mpq.search(task.model, task.calib, budget="size=1.0", sensitivity="decoupled",
                          sensitivity_options={"backend": "inprocess"}, profile="inprocess", repeats=5,
                          frontier_points=4, evaluate_frontier=False, progress=False)
        table, fixed, inv = base.table, base.info["fixed"], base.inventory
        layers = list(dict.fromkeys(table["layer"]))
        rng = np.random.default_rng(0)
        # the accuracy predictor learns from 120 random configs measured on the calibration data (the held-out
        # data stays for judging every solver alike)
        train = [{l: table[table["layer"] == l]["option"].iloc[rng.integers((table["layer"] == l).sum())]
                  for l in layers} for _ in range(120)]
        acc = AccuracyPredictor(layers, table["option"].unique(), ["score", "score_kl", "score_loss"]).fit(
            table, train, _measure(task, inv, train, data=task.calib))
        for frac in budgets:
            limits = {"size_mb": frac * base.info["reference"]["size_mb"]}
            rows = {}
            for solver in ("ilp", "pareto", "greedy"):
                t0 = time.perf_counter()
                a = get_solver(solver)(table, limits, fixed)
                rows[solver] = (a.choice, time.perf_counter() - t0)
            t0 = time.perf_counter()
            warm = ilp_allocate(table, limits, fixed).choice
            a = get_solver("optuna")(table, limits, fixed, n_trials=trials, warm_start=[warm],
                                     damage_fn=lambda cs: acc.predict(table, cs))
            rows["optuna+xgboost"] = (a.choice, time.perf_counter() - t0)
            uniform = None
            for opt in ("w8a8", "w8a16", "w4a16g128", "w4a16g64", "w4a16g32"):
                c = {l: opt if (table[(table.layer == l)].option == opt).any() else "float" for l in layers}
                picked = table.set_index(["layer", "option"]).loc[list(c.items())]
                if picked["size_mb"].sum() + fixed["size_mb"] <= limits["size_mb"]:
                    uniform = (opt, c)
                    break
            randoms = _random_in_budget(table, limits, fixed, 100, rng)
            configs = [c for c, _ in rows.values()] + ([uniform[1]] if uniform else []) + randoms
            damage = _measure(task, inv, configs)
            entry = {"model": name, "budget_size_fraction": frac, "limit_mb": limits["size_mb"]}
            for (solver, (_, secs)), d in zip(rows.items(), damage):
                entry[solver] = {"heldout_loss_increase": d, "seconds": secs}
            k = len(rows)
            if uniform:
                entry["uniform"] = {"option": uniform[0], "heldout_loss_increase": damage[k]}
                k += 1
            rand = np.array(damage[k:])
            entry["random"] = {"n": len(rand), "p90_best": float(np.percentile(rand, 10)) if len(rand) else None,
                               "median": float(np.median(rand)) if len(rand) else None}
            print(json.dumps(entry))
            results.append(entry)
    return {"results": results, "note": "quality = held-out loss increase (lower is better); 'p90_best' is the "
            "90th percentile of random configs by quality (the 10th percentile of loss increase)"}


def part_latency(models, n_configs) -> dict:
    import copy

    import mpq
    from mpq.api import _config_of, apply
    from mpq.models import load_reference
    from mpq.solvers.predictors import LatencyPredictor, mape
    from mpq.workers import time_model

    out = []
    for name in models:
        task = load_reference(name)
        base = mpq.search(task.model, task.calib, budget="size=1.0", profile="inprocess", repeats=10,
                          frontier_points=4, evaluate_frontier=False, progress=False,
                          sensitivity="lrp")
        table, fixed = base.table, base.info["fixed"]
        layers = list(dict.fromkeys(table["layer"]))
        rng = np.random.default_rng(1)
        choices = [{l: table[table["layer"] == l]["option"].iloc[rng.integers((table["layer"] == l).sum())]
                    for l in layers} for _ in range(n_configs)]
        x = task.calib[0][0]
        measured = []
        t0 = time.perf_counter()
        for c in choices:
            model = apply(copy.deepcopy(task.model), _config_of(c), "cpu", base.inventory)
            measured.append(time_model(model, x, repeats=10).median_ms)
        measure_s = time.perf_counter() - t0
        measured = np.array(measured)
        split = int(0.7 * n_configs)
        test_c, test_m = choices[split:], measured[split:]
        # the noise floor: the same test configs measured again, minutes later
        retest = np.array([time_model(apply(copy.deepcopy(task.model), _config_of(c), "cpu", base.inventory), x,
                                      repeats=10).median_ms for c in test_c])
        entry = {"model": name, "configs": n_configs, "train": split, "test": n_configs - split,
                 "mape_retest_pct": mape(retest, test_m), "measure_seconds": measure_s}
        for per_layer in (False, True):
            pred = LatencyPredictor(layers, table["option"].unique(), per_layer=per_layer).fit(
                table, choices[:split], measured[:split] - fixed["latency_ms"])
            additive = pred._additive(table, test_c) + fixed["latency_ms"]
            entry["mape_additive_pct"] = mape(additive, test_m)
            entry[f"mape_xgboost_{'per_layer' if per_layer else 'totals'}_pct"] = mape(
                pred.predict(table, test_c) + fixed["latency_ms"], test_m)
        print(json.dumps(entry))
        out.append(entry)
    return {"results": out}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["scale", "quality", "latency"])
    p.add_argument("--models", nargs="*", default=["digits-cnn", "char-lm"])
    p.add_argument("--budgets", nargs="*", type=float, default=[0.30, 0.25, 0.20])
    p.add_argument("--trials", type=int, default=400)
    p.add_argument("--configs", type=int, default=120)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    import os

    os.environ.setdefault("MPQ_CACHE_DIR", tempfile.mkdtemp(prefix="mpq-bench-cache-"))
    t0 = time.perf_counter()
    if args.part == "scale":
        payload = part_scale()
    elif args.part == "quality":
        payload = part_quality(args.models, args.budgets, args.trials)
    else:
        payload = part_latency(args.models, args.configs)
    write_result(f"solvers_{args.part}", {"benchmark": f"solvers_{args.part}", **environment(),
                                          "wall_seconds": time.perf_counter() - t0, **payload})


if __name__ == "__main__":
    main()
