"""Every sensitivity estimator on both reference models, judged against measured damage.

    python bench/sensitivity.py                       # 50 random configs per model and space, in-process
    python bench/sensitivity.py --models char-lm --configs 100 --spaces generic

Two spaces per model: ``cpu`` (the options the CPU kernels run: 8-bit and 4-bit group-wise) and ``generic``
(2, 3, 4, 6, 8-bit weights per channel, float or 8-bit activations, fake-quant): the CPU space barely damages the
bundled models, so its truth is close to noise; the generic one spans real damage. ``--spaces cuda`` is the GPU
kernels' options: it needs their built extensions (``bash bench/gpu_suite.sh sens`` on the GPU machine), though the
fake-quant damage itself runs on the CPU.

Writes bench/results/sensitivity_<model>_<space>.json: per estimator (and per exposed table: each entropy proxy,
each decoupled metric) Kendall tau and Spearman rho against the measured single-layer damage and against the
measured damage of random mixed configs, with wall time and forward/backward passes.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import environment, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="*", default=["digits-cnn", "char-lm"])
    p.add_argument("--configs", type=int, default=50)
    p.add_argument("--backend", default="inprocess", choices=["inprocess", "ray"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spaces", nargs="*", default=["cpu", "generic"])
    p.add_argument("--estimators", nargs="*", default=["fisher", "hessian", "lrp", "decoupled", "entropy", "measured"])
    p.add_argument("--out", default="sensitivity", help="result name prefix under bench/results/")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    import mpq
    from mpq.models import load_reference

    for name in args.models:
        task = load_reference(name)
        for space in args.spaces:
            out = Path(tempfile.mkdtemp(prefix=f"mpq-sens-{name}-{space}-"))
            t0 = time.perf_counter()
            options = {"decoupled": {"backend": args.backend}, "measured": {"backend": args.backend}}
            report = mpq.sensitivity_report(task.model, task.calib, task.heldout, args.estimators,
                                            n_configs=args.configs,
                                            device=None if space == "generic" else space, seed=args.seed,
                                            options=options, backend=args.backend, out=out, progress=False)
            wall = time.perf_counter() - t0
            truth = report.configs["truth"]
            print(f"{name} ({space} space): {wall:.0f} s; config damage mean {truth.mean():.4g}, sd {truth.std():.4g}")
            print(report.table.round(3).to_string(index=False))
            write_result(f"{args.out}_{name}_{space}", {
                "benchmark": "sensitivity", "model": name, "space": space, **environment(),
                "configs": args.configs, "calib_batches": len(task.calib), "heldout_batches": len(task.heldout),
                "config_damage": {"mean": float(truth.mean()), "sd": float(truth.std()), "min": float(truth.min()),
                                  "max": float(truth.max())},
                "wall_seconds": wall, "table": report.table.to_dict("records")})


if __name__ == "__main__":
    main()
