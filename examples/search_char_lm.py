"""Python API: search the bundled byte-level LM for a config at most 80% of the float latency.

    python examples/search_char_lm.py [--profile inprocess]
"""

from __future__ import annotations

import argparse
import logging

import mpq
from mpq.models import load_reference


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--profile", default="ray", choices=["ray", "inprocess"])
    p.add_argument("--budget", default="latency=0.8")
    p.add_argument("--out", default="runs/char-lm")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    task = load_reference("char-lm")
    result = mpq.search(task.model, task.calib, task.eval_fn, budget=args.budget, metric=task.metric,
                        higher_is_better=task.higher_is_better, profile=args.profile, out=args.out,
                        model_name=task.name)
    cols = ["name", "size_mb", "latency_predicted_ms", "latency_measured_ms", "metric_fakequant", "metric_real"]
    print(result.summary[cols].to_string(index=False))
    print(result.config.histogram())


if __name__ == "__main__":
    main()
