"""Every CPU kernel option against the float layer it replaces, side by side in one run.

    python bench/cpu_kernels.py [--threads 2]

Shapes: the char-lm's linears (d=128) at 1, 16 and 1024 tokens, and the digits-cnn's convolutions at batch 1 and
64. Reports the median latency of the quantized module (activation quantization, im2col and casts included) over
the float module's, and writes bench/results/cpu_kernels.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from common import environment, write_result  # noqa: E402

LINEARS = [(128, 384), (128, 128), (128, 512), (512, 128), (128, 256)]  # (in, out) of qkv, proj, fc, out, head
TOKENS = [1, 16, 1024]
CONVS = [(32, 64, 8), (64, 128, 4)]  # (in ch, out ch, spatial) of conv2, conv3
BATCHES = [1, 64]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=25)
    args = p.parse_args()

    from mpq.kernel_registry import layer_options
    from mpq.workers import Workload, time_callable
    from mpq.workers.timing import num_threads

    def workloads():
        for k, n in LINEARS:
            for m in TOKENS:
                yield Workload("linear", (n, k), True, (m, k), None, "float", "torch")
        for c, o, s in CONVS:
            for b in BATCHES:
                conv = (("dilation", (1, 1)), ("groups", 1), ("padding", (1, 1)), ("padding_mode", "zeros"),
                        ("stride", (1, 1)))
                yield Workload("conv2d", (o, c, 3, 3), True, (b, c, s, s), conv, "float", "torch")

    rows = []
    with num_threads(args.threads):
        for base in workloads():
            info = base.layer_info()
            module, x = base.build()
            t_float = time_callable(lambda: module(x), repeats=args.repeats).median_ms
            for bits in sorted(layer_options(info, "cpu"), key=lambda b: b.name):
                w = Workload(**{**base.__dict__, "option": bits.name, "kernel": "mpq"})
                qmod, qx = w.build()
                t = time_callable(lambda: qmod(qx), repeats=args.repeats).median_ms
                rows.append({"kind": base.kind, "weight": "x".join(map(str, base.weight_shape)),
                             "input": "x".join(map(str, base.input_shape)), "option": bits.name,
                             "float_ms": t_float, "quant_ms": t, "speedup": t_float / t})
    print("| kind | weight | input | option | float (ms) | quantized (ms) | float / quantized |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kind']} | {r['weight']} | {r['input']} | {r['option']} | {r['float_ms']:.4f} | "
              f"{r['quant_ms']:.4f} | {r['speedup']:.2f} |")
    path = write_result("cpu_kernels", {"benchmark": "cpu_kernels", **environment("cpu", args.threads),
                                        "threads": args.threads, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
