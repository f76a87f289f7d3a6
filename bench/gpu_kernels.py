"""mpq's GPU kernels against cuBLAS bf16 (and tinygemm, ``torch._int_mm``) side by side in one run.

Every kernel is timed by :func:`mpq.workers.cuda_timing.time_rotating`: one CUDA graph of back-to-back calls, each
on the next of enough weight copies to exceed 4x the L2, medians (and quartiles) of 7 replays; the main kernels
also get the older per-sample number (L2 flushed by a read before one eager call) as a second column. Alongside:
the device's ceilings measured in the same run (a 2 GB device copy, cuBLAS bf16 GEMV read rate, bf16 and INT8 GEMMs
at 8192^3), each kernel's HBM bytes (weights, scales, activations, output) and achieved TB/s and TOP/s.

Shapes: Llama-7B's linears (N x K = 4096x4096, 11008x4096, 4096x11008, 12288x4096) and 8192x8192, at m = 1, 16,
32, 64, 128 and 2048 tokens (8: the fused W8A8/FP8 kernel's last size). Kernels: bf16 ``x @ w.T``; the low-bit modules' path (``lowbit_w{bits}_g{group}``:
mpq's decode kernel or dequantise + cuBLAS as ``cuda_lowbit.prefill_path`` picks; ``g0`` per channel; 8 bits is ``w8a16``) and, at 32-128
tokens, each of its two paths alone; the earlier mpq W4A16 (``mpq_w4a16_g128_v1``: its decode kernel to 16 tokens,
CUTLASS beyond); tinygemm W4A16 (group 128); the W8A8 and FP8 layers as the modules run them (fused per-token
quantisation + weight stream to 8 tokens; quantisation kernel + CUTLASS / ``_scaled_mm`` beyond), their
unfused prefill paths at every m, and the INT8 GEMMs alone. ``--all-configs`` adds every decode configuration at
1 and 16 tokens (and the pass configurations at 32 and 64), from which the modules' tables were chosen; ``_nopdl``
rows launch the same decode kernels without programmatic dependent launch (which lets each start streaming its
weights while the previous kernel finishes).

    python bench/gpu_kernels.py --all-configs    # writes bench/results/gpu_kernels.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, environment  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096), (8192, 8192)]  # (N, K)
TOKENS = [1, 8, 16, 32, 64, 128, 2048]
LOWBIT_DECODE = [(4, 128), (4, 64), (4, 32), (4, None), (2, 128), (2, 32), (3, 128), (3, 64), (3, None), (5, 128),
                 (6, 128), (8, None)]
LOWBIT_PREFILL = [(4, 128), (4, 64), (4, 32), (3, 64), (2, 128), (8, None)]
FLUSHED = ("bf16", "lowbit_w4_g128", "lowbit_w3_g64", "mpq_w4a16_g128_v1", "tinygemm_w4a16_g128", "w8a8_layer",
           "fp8_layer")


class Bench:
    def __init__(self, m: int, n: int, k: int, seed: int):
        self.m, self.n, self.k = m, n, k
        self.g = torch.Generator(device="cuda").manual_seed(seed)
        self.x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=self.g)
        self.rows: list[dict] = []

    def run(self, name: str, weights: list[torch.Tensor], call, flops: float | None = None, **extra) -> None:
        """Time ``call(*weight_copy)`` over rotating copies of ``weights`` (copied per call index)."""
        from mpq.workers.cuda_timing import time_flushed, time_rotating

        nbytes = sum(w.numel() * w.element_size() for w in weights)
        timing = time_rotating(lambda i: (lambda ws=[w.clone() for w in weights]: call(*ws)) if i else
                               (lambda: call(*weights)), nbytes)
        hbm = nbytes + self.x.numel() * 2 + self.m * self.n * 2
        row = {"kernel": name, "m": self.m, "n": self.n, "k": self.k, "ms": timing.median_ms, "q1_ms": timing.q1_ms,
               "q3_ms": timing.q3_ms, "copies": timing.copies, "calls": timing.calls, "graph": timing.graph,
               "weight_bytes": nbytes, "hbm_bytes": hbm, "tbs": hbm / timing.median_ms / 1e9,
               "tops": (flops or 2 * self.m * self.n * self.k) / timing.median_ms / 1e9, **extra}
        if name in FLUSHED:
            row["flushed_ms"] = time_flushed(lambda: call(*weights))
        self.rows.append(row)


def lowbit_weights(b: Bench, bits: int, group):
    from mpq.kernels.cuda_lowbit import pack_lowbit, tile_scales

    lo, hi = (-127, 127) if bits == 8 else (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1)
    q = torch.randint(lo, hi + 1, (b.n, b.k), device="cuda", generator=b.g)
    cols = b.k // group if group else 1
    s = torch.rand(b.n, cols, device="cuda", generator=b.g) / 50 + 1e-3
    return pack_lowbit(q, bits), tile_scales(s, group, b.n, b.k)


def bench_lowbit(b: Bench, all_configs: bool) -> None:
    from mpq.kernels.cuda_lowbit import (DECODE_CONFIGS, PASS_CONFIGS, lowbit_decode, lowbit_dequantize,
                                         lowbit_matmul)

    x, n, k, m = b.x, b.n, b.k, b.m
    for bits, group in (LOWBIT_DECODE if m <= 16 else LOWBIT_PREFILL):
        packed, scale = lowbit_weights(b, bits, group)
        tag = f"lowbit_w{bits}_g{group or 0}"
        b.run(tag, [packed, scale], lambda p, s, bits=bits, group=group: lowbit_matmul(x, p, s, bits, n, group))
        if m <= 16 and (bits, group) in ((4, 128), (2, 128), (3, 64)):  # what programmatic dependent launch adds
            b.run(f"{tag}_nopdl", [packed, scale],
                  lambda p, s, bits=bits, group=group: lowbit_decode(x, p, s, bits, n, group, pdl=False))
        if 16 < m <= 128:  # the two paths the module chooses between
            b.run(f"{tag}_decode", [packed, scale],
                  lambda p, s, bits=bits, group=group: lowbit_decode(x, p, s, bits, n, group))
            b.run(f"{tag}_dequant", [packed, scale], lambda p, s, bits=bits, group=group: x @ lowbit_dequantize(
                p, s, bits, n, k, group).t())
        if not all_configs or (bits, group) not in ((4, 128), (4, 32), (2, 128), (3, 64), (8, None)):
            continue
        if m <= 16:
            for config in DECODE_CONFIGS:
                b.run(f"{tag}_config{config}", [packed, scale], lambda p, s, c=config, bits=bits, group=group:
                      lowbit_decode(x, p, s, bits, n, group, config=c), config=config)
        elif m <= 64 and (bits, group) == (4, 128):
            for m_tiles, configs in ((2, DECODE_CONFIGS), (4, PASS_CONFIGS)):
                for config in configs:
                    b.run(f"{tag}_mt{m_tiles}_config{config}", [packed, scale],
                          lambda p, s, c=config, mt=m_tiles: lowbit_decode(x, p, s, 4, n, 128, config=c, m_tiles=mt),
                          config=config, m_tiles=m_tiles)


def bench_w4a16_v1_and_tinygemm(b: Bench) -> None:
    from mpq.kernels.cutlass_w4a16 import pack_int4, w4a16_matmul

    x, n, k, m = b.x, b.n, b.k, b.m
    w4 = pack_int4(torch.randint(-7, 8, (n, k), device="cuda", generator=b.g))
    s4 = (torch.rand(k // 128, n, device="cuda", generator=b.g) / 50).to(torch.bfloat16)
    b.run("mpq_w4a16_g128_v1", [w4, s4], lambda w, s: w4a16_matmul(x, w, s, 128))
    if m > 128:
        return  # tinygemm runs prefill at 0.04x bf16 (issue 20): not worth the device time
    try:
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda", generator=b.g)
        packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
        sz = torch.rand(k // 128, n, 2, device="cuda", generator=b.g).to(torch.bfloat16)
        torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)
    except (RuntimeError, AttributeError):
        return
    b.run("tinygemm_w4a16_g128", [packed, sz], lambda p, s: torch.ops.aten._weight_int4pack_mm(x, p, 128, s))


def bench_w8(b: Bench, all_configs: bool) -> None:
    from mpq.kernels.cuda_decode8 import CLUSTERS, CONFIGS, DECODE_M, decode_available, w8_decode
    from mpq.kernels.cuda_fp8 import fp8_supported
    from mpq.kernels.cutlass_w8a8 import hopper_ready, quantize_int8_rows, w8a8_gemm
    from mpq.kernels.triton_fp8 import fp8_quantize_rows

    x, n, k, m = b.x, b.n, b.k, b.m
    wq = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=b.g)
    ws = torch.rand(n, device="cuda", generator=b.g) / 100
    fused = m <= DECODE_M and decode_available()
    if hopper_ready():
        b.run("w8a8_quant_cutlass", [wq, ws], lambda w, s: w8a8_gemm(*quantize_int8_rows(x), w, s))
        b.run("w8a8_layer", [wq, ws], (lambda w, s: w8_decode(x, w, s, None, "int8")) if fused else
              (lambda w, s: w8a8_gemm(*quantize_int8_rows(x), w, s)))
        if fused:
            b.run("w8a8_layer_nopdl", [wq, ws], lambda w, s: w8_decode(x, w, s, None, "int8", pdl=False))
        if m >= 64:
            q, s = quantize_int8_rows(x)
            b.run("w8a8_gemm_cutlass", [wq, ws], lambda w, sw: w8a8_gemm(q, s, w, sw))
            b.run("int_mm", [wq], lambda w: torch._int_mm(q, w.t()))
    if fp8_supported():
        w8 = torch.randn(n, k, device="cuda", generator=b.g).clamp(-448, 448).to(torch.float8_e4m3fn)
        s8 = (torch.rand(1, n, device="cuda", generator=b.g) / 100).contiguous()
        rows = max(16, (m + 15) // 16 * 16)

        def scaled_mm(w, s):
            qx, sx = fp8_quantize_rows(x, rows)
            return torch._scaled_mm(qx, w.t(), scale_a=sx, scale_b=s, out_dtype=torch.bfloat16)[:m]

        b.run("fp8_triton_scaled_mm", [w8, s8], scaled_mm)
        b.run("fp8_layer", [w8, s8], (lambda w, s: w8_decode(x, w, s, None, "e4m3")) if fused else scaled_mm)
        if fused:
            b.run("fp8_layer_nopdl", [w8, s8], lambda w, s: w8_decode(x, w, s, None, "e4m3", pdl=False))
    if all_configs and fused:
        for fmt, w, s in (("int8", wq, ws),) + ((("e4m3", w8, s8),) if fp8_supported() else ()):
            for config in CONFIGS:
                for cluster in CLUSTERS if torch.cuda.get_device_capability() >= (9, 0) else (1,):
                    if cluster == 2:
                        continue
                    b.run(f"w8_decode_{fmt}_config{config}_cluster{cluster}", [w, s],
                          lambda w_, s_, c=config, cl=cluster, f=fmt: w8_decode(x, w_, s_, None, f, c, cl),
                          config=config, cluster=cluster)


def bf16_row(b: Bench) -> None:
    w = torch.randn(b.n, b.k, device="cuda", dtype=torch.bfloat16, generator=b.g)
    x = b.x
    b.run("bf16", [w], lambda w_: x @ w_.t())


def main(argv=None) -> None:
    from mpq.kernels.cutlass_w8a8 import hopper_ready, w8a8_gemm
    from mpq.workers.cuda_timing import measure_ceilings

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all-configs", action="store_true", help="also time every decode configuration")
    p.add_argument("--tokens", type=int, nargs="*", default=TOKENS)
    p.add_argument("--out", default=str(RESULTS / "gpu_kernels.json"))
    args = p.parse_args(argv)
    t0 = time.time()
    ceilings = measure_ceilings()
    if hopper_ready():  # the INT8 GEMM ceiling through CUTLASS, which beats _int_mm here
        g = torch.Generator(device="cuda").manual_seed(1)
        a = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device="cuda", generator=g)
        w = torch.randint(-127, 128, (8192, 8192), dtype=torch.int8, device="cuda", generator=g)
        s = torch.ones(8192, device="cuda")
        for _ in range(3):
            w8a8_gemm(a, s, w, s)
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
        ev[0].record()
        for _ in range(10):
            w8a8_gemm(a, s, w, s)
        ev[1].record()
        torch.cuda.synchronize()
        ceilings["gemm_int8_cutlass_tops"] = 2 * 8192**3 / (ev[0].elapsed_time(ev[1]) / 10) / 1e9
        del a, w
    print(json.dumps(ceilings))
    rows = []
    for n, k in SHAPES:
        for m in args.tokens:
            b = Bench(m, n, k, seed=m + n + k)
            bf16_row(b)
            bench_lowbit(b, args.all_configs and m <= 64)
            bench_w4a16_v1_and_tinygemm(b)
            bench_w8(b, args.all_configs)
            base = b.rows[0]["ms"]
            for r in b.rows:
                r["bf16_over"] = base / r["ms"]
            rows += b.rows
            torch.cuda.empty_cache()
            print(f"{n}x{k} m={m}: " + ", ".join(f"{r['kernel']} {r['bf16_over']:.2f}x" for r in b.rows
                                                  if "config" not in r["kernel"] and "_mt" not in r["kernel"]),
                  flush=True)
    env = {**environment("cuda"), "gpu": torch.cuda.get_device_name(), "seconds": time.time() - t0}
    out = {"env": env, "method": "CUDA-graph replays over rotating weight copies > 4x L2 (workers/cuda_timing.py)",
           "ceilings": ceilings, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
