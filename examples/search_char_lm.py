"""Python API: one study of the bundled byte-level LM, then several budgets solved from it in seconds.

    python examples/search_char_lm.py [--profile inprocess] [--out runs/char-lm]

The study measures what every budget needs once (layer latencies on this CPU, Hessian sensitivities); each
``study.solve`` is then an ILP over its tables. The last budget is evaluated on the real kernels and written as a
run directory (report.md, dashboard.html, config.json). ``mpq.search(...)`` does study + solve in one call.
"""

from __future__ import annotations

import argparse
import logging

import mpq
from mpq.models import load_reference


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", default="ray", choices=["ray", "inprocess"])
    p.add_argument("--budgets", nargs="+", default=["size=0.25", "size=0.35", "latency=0.9", "latency=0.8"])
    p.add_argument("--out", default="runs/char-lm")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    task = load_reference("char-lm")
    study = mpq.study(task.model, task.calib, task.eval_fn, metric=task.metric,
                      higher_is_better=task.higher_is_better, profile=args.profile, out=args.out,
                      model_name=task.name, budgets=args.budgets)  # every budget checked before the estimator runs
    for budget in args.budgets:
        result = study.solve(budget)  # predicted from the study's tables
        chosen = result.row("chosen")
        print(f"{budget:>12}: {chosen['size_mb']:.3f} MB, {chosen['latency_predicted_ms']:.2f} ms predicted, "
              f"score {chosen['score']:.4f}, {result.config.histogram()}")
    best = study.solve(args.budgets[-1], evaluate=True, out=f"{args.out}/chosen")  # measured on the real kernels
    cols = ["name", "size_mb", "latency_predicted_ms", "latency_measured_ms", "metric_fakequant", "metric_real"]
    print(best.summary[cols].to_string(index=False))
    print(study.frontier("latency_ms")[["latency_ms", "score", "exact"]].to_string(index=False))


if __name__ == "__main__":
    main()
