"""One study, many budgets: how long re-solving takes next to the study itself, and how fast an impossible budget
is refused on every bundled model.

    flock /tmp/mpq-bench.lock python bench/study_resolve.py          # char-lm, four budgets, fresh profile cache
    python bench/study_resolve.py --profile ray --model digits-cnn

Part 1: ``mpq.study(char-lm)`` (discovery, costs, latency profiled into an empty cache, Hessian sensitivity) is
timed, then ``study.solve`` at four budgets (predicted: the ILP and the exact frontiers, computed on the first
solve and reused after), then the same four solved again with ``evaluate=True`` (the chosen config and the INT8/INT4
baselines applied on the real kernels, timed, evaluated; fake-quant metric along the frontier). The ratio
``sum(solve) / study`` is the issue's goal (< 5 %).

Part 2: for every bundled model, ``mpq.search`` with ``size_mb=1e-6`` (below anything reachable) and an estimator
that raises if called: the time until the BudgetError, and a check that neither the estimator nor the profiler ran.

Writes bench/results/study_resolve.json (device, versions, command, date, /proc/loadavg before and after).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import environment, write_result  # noqa: E402

BUDGETS = ["size=0.25", "size=0.35", "latency=0.85", "size=0.3,latency=0.95"]


def _loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def resolve_part(model_name: str, profile: str) -> dict:
    import mpq
    from mpq.models import load_reference

    task = load_reference(model_name)
    t0 = time.perf_counter()
    study = mpq.study(task.model, task.calib, task.eval_fn, metric=task.metric, higher_is_better=task.higher_is_better,
                      profile=profile, progress=False, model_name=model_name)
    study_s = time.perf_counter() - t0
    solves, evaluated = [], []
    for budget in BUDGETS:
        t = time.perf_counter()
        r = study.solve(budget)
        solves.append({"budget": budget, "seconds": time.perf_counter() - t, "chosen": r.config.histogram(),
                       "size_mb": r.row("chosen")["size_mb"], "score": r.row("chosen")["score"],
                       "latency_predicted_ms": r.row("chosen")["latency_predicted_ms"]})
        print(f"solve {budget}: {solves[-1]['seconds']:.2f} s")
    for budget in BUDGETS:
        t = time.perf_counter()
        r = study.solve(budget, evaluate=True)
        evaluated.append({"budget": budget, "seconds": time.perf_counter() - t,
                          "metric_real": r.row("chosen")["metric_real"],
                          "latency_measured_ms": r.row("chosen")["latency_measured_ms"]})
        print(f"solve {budget} evaluated: {evaluated[-1]['seconds']:.2f} s")
    total = sum(s["seconds"] for s in solves)
    total_eval = sum(s["seconds"] for s in evaluated)
    return {"model": model_name, "profile": profile, "study_seconds": study_s,
            "study_stages_seconds": dict(study.record.stages_seconds), "solves": solves, "evaluated": evaluated,
            "solve_seconds_total": total, "ratio": total / study_s, "evaluated_seconds_total": total_eval,
            "evaluated_ratio": total_eval / study_s, "goal_ratio": 0.05, "goal_met": total / study_s < 0.05}


def infeasible_part() -> list[dict]:
    import mpq
    import mpq.workers
    from mpq.errors import BudgetError
    from mpq.models import load_reference, reference_names
    from mpq.plugins import ESTIMATORS
    from mpq.sensitivity import SensitivityEstimator

    calls = {"estimator": 0, "profiler": 0}

    class Counting(SensitivityEstimator):
        name = "bench_raises_if_called"

        def estimate(self, *a, **k):
            calls["estimator"] += 1
            raise RuntimeError("the estimator ran")

    ESTIMATORS.add(Counting.name, Counting)
    real_profile = mpq.workers.profile_workloads

    def counting_profile(*a, **k):
        calls["profiler"] += 1
        return real_profile(*a, **k)

    mpq.workers.profile_workloads = counting_profile
    rows = []
    try:
        for name in reference_names():
            task = load_reference(name)
            calls.update(estimator=0, profiler=0)
            t0 = time.perf_counter()
            try:
                mpq.search(task.model, task.calib, task.eval_fn, budget="size_mb=1e-6", sensitivity=Counting.name,
                           profile="inprocess", progress=False)
                error = None
            except BudgetError as e:
                error = str(e)
            seconds = time.perf_counter() - t0
            rows.append({"model": name, "seconds": seconds, "error": error, "estimator_calls": calls["estimator"],
                         "profiler_calls": calls["profiler"], "under_5s": seconds < 5.0})
            print(f"{name}: infeasible budget refused in {seconds:.2f} s ({error})")
    finally:
        mpq.workers.profile_workloads = real_profile
        ESTIMATORS.remove(Counting.name)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="char-lm")
    p.add_argument("--profile", default="inprocess", choices=["ray", "inprocess"],
                   help="inprocess by default: no Ray start-up in the study's time (the conservative ratio)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["MPQ_CACHE_DIR"] = tempfile.mkdtemp(prefix="mpq-bench-resolve-")  # a first study measures all
    load_before = _loadavg()
    resolve = resolve_part(args.model, args.profile)
    infeasible = infeasible_part()
    payload = {"benchmark": "study_resolve", **environment(), "loadavg_before": load_before,
               "loadavg_after": _loadavg(), "budgets": BUDGETS, "resolve": resolve, "infeasible": infeasible}
    path = write_result("study_resolve", payload)
    print(f"study {resolve['study_seconds']:.1f} s; four solves {resolve['solve_seconds_total']:.2f} s "
          f"({100 * resolve['ratio']:.2f} %), evaluated {resolve['evaluated_seconds_total']:.1f} s "
          f"({100 * resolve['evaluated_ratio']:.1f} %); wrote {path}")


if __name__ == "__main__":
    main()
