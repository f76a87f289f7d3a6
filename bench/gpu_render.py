"""The GPU kernel tables of BENCHMARKS.md, from ``bench/results/gpu_kernels.json`` (``bench/gpu_kernels.py``):
ceilings, every goal of issues 20 and 16 met or missed with its ratio from the run, ratios to bf16 by token count,
per-shape times and bandwidths, and the decode configurations. ``bench/render.py`` calls :func:`kernels_section`.
"""

from __future__ import annotations

from collections import defaultdict

LLAMA = {(4096, 4096), (11008, 4096), (4096, 11008), (12288, 4096)}  # (N, K) of Llama-7B's linears
SQUARE = (8192, 8192)
NAMES = {"lowbit_w4_g128": "mpq W4A16 g128", "lowbit_w4_g64": "mpq W4A16 g64", "lowbit_w4_g32": "mpq W4A16 g32",
         "lowbit_w4_g0": "mpq W4A16 per channel", "lowbit_w3_g64": "mpq W3A16 g64", "lowbit_w3_g128": "mpq W3A16 g128",
         "lowbit_w3_g0": "mpq W3A16 per channel", "lowbit_w2_g128": "mpq W2A16 g128", "lowbit_w2_g32": "mpq W2A16 g32",
         "lowbit_w5_g128": "mpq W5A16 g128", "lowbit_w6_g128": "mpq W6A16 g128", "lowbit_w8_g0": "mpq W8A16",
         "mpq_w4a16_g128_v1": "mpq W4A16 g128 (v1)", "tinygemm_w4a16_g128": "tinygemm W4A16 g128",
         "lowbit_w4_g128_nopdl": "mpq W4A16 g128, no PDL", "lowbit_w2_g128_nopdl": "mpq W2A16 g128, no PDL",
         "lowbit_w3_g64_nopdl": "mpq W3A16 g64, no PDL",
         "w8a8_layer": "W8A8 layer (mpq)", "w8a8_layer_nopdl": "W8A8 layer (mpq), no PDL", "w8a8_quant_cutlass": "W8A8 quant + CUTLASS", "fp8_layer": "FP8 layer (mpq)", "fp8_layer_nopdl": "FP8 layer (mpq), no PDL",
         "fp8_triton_scaled_mm": "FP8 Triton quant + `_scaled_mm`"}


def _ratios(rows: list[dict]) -> dict[tuple[str, int], dict[tuple[int, int], float]]:
    out: dict[tuple[str, int], dict[tuple[int, int], float]] = defaultdict(dict)
    for r in rows:
        out[(r["kernel"], r["m"])][(r["n"], r["k"])] = r["bf16_over"]
    return out


def _range(values: list[float]) -> str:
    return "" if not values else (f"{min(values):.2f}" if len(values) == 1 else f"{min(values):.2f}–{max(values):.2f}")


def _goal(ratios, kernels: list[str], tokens: list[int], target: float, what: str) -> list[str]:
    """One row per kernel: its range over the Llama-7B shapes (and token counts), on how many it meets the target."""
    out = []
    for k in kernels:
        cells = [v for m in tokens for s, v in ratios.get((k, m), {}).items() if s in LLAMA]
        if not cells:
            continue
        met = sum(v >= target for v in cells)
        status = "met" if met == len(cells) else (f"missed ({met} of {len(cells)} met)" if met else "missed")
        out.append(f"| {what}: {NAMES.get(k, k)} | >= {target}x | {_range(cells)} | {status} |")
    return out or [f"| {what} | >= {target}x | not measured | — |"]


def _module_paths(rows: list[dict]) -> list[dict]:
    """At 17-128 tokens a low-bit module runs one of two measured paths (``<kernel>_decode``, ``<kernel>_dequant``):
    its row is the measured row of the path :func:`mpq.kernels.cuda_lowbit.prefill_path` picks."""
    from mpq.kernels.cuda_lowbit import prefill_path

    by = {(r["kernel"], r["m"], r["n"], r["k"]): r for r in rows}
    out = []
    for r in rows:
        name = r["kernel"]
        if name.startswith("lowbit_") and name.count("_") == 2 and (f"{name}_decode", r["m"], r["n"], r["k"]) in by:
            bits, group = int(name.split("_")[1][1:]), int(name.split("_")[2][1:]) or None
            path = by[(f"{name}_{prefill_path(bits, r['m'], group)}", r["m"], r["n"], r["k"])]
            r = {**path, "kernel": name, "path": prefill_path(bits, r["m"], group)}
        out.append(r)
    return out


def kernels_section(d: dict) -> list[str]:
    env, ceil = d["env"], d["ceilings"]
    rows = _module_paths(d["rows"])
    ratios = _ratios(rows)
    out = ["## GPU kernels against cuBLAS bf16 (`python bench/gpu_kernels.py --all-configs`)", "",
           f"{env.get('gpu')} (driver {env['device'].get('driver')}), torch {env['torch']}, CUDA {env['cuda']}, "
           f"{env['date']}; command: `{env['command']}` (in one device call through `bash bench/gpu_suite.sh`). "
           "Each kernel: one CUDA graph of back-to-back calls over rotating weight copies that together exceed 4x "
           "the L2, median of 7 replays (`workers/cuda_timing.py`); ratios are bf16 time / kernel time in this run. "
           "At 17-128 tokens a low-bit module's row is the measured row of the path it takes "
           "(`cuda_lowbit.prefill_path`: decode passes or dequantise + cuBLAS; both are in the JSON).",
           "", f"Ceilings measured in the same run: device copy {ceil['copy_tbs']:.2f} TB/s (read + write), cuBLAS "
           f"bf16 GEMV {ceil['gemv_bf16_tbs']:.2f} TB/s (weights read), bf16 GEMM {ceil['gemm_bf16_tflops']:.0f} "
           f"TFLOP/s, INT8 GEMM {ceil['gemm_int8_tops']:.0f} TOP/s (`_int_mm`)"
           + (f", {ceil['gemm_int8_cutlass_tops']:.0f} TOP/s (mpq's CUTLASS W8A8)" if "gemm_int8_cutlass_tops" in ceil
              else "") + f" at {ceil['gemm_n']}^3; L2 {ceil['l2_mb']:.0f} MiB.", ""]
    w4 = ["lowbit_w4_g128", "lowbit_w4_g64", "lowbit_w4_g32", "lowbit_w4_g128_nopdl"]
    out += ["### Goals (issue 20; issue 16's GPU goal) on Llama-7B's four shapes", "",
            "Each row: the kernel's range of bf16 time / kernel time over the four shapes (and the token counts "
            "named), and on how many of them it meets the target.", "",
            "| goal: kernel | target | measured | status |", "|---|---|---|---|"]
    out += _goal(ratios, w4, [1], 2.5, "W4A16 decode, m = 1 (groups 32/64/128)")
    gemv = ceil["gemv_bf16_tbs"]
    for k in w4:
        fracs = [r["tbs"] / gemv for r in rows if r["kernel"] == k and r["m"] == 1 and (r["n"], r["k"]) in LLAMA]
        if fracs:
            met = sum(f >= 0.7 for f in fracs)
            out.append(f"| W4A16 m = 1 bandwidth: {NAMES[k]} | >= 70% of the bf16 GEMV read rate ({gemv:.2f} TB/s) "
                       f"| {min(fracs):.0%}–{max(fracs):.0%} | "
                       + ("met" if met == len(fracs) else f"missed ({met} of {len(fracs)} met)") + " |")
    out += _goal(ratios, w4, [16], 2.0, "W4A16 m = 16")
    out += _goal(ratios, w4[:3], [32, 64, 128], 1.2, "W4A16 m = 32–128")
    out += _goal(ratios, w4[:3], [2048], 0.95, "W4A16 m = 2048")
    out += _goal(ratios, ["w8a8_layer", "w8a8_layer_nopdl"], [1], 1.7, "W8A8 layer (quantisation fused), m = 1")
    out += _goal(ratios, ["w8a8_layer"], [16], 1.5, "W8A8 layer, m = 16")
    out += _goal(ratios, ["lowbit_w8_g0"], [1], 1.7, "W8A16, m = 1")
    out += _goal(ratios, ["lowbit_w8_g0"], [16], 1.5, "W8A16, m = 16")
    out += _goal(ratios, ["fp8_layer", "fp8_layer_nopdl"], [1], 1.6, "FP8 layer (quantisation included), m = 1")
    out += _goal(ratios, ["fp8_layer"], [16], 1.4, "FP8 layer, m = 16")
    out += _goal(ratios, ["lowbit_w2_g128", "lowbit_w2_g128_nopdl", "lowbit_w2_g32", "lowbit_w3_g128", "lowbit_w3_g64",
                          "lowbit_w3_g64_nopdl", "lowbit_w3_g0"], [1], 3.0, "2/3-bit decode, m = 1 (issue 16)")
    by = {(r["kernel"], r["m"], r["n"], r["k"]): r for r in rows}
    slower = [(by[(f"{k}_decode", m, n, kk)]["ms"], by[(f"{k}_dequant", m, n, kk)]["ms"], by[(k, m, n, kk)]["ms"])
              for (k, m, n, kk) in list(by) if (f"{k}_decode", m, n, kk) in by and (f"{k}_dequant", m, n, kk) in by]
    if slower:
        worst = max(mod / min(dec, deq) for dec, deq, mod in slower)
        out.append(f"| low-bit prefill never slower than dequantise + cuBLAS (m = 32–128, module / the faster of "
                   f"the two paths, worst case) | <= 1.0 | {worst:.2f} | {'met' if worst <= 1.02 else 'missed'} |")
    if "gemm_int8_cutlass_tops" in ceil:  # the two INT8 GEMMs of the ceilings, 8192^3
        v = ceil["gemm_int8_cutlass_tops"] / ceil["gemm_int8_tops"]
        out.append(f"| CUTLASS W8A8 GEMM vs `_int_mm` at 8192^3 (issue 5, kept) | >= 1.4x | {v:.2f}x | "
                   f"{'met' if v >= 1.4 else 'missed'} |")
    out.append("")

    tokens = sorted({r["m"] for r in rows})
    kernels = [k for k in NAMES if any((k, m) in ratios for m in tokens)]
    out += ["### bf16 time / kernel time by token count (range over Llama-7B's shapes; 8192x8192 after the bar)", "",
            "| kernel | " + " | ".join(f"m = {m}" for m in tokens) + " |", "|---|" + "---|" * len(tokens)]
    for k in kernels:
        cells = []
        for m in tokens:
            per = ratios.get((k, m), {})
            llama = _range([v for s, v in per.items() if s in LLAMA])
            sq = per.get(SQUARE)
            cells.append(llama + (f" \\| {sq:.2f}" if sq is not None else ""))
        out.append(f"| {NAMES[k]} | " + " | ".join(cells) + " |")
    out += ["", "The low-bit modules run mpq's decode kernel to 48 tokens (to 64 for 2 and 4 bits in groups of 128; "
            "one pass of 8 or 16 token columns to 16 tokens, 16-token passes beyond) and dequantise to bf16 for "
            "cuBLAS beyond; W8A8 and FP8 run the fused kernel "
            "(activation quantisation in the same launch) up to 8 tokens and their prefill kernels beyond. mpq's "
            "decode kernels launch with programmatic dependent launch on sm_90 (they stream their weights while the "
            "previous kernel in the stream finishes, and wait for it before reading activations): the `no PDL` rows "
            "are the same kernels launched plainly, which is what a neighbour that is not PDL-aware leaves of it.", ""]

    out += ["### Per shape at decode: time, HBM bytes over time, the second column (per-sample L2 flush)", "",
            "| N x K | m | kernel | ms (graph) | q1–q3 | TB/s | of GEMV ceiling | bf16 / kernel | ms (flushed) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["m"] > 16 or "config" in r["kernel"] or r["kernel"] not in NAMES and r["kernel"] != "bf16":
            continue
        out.append(f"| {r['n']}x{r['k']} | {r['m']} | {NAMES.get(r['kernel'], 'cuBLAS bf16')} | {r['ms']:.4f} | "
                   f"{r['q1_ms']:.4f}–{r['q3_ms']:.4f} | {r['tbs']:.2f} | {r['tbs'] / gemv:.0%} | "
                   f"{r['bf16_over']:.2f} | " + (f"{r['flushed_ms']:.4f}" if "flushed_ms" in r else "") + " |")
    out.append("")

    sweep = [r for r in rows if "_config" in r["kernel"]]
    if sweep:
        best: dict[tuple, tuple] = {}
        for r in sweep:
            family = r["kernel"].split("_config")[0]
            key = (family, r["m"], r["n"], r["k"])
            if key not in best or r["ms"] < best[key][0]:
                best[key] = (r["ms"], r["kernel"][len(family) + 1:], r["bf16_over"])
        out += ["### Decode configurations: the fastest of each family (every one is in the JSON)", "",
                "| kernel | m | N x K | fastest | ms | bf16 / kernel |", "|---|---|---|---|---|---|"]
        for (family, m, n, k), (ms, which, ratio) in sorted(best.items()):
            out.append(f"| {family} | {m} | {n}x{k} | {which} | {ms:.4f} | {ratio:.2f} |")
        out.append("")
    return out
