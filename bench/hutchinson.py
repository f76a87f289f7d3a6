"""Hutchinson traces with batched probes (one vectorised Hessian-vector product for P probes per gradient graph)
against one probe per backward pass, on the ~0.9M-parameter char-lm, at the same number of probes.

    python bench/hutchinson.py [--device cuda] [--probes 64] [--batch 16]

"Same accuracy" is checked, not assumed: both runs use the same number of probes, and the per-layer traces must
agree within their standard errors (the max |z| is reported). Writes bench/results/hutchinson_<device>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import environment, write_result  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--probes", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="*", default=[4, 16])
    args = p.parse_args()

    from mpq.calib import CalibrationSet, default_loss
    from mpq.layers import discover_layers
    from mpq.models import load_reference
    from mpq.sensitivity import hutchinson_traces

    task = load_reference("char-lm")
    model = task.model.to(args.device)
    calib = CalibrationSet([(x.to(args.device), y.to(args.device)) for x, y in task.calib])
    names = discover_layers(model, calib.example).names
    params = sum(p.numel() for p in model.parameters())

    def run(batch_probes: int):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        est = hutchinson_traces(model, calib, names, default_loss, activations=True, min_probes=args.probes,
                                max_probes=args.probes, tol=0.0, seed=batch_probes, batch_probes=batch_probes)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0, est

    run(1)  # warm-up (allocator, kernels)
    base_s, base = run(1)
    rows = [{"batch_probes": 1, "seconds": base_s, "speedup": 1.0, "max_abs_z": 0.0}]
    for b in args.batch:
        s, est = run(b)
        z = max(abs(est[k].mean - base[k].mean) / max((est[k].stderr ** 2 + base[k].stderr ** 2) ** 0.5, 1e-30)
                for k in base)
        rows.append({"batch_probes": b, "seconds": s, "speedup": base_s / s, "max_abs_z": z})
    for r in rows:
        print(f"batch_probes={r['batch_probes']:3d}: {r['seconds']:.2f} s, {r['speedup']:.2f}x, "
              f"traces agree within |z| <= {r['max_abs_z']:.2f}")
    write_result(f"hutchinson_{args.device.split(':')[0]}", {
        "benchmark": "hutchinson", **environment(args.device), "model": "char-lm", "parameters": params,
        "probes": args.probes, "calib_batch": list(calib.example.shape), "rows": rows})


if __name__ == "__main__":
    main()
