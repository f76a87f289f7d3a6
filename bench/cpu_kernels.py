"""Every CPU kernel option against the float layer and the INT8 kernel, side by side in one run.

    python bench/cpu_kernels.py [--threads 2] [--repeats 15] [--quick]

GEMM shapes: every distinct (N, K) of the zoo models' linears and of the digits CNN's convolutions (as the im2col
GEMM they run), and Llama-7B's 4096 x 4096; rows m = 1, 16 and 256. For each: the float ``nn.Linear``, ``w8a16``
(``torch._weight_int8pack_mm``, the INT8 kernel) and every option a CPU kernel offers that shape, each as the module
``apply`` installs (casts, padding and bias included), plus, for the record, mpq's 4-bit asymmetric groups next to
tinygemm's (not offered: same bytes). Goals (issue 16): at m = 1 every option of fewer than 8 bits is faster than
``w8a16``; at m = 256 every option is within 2x of the float layer. Writes bench/results/cpu_kernels.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_result  # noqa: E402


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def zoo_shapes() -> list[tuple[int, int]]:
    from mpq.layers import discover_layers
    from mpq.models import load_reference, reference_names

    shapes = set()
    for name in reference_names():
        task = load_reference(name)
        for layer in discover_layers(task.model, task.calib[0][0]):
            if layer.kind != "embedding" and layer.groups == 1:
                shapes.add((layer.n, layer.k))
    return sorted(shapes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--quick", action="store_true", help="only 4096x4096 and one zoo shape")
    args = p.parse_args()

    from mpq.config import LayerBits
    from mpq.kernel_registry import kernel_for, layer_options
    from mpq.kernels import cpu_lowbit
    from mpq.layers import LayerInfo
    from mpq.workers import time_callable
    from mpq.workers.timing import num_threads

    shapes = zoo_shapes() + [(4096, 4096)]
    if args.quick:
        shapes = [shapes[0], (4096, 4096)]
    lowbit = cpu_lowbit.CpuLowBit()
    load_before = loadavg()
    rows = []
    with num_threads(args.threads):
        for n, k in shapes:
            torch.manual_seed(0)
            linear = nn.Linear(k, n).eval()
            layer = LayerInfo("bench", "linear", (n, k), n * k + n, True, 4, calls=1)
            options = {b: kernel_for(layer, b, "cpu") for b in layer_options(layer, "cpu") if b.a_bits != 8}
            extra = {LayerBits(4, 16, g, symmetric=False): lowbit for g in cpu_lowbit.GROUPS if k % g == 0}
            modules = {"float": linear}
            for bits, kernel in {**options, **extra}.items():
                modules[bits.name] = kernel.quantize_module(linear, layer, bits).eval()
            for m in (1, 16, 256):
                x = torch.randn(m, k)
                repeats = max(3, args.repeats // 3) if n * k * m > 1 << 28 else args.repeats
                times = {}
                for name, module in modules.items():
                    times[name] = time_callable(lambda: module(x), warmup=2, repeats=repeats).median_ms
                for name, ms in times.items():
                    bits = None if name == "float" else LayerBits.parse(name)
                    rows.append({"n": n, "k": k, "m": m, "option": name, "ms": ms,
                                 "w_bits": None if bits is None else bits.w_bits,
                                 "kernel": "torch" if bits is None else (options.get(bits) or lowbit).name,
                                 "offered": bits is None or bits in options,
                                 "vs_float": times["float"] / ms, "vs_int8": times["w8a16"] / ms})
                print(f"{n}x{k} m={m}: float {times['float']:.4f} ms, w8a16 {times['w8a16']:.4f} ms, " +
                      ", ".join(f"{o} {t:.4f}" for o, t in times.items() if o not in ("float", "w8a16")), flush=True)
    load_after = loadavg()
    goals = summarize(rows)
    print(goals)
    path = write_result("cpu_kernels", {"benchmark": "cpu_kernels", **environment("cpu", args.threads),
                                        "threads": args.threads, "code_path": cpu_lowbit.code_path(),
                                        "loadavg_before": load_before, "loadavg_after": load_after,
                                        "goals": goals, "rows": rows})
    print(f"wrote {path}")


def summarize(rows: list[dict]) -> dict:
    """The goals, measured: options below 8 bits faster than w8a16 at m = 1; options within 2x of float at 256."""
    offered = [r for r in rows if r["offered"] and r["option"] not in ("float", "w8a16")]
    m1 = [r for r in offered if r["m"] == 1 and r["w_bits"] < 8]
    m256 = [r for r in offered if r["m"] == 256]
    big = [r for r in m1 if (r["n"], r["k"]) == (4096, 4096)]
    return {"m1_faster_than_int8": f"{sum(r['vs_int8'] > 1 for r in m1)}/{len(m1)}",
            "m1_faster_than_int8_4096": f"{sum(r['vs_int8'] > 1 for r in big)}/{len(big)}",
            "m1_worst_vs_int8": min((r["vs_int8"] for r in m1), default=None),
            "m256_within_2x_float": f"{sum(r['vs_float'] >= 0.5 for r in m256)}/{len(m256)}",
            "m256_worst_vs_float": min((r["vs_float"] for r in m256), default=None)}


if __name__ == "__main__":
    main()
