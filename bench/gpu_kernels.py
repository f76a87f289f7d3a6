"""The W8A8 and W4A16 kernels against PyTorch's GEMMs on the GPU, side by side in one run.

Shapes: Llama-7B's linears (N x K = 4096x4096, 11008x4096, 4096x11008, 12288x4096) at m = 1, 16, 128, 2048 tokens,
and 8192^3. Per shape, CUDA-event medians (interleaved, L2 flushed before each sample) of: bf16 ``torch.matmul``
(cuBLAS), ``torch._int_mm`` (INT8 -> INT32, m > 16 only), ``aten._weight_int4pack_mm`` (tinygemm W4A16, group 128),
the CUTLASS W8A8 GEMM alone (``w8a8_sm90``: scales and bf16 output in its epilogue), the whole W8A8 layer
(per-token quantization kernel + GEMM) and W4A16 as a converted module runs it (group 128, bf16 activations: mpq's
decode kernel up to 16 tokens, CUTLASS beyond); with ``--all-configs`` every tile configuration of each kernel too.
Achieved TOP/s and GB/s are against the H100 SXM's 1979 dense INT8 TOP/s and 3.35 TB/s.

    python bench/gpu_kernels.py --all-configs    # writes bench/results/gpu_kernels.json (a first run builds the kernel)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import RESULTS, environment  # noqa: E402
from bench.gpu_quant import SHAPES, time_cuda  # noqa: E402

TOKENS = [1, 16, 128, 2048]
PEAK_INT8_TOPS, PEAK_TBS = 1979.0, 3.35


def tinygemm(w: torch.Tensor, x: torch.Tensor):
    """tinygemm W4A16 (group 128) on ``w`` [N, K]: returns a call with x [m, K] bf16, or None where unsupported."""
    try:
        n, k = w.shape
        q = torch.randint(0, 16, (n, k), dtype=torch.int32, device="cuda")
        packed = torch.ops.aten._convert_weight_to_int4pack(((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8), 8)
        sz = torch.ones(k // 128, n, 2, dtype=torch.bfloat16, device="cuda")
        torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)
        return lambda: torch.ops.aten._weight_int4pack_mm(x, packed, 128, sz)
    except (RuntimeError, AttributeError):
        return None


def one_shape(m: int, n: int, k: int, repeats: int, all_configs: bool = False) -> dict:
    from mpq.kernels.cutlass_w4a16 import (DECODE_CONFIGS, SHUFFLED_CONFIGS, W4A16_CONFIGS, pack_int4, reorder_int4,
                                           w4a16_decode, w4a16_gemm, w4a16_matmul)
    from mpq.kernels.cutlass_w8a8 import W8A8_CONFIGS, quantize_int8_rows, w8a8_gemm

    g = torch.Generator(device="cuda").manual_seed(m + n + k)
    x = torch.randn(m, k, device="cuda", generator=g, dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", generator=g, dtype=torch.bfloat16)
    q = torch.randint(-127, 128, (m, k), device="cuda", dtype=torch.int8, generator=g)
    wq = torch.randint(-127, 128, (n, k), device="cuda", dtype=torch.int8, generator=g)
    s, ws = torch.rand(m, device="cuda") / 100, torch.rand(n, device="cuda") / 100
    w4 = pack_int4(torch.randint(-7, 8, (n, k), device="cuda", generator=g))
    s4 = (torch.rand(k // 128, n, device="cuda", generator=g) / 50).to(torch.bfloat16)  # [K / group, N]
    fns = {"bf16": lambda: x @ w.T,
           "w4a16": lambda: w4a16_matmul(x, w4, s4, 128),  # what a converted module runs
           "cutlass_w8a8_gemm": lambda: w8a8_gemm(q, s, wq, ws),
           "cutlass_w8a8_layer": lambda: w8a8_gemm(*quantize_int8_rows(x), wq, ws)}
    if all_configs:  # every tile configuration, to choose the tables in kernels/cutlass_w8a8.py and _w4a16.py
        for arch, configs in W8A8_CONFIGS.items():  # the sm_80 build runs on Hopper too
            fns.update({f"w8a8_{arch}_config{c}": (lambda c=c, arch=arch: w8a8_gemm(q, s, wq, ws, config=c, arch=arch))
                        for c in configs})
        w4s = reorder_int4(w4)
        # the decode configuration's work decomposition: data-parallel, split-K 2/4/8, forced stream-K
        for name, dec, splits in (("dp", 1, 1), ("split2", 2, 2), ("split4", 2, 4), ("split8", 2, 8), ("sk", 3, 1)):
            fns[f"w4a16_config4_{name}"] = (lambda d=dec, sp=splits: w4a16_gemm(x, w4s, s4, 128, config=4,
                                                                                 decomposition=d, splits=sp))
        fns.update({f"w4a16_config{c}": (lambda c=c: w4a16_gemm(x, w4s if c in SHUFFLED_CONFIGS else w4, s4, 128,
                                                               config=c)) for c in W4A16_CONFIGS})
        if m <= 64:
            fns.update({f"w4a16_decode_config{c}": (lambda c=c: w4a16_decode(x, w4, s4, 128, c))
                        for c in DECODE_CONFIGS})
    if m > 16 and m % 8 == 0:
        wq_t = wq.T  # _int_mm wants the second operand K x N
        fns["int_mm"] = lambda: torch._int_mm(q, wq_t)
    tg = tinygemm(w, x)
    if tg is not None:
        fns["tinygemm_w4a16"] = tg
    ms = time_cuda(fns, repeats=repeats, warmup=5, flush_mb=256)
    ops = 2 * m * n * k
    row = {"m": m, "n": n, "k": k, **{f"{name}_ms": v for name, v in ms.items()},
           "w8a8_tops": ops / ms["cutlass_w8a8_gemm"] / 1e9,
           "w8a8_gbs": (m * k + n * k + 2 * m * n) / ms["cutlass_w8a8_gemm"] / 1e6,
           "bf16_over_w8a8_layer": ms["bf16"] / ms["cutlass_w8a8_layer"],
           "bf16_over_w4a16": ms["bf16"] / ms["w4a16"],
           "w4a16_gbs": (n * k / 2 + n * k / 128 * 2 + 2 * m * k + 2 * m * n) / ms["w4a16"] / 1e6}
    if "int_mm" in ms:
        row["int_mm_over_w8a8_gemm"] = ms["int_mm"] / ms["cutlass_w8a8_gemm"]
    if "tinygemm_w4a16" in ms:
        row["bf16_over_tinygemm"] = ms["bf16"] / ms["tinygemm_w4a16"]
    row["w8a8_tops_of_peak"] = row["w8a8_tops"] / PEAK_INT8_TOPS
    row["w8a8_bw_of_peak"] = row["w8a8_gbs"] / (PEAK_TBS * 1e3)
    return row


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--all-configs", action="store_true", help="also time every tile configuration of both kernels")
    args = p.parse_args(argv)
    rows = [one_shape(m, n, k, args.repeats, args.all_configs) for n, k in SHAPES for m in TOKENS]
    rows.append(one_shape(8192, 8192, 8192, args.repeats, args.all_configs))
    env = {**environment("cuda"), "gpu": torch.cuda.get_device_name()}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "gpu_kernels.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2) + "\n")
    for r in rows:
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))


if __name__ == "__main__":
    main()
