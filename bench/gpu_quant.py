"""GPU side of the quantizer work: GPTQ's cost on 7B-shaped linears, and the FP8 kernel against bf16, in one run.

- GPTQ: 4-bit, group 128, on Llama-7B's MLP shapes (up/gate ``11008 x 4096`` and down ``4096 x 11008``), with a
  Hessian from 65536 correlated calibration rows (GPTQ's own setting is 128 x 2048 tokens; with rows ~ K the
  Hessian over-fits and GPTQ loses to min-max on new inputs, measured here in an earlier run); seconds and peak GPU
  memory (``torch.cuda.max_memory_allocated``) of the rounding per layer, with and without act-order, and the output
  error on fresh inputs against min-max's.
- FP8: :class:`mpq.kernels.cuda_fp8.FP8Gemm` (per-token activation quantization included) against ``torch.matmul``
  in bf16 at m = 1, 16, 128, 2048 on the 7B shapes; CUDA-event medians over interleaved repeats.

    python bench/gpu_quant.py                   # writes bench/results/gpu_quant.json
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, environment  # noqa: E402
from mpq.numerics import WeightQuantSpec, quantize_weight  # noqa: E402
from mpq.quantizers import gptq_quantize  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)]  # (N, K)


def correlated_rows(rows: int, k: int, generator: torch.Generator, device: str) -> torch.Tensor:
    x = torch.randn(rows, k, device=device, generator=generator)
    return x + 0.5 * torch.roll(x, 1, dims=1)  # neighbouring features correlate, as real activations do


def gptq_cost(n: int, k: int, act_order: bool, rows: int = 65536, chunk: int = 4096) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(n, k, device="cuda", generator=g) * 0.02
    h = torch.zeros(k, k, device="cuda")
    for _ in range(rows // chunk):
        x = correlated_rows(chunk, k, g, "cuda")
        h += 2 * x.t() @ x
    h /= rows
    spec = WeightQuantSpec(4, symmetric=False, group_size=128, scale_dtype="float16")
    del x
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    qw = gptq_quantize(w, h, spec, act_order=act_order, device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() - base
    mm = quantize_weight(w.cpu(), spec)
    xe = correlated_rows(2048, k, torch.Generator().manual_seed(1), "cpu")  # inputs GPTQ never saw
    wc = w.cpu()
    err = {name: float(((xe @ (q.dequantize() - wc).t()) ** 2).mean()) for name, q in (("gptq", qw), ("minmax", mm))}
    return {"n": n, "k": k, "act_order": act_order, "calibration_rows": rows, "seconds": seconds,
            "peak_extra_gpu_mb": peak / 1e6, "hessian_mb": k * k * 4 / 1e6, "output_mse": err,
            "gptq_over_minmax": err["gptq"] / err["minmax"]}


def time_cuda(fns: dict, repeats: int = 50, warmup: int = 10, flush_mb: int = 0) -> dict[str, float]:
    """Median ms per call of each function, interleaved so clocks and caches treat them alike; with ``flush_mb``,
    that many MB are read before each sample so no operand is still in L2 (H100: 50 MB; see ``evict_l2``)."""
    from mpq.workers.timing import evict_l2

    scratch = torch.zeros(flush_mb * 2**20, dtype=torch.uint8, device="cuda") if flush_mb else None
    for _ in range(warmup):
        for f in fns.values():
            f()
    samples = {name: [] for name in fns}
    for _ in range(repeats):
        for name, f in fns.items():
            if scratch is not None:
                evict_l2(scratch)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            end.synchronize()
            samples[name].append(start.elapsed_time(end))
    return {name: statistics.median(s) for name, s in samples.items()}


def fp8_vs_bf16() -> list[dict]:
    from mpq.kernels.cuda_fp8 import FP8Gemm, fp8_supported
    from mpq.kernels.gemm import pad_to, round_up
    from mpq.layers import LayerInfo
    from mpq.numerics import fp8_per_token

    if not fp8_supported():
        return []
    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device="cuda") * 0.02
        layer = LayerInfo(name="bench", kind="linear", weight_shape=(n, k), params=n * k, has_bias=False,
                          weight_bytes_per_elem=2)
        spec = WeightQuantSpec(8, True, None, "float32", fmt="e4m3")
        mod = FP8Gemm(layer, quantize_weight(w, spec), None).cuda()
        wb = w.to(torch.bfloat16)
        for m in (1, 16, 128, 2048):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            eager = copy.copy(mod)
            eager.fused_quantization = False
            q, s = fp8_per_token(pad_to(x, rows=round_up(m, 16)))
            ms = time_cuda({"bf16": lambda: torch.matmul(x, wb.t()), "fp8": lambda: mod.gemm(x),
                            "fp8_eager_quant": lambda: eager.gemm(x),
                            "scaled_mm_only": lambda: torch._scaled_mm(q, mod.qweight.t(), scale_a=s,
                                                                       scale_b=mod.scale, out_dtype=torch.bfloat16)})
            rows.append({"n": n, "k": k, "m": m, **{f"{name}_ms": v for name, v in ms.items()},
                         "speedup": ms["bf16"] / ms["fp8"], "scaled_mm_speedup": ms["bf16"] / ms["scaled_mm_only"],
                         "fp8_tflops": 2 * m * n * k / ms["fp8"] / 1e9})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(RESULTS / "gpu_quant.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench/gpu_quant.py needs a CUDA GPU")
    out = {"env": {**environment("cuda"), "gpu": torch.cuda.get_device_name()},
           "gptq": [gptq_cost(n, k, ao) for n, k in [(11008, 4096), (4096, 11008)] for ao in (False, True)],
           "fp8": fp8_vs_bf16()}
    Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
    print(json.dumps(out, indent=1, default=str)[:6000])


if __name__ == "__main__":
    main()
