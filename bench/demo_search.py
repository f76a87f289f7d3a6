"""The README demo and its LM counterpart, end to end, with the numbers the closing notes quote.

    python bench/demo_search.py            # Ray-profiled, default settings, fresh profile cache
    python bench/demo_search.py --runs 3   # repeat to see run-to-run spread
    python bench/demo_search.py --models llama-lm   # the Llama-style LM, GPTQ-rounded, at 30% of its size

Writes bench/results/cpu_demo.json (other --models: cpu_demo_<models>.json): per run, the summary rows (predicted
vs measured latency, fake-quant vs real-kernel metric), the chosen bits, and stage times.
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

SEARCHES = {
    "digits-cnn": {"budget": "size=0.3"},
    "char-lm": {"budget": "latency=0.8"},
    "llama-lm": {"budget": "size=0.3", "quantizer": "gptq"},  # run when asked (--models llama-lm)
}
DEFAULT = ["digits-cnn", "char-lm"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--profile", default="ray", choices=["ray", "inprocess"])
    p.add_argument("--models", nargs="*", default=DEFAULT, choices=list(SEARCHES))
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("MPQ_CACHE_DIR", tempfile.mkdtemp(prefix="mpq-bench-cache-"))

    import mpq
    from mpq.models import load_reference

    runs = []
    for name in args.models:
        task = load_reference(name)
        for i in range(args.runs):
            out = Path(tempfile.mkdtemp(prefix=f"mpq-bench-{name}-"))
            t0 = time.perf_counter()
            res = mpq.search(task.model, task.calib, task.eval_fn, budget=SEARCHES[name]["budget"],
                             metric=task.metric, higher_is_better=task.higher_is_better, profile=args.profile,
                             out=out, model_name=name, progress=False,
                             quantizer=SEARCHES[name].get("quantizer", "minmax"))
            wall = time.perf_counter() - t0
            runs.append({"model": name, "run": i, "budget": SEARCHES[name]["budget"], "wall_seconds": wall,
                         "summary": res.summary.drop(columns=["choice"]).to_dict("records"),
                         "chosen": res.config.histogram(), "stages_seconds": res.info["stages_seconds"],
                         "profile": res.info["profile"], "sensitivity": res.info["sensitivity_cost"]})
            s = res.summary.set_index("name")
            print(f"{name} run {i}: {wall:.1f}s wall")
            print(s[["size_mb", "latency_predicted_ms", "latency_measured_ms", "metric_fakequant",
                     "metric_real"]].to_string())
    name = "cpu_demo" if args.models == DEFAULT else "cpu_demo_" + "_".join(args.models)
    path = write_result(name, {"benchmark": "demo_search", **environment(), "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
