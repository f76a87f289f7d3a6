"""Render BENCHMARKS.md from the JSON files in bench/results/ (so the tables never drift from the measurements).

    python bench/render.py
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def _env(d: dict) -> str:
    dev = d["device"]
    return (f"{dev.get('name')} ({dev.get('arch')}, {dev.get('threads')} threads), torch {d['torch']}, "
            f"Python {d['python']}, {d['date']}; command: `{d['command']}`")


def demo_section(d: dict) -> list[str]:
    out = ["## End-to-end searches on CPU (`bench/demo_search.py`)", "", _env(d), ""]
    for run in d["runs"]:
        out += [f"### {run['model']}, budget `{run['budget']}` (run {run['run']}, {run['wall_seconds']:.1f} s wall; "
                f"chosen {run['chosen']})", "",
                "| config | size (MB) | latency predicted (ms) | latency measured (ms) | metric fake-quant | "
                "metric real kernels |", "|---|---|---|---|---|---|"]
        for r in run["summary"]:
            out.append(f"| {r['name']} | {r['size_mb']:.4g} | {r['latency_predicted_ms']:.4g} | "
                       f"{r['latency_measured_ms']:.4g} | {r['metric_fakequant']:.4f} | {r['metric_real']:.4f} |")
        st = run["stages_seconds"]
        out += ["", "stage seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in st.items()), ""]
    return out


def kernels_section(d: dict) -> list[str]:
    out = ["## CPU kernels vs the float layer they replace (`bench/cpu_kernels.py`)", "", _env(d), "",
           "Median latency of one call of the quantized module (activation quantization, im2col and casts "
           "included) and of the float module, measured side by side.", "",
           "| kind | weight | input | option | float (ms) | quantized (ms) | float / quantized |",
           "|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['kind']} | {r['weight']} | {r['input']} | {r['option']} | {r['float_ms']:.4f} | "
                   f"{r['quant_ms']:.4f} | {r['speedup']:.2f} |")
    return out + [""]


def sensitivity_section(results: list[dict]) -> list[str]:
    out = ["## Sensitivity estimators vs measured damage (`bench/sensitivity.py`)", "", _env(results[0]), "",
           "Each estimator sees the calibration split; the truth is the task-loss increase on held-out data, per "
           "single-layer option (tau/rho option) and for 50 random mixed configs (tau/rho config: the additivity "
           "the ILP relies on). `cpu` = the options the CPU kernels run; `generic` = 2/3/4/6/8-bit weights, "
           "float or 8-bit activations (fake-quant), which spans real damage. `estimator:table` rows judge the "
           "tables an estimator exposes (each entropy proxy, each decoupled metric).", ""]
    for d in results:
        dmg = d["config_damage"]
        out += [f"### {d['model']}, {d['space']} space (config damage mean {dmg['mean']:.3g}, sd {dmg['sd']:.3g}; "
                f"{d['wall_seconds']:.0f} s)", "",
                "| estimator | tau option | rho option | tau config | rho config | seconds | forward | backward |",
                "|---|---|---|---|---|---|---|---|"]
        for r in d["table"]:
            cells = [r["estimator"]] + [_num(r[k]) for k in ("tau_option", "rho_option", "tau_config",
                                                                 "rho_config", "seconds", "forward_passes",
                                                                 "backward_passes")]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return out


def hutchinson_section(results: list[dict]) -> list[str]:
    out = ["## Hutchinson traces: batched probes vs one probe per backward (`bench/hutchinson.py`)", ""]
    for d in results:
        out += [_env(d), "", f"{d['model']} ({d['parameters']:,} parameters), {d['probes']} probes, calibration "
                f"batch {d['calib_batch']}; agreement = largest |z| of the per-layer traces against the one-probe "
                f"run.", "", "| probes per backward | seconds | speed-up | largest abs z |", "|---|---|---|---|"]
        out += [f"| {r['batch_probes']} | {r['seconds']:.2f} | {r['speedup']:.2f} | {r['max_abs_z']:.2f} |"
                for r in d["rows"]]
        out.append("")
    return out


def solvers_section(scale: dict | None, quality: dict | None, latency: dict | None) -> list[str]:
    out = ["## Solvers (`bench/solvers.py`)", ""]
    if scale:
        out += [_env(scale), "", "Synthetic: 1,000 layers x 8 options, sizes over three decades, error ~ 4^-bits, "
                "log-normal curvature; limits on size, BOPs and latency together.", "",
                "| what | seconds | note |", "|---|---|---|",
                f"| ILP, CBC (PuLP) | {scale['ilp_cbc_seconds']:.2f} | model build + CBC; score "
                f"{scale['ilp_cbc_score']:.8g} |",
                f"| ILP, HiGHS (SciPy) | {scale['ilp_highs_seconds']:.2f} | score {scale['ilp_highs_score']:.8g} |",
                f"| exact 50-point frontier (hull) | {scale['frontier_hull_50_seconds']:.2f} | "
                f"{scale['frontier_hull_exact']} of {scale['frontier_hull_points']} points proven exact |",
                f"| frontier walk, 100 layers, first 50 points | {scale['walk_100_layers_50_points_seconds']:.2f} | "
                f"complete: {scale['walk_complete']} |", ""]
    if quality:
        out += ["### Quality at three size budgets (held-out loss increase; lower is better)", "",
                _env(quality), "", "CPU kernel space; `decoupled` scores; Optuna(+XGBoost) minimises an accuracy "
                "predictor trained on 120 random configs measured on the calibration data; `random p90` is the "
                "90th-percentile (by quality) of 100 random configs within the budget.", "",
                "| model | budget (of float size) | ILP | Pareto | greedy | Optuna+XGBoost | uniform | random p90 | "
                "random median |", "|---|---|---|---|---|---|---|---|---|"]
        for r in quality["results"]:
            u = r.get("uniform", {})
            out.append(f"| {r['model']} | {r['budget_size_fraction']:.2f} | "
                       + " | ".join(f"{r[k]['heldout_loss_increase']:.4g}" for k in ("ilp", "pareto", "greedy",
                                                                                      "optuna+xgboost"))
                       + f" | {u.get('heldout_loss_increase', float('nan')):.4g} ({u.get('option', '-')}) | "
                       f"{r['random']['p90_best']:.4g} | {r['random']['median']:.4g} |")
        out.append("")
    if latency:
        out += ["### Latency predictor (median absolute percentage error on held-out measured configs)", "",
                _env(latency), "", "| model | configs (train/test) | retest noise | additive table | "
                "XGBoost, totals | XGBoost, per layer |", "|---|---|---|---|---|---|"]
        for r in latency["results"]:
            out.append(f"| {r['model']} | {r['train']}/{r['test']} | {r['mape_retest_pct']:.1f}% | "
                       f"{r['mape_additive_pct']:.1f}% | {r['mape_xgboost_totals_pct']:.1f}% | "
                       f"{r['mape_xgboost_per_layer_pct']:.1f}% |")
        out.append("")
    return out


def dashboard_section(d: dict) -> list[str]:
    return ["## Dashboard rendering (`bench/dashboard_bench.py`)", "", _env(d), "",
            f"{d['layers']} layers, {d['points_per_sweep']} frontier points per sweep: page {d['html_mb']:.1f} MB, "
            f"built in {d['build_seconds']:.2f} s; in headless Chromium the {d['figures']} figures render in "
            f"{d['render_ms_in_page']:.0f} ms (measured by the page), {d['browser_wall_seconds']:.1f} s wall "
            f"including the browser's start; JavaScript errors: {d['errors'] or 'none'}.", ""]


def quantizers_section(d: dict) -> list[str]:
    out = ["## Quantizers at 4, 3 and 2.5 weight bits (`bench/quantizers.py`)", "", _env(d["env"]), "",
           "Weights only; options 2/3/4/5/6/8 bits per channel or in groups of 32/64/128, asymmetric, fp16 scales and "
           "zeros counted in the size. Budget \"b bits\" = the size of the uniform b-bit per-channel model (2.5: "
           "halfway between 2 and 3). Uniform = the largest uniform option within the budget; mixed = ILP on measured "
           "single-layer KL (calibration batches) with that quantizer's weights. Metrics on held-out data. GPTQ "
           f"options: {d.get('gptq', {})}.", ""]
    for m in d["models"]:
        metric = "perplexity" if "perplexity" in m["float"] else "nll"
        cols = ["perplexity"] if metric == "perplexity" else ["nll", "kl", "accuracy"]
        out += [f"### {m['model']} ({m['layers']} layers, {m['weights']} weights; float " +
                ", ".join(f"{c} {m['float'][c]:.4f}" for c in cols if c in m["float"]) + ")", "",
                "| bits | allocation | quantizer | avg bits (scales counted) | " + " | ".join(cols) + " |",
                "|---|---|---|---|" + "---|" * len(cols)]
        by = {(r["target_bits"], r["allocation"], r["quantizer"]): r for r in m["rows"]}
        order = lambda kv: (-kv[0][0], kv[0][1] == "mixed", kv[0][2] == "gptq")  # noqa: E731
        for (bits, alloc, quant), r in sorted(by.items(), key=order):
            out.append(f"| {bits:g} | {alloc} | {quant} | {r['avg_bits']:.3f} | " +
                       " | ".join(f"{r[c]:.4f}" for c in cols) + " |")
        base = m["float"][metric]
        goals = []
        for bits in (3.0, 4.0):
            mixed, uni = by.get((bits, "mixed", "gptq")), by.get((bits, "uniform", "minmax"))
            if not mixed or not uni:
                continue
            if bits == 3.0:
                ratio = (mixed[metric] - base) / max(uni[metric] - base, 1e-12)
                goals.append(f"3 bits: mixed+GPTQ {metric} increase is {100 * ratio:.1f}% of uniform min-max's "
                             f"(goal <= 25%: {'met' if ratio <= 0.25 else 'missed'})")
            else:
                over = mixed[metric] / base - 1
                goals.append(f"4 bits: mixed+GPTQ {metric} is {100 * over:+.2f}% vs float (goal <= +1%: "
                             f"{'met' if over <= 0.01 else 'missed'})")
        cost = m["cost"].get("gptq", {})
        out += ["", *[f"- {g}" for g in goals],
                f"- GPTQ cost: Hessians {cost.get('prepare_s', 0):.2f} s ({cost.get('hessian_bytes', 0) / 1e6:.2f} "
                f"MB held), {1e3 * cost.get('s_per_layer_format', 0):.1f} ms per (layer, format), "
                f"{cost.get('quantize_all_s', 0):.1f} s for all of them; min-max "
                f"{1e3 * m['cost']['minmax']['s_per_layer_format']:.1f} ms per (layer, format)", ""]
    return out + [f"Peak resident memory of the whole benchmark process: {d.get('max_rss_mb', 0):.0f} MB.", ""]


def gpu_quant_section(d: dict) -> list[str]:
    env = d["env"]
    out = ["## GPTQ and FP8 on the GPU (`python bench/gpu_quant.py`)", "",
           f"{env.get('gpu')}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}.", "",
           "GPTQ, 4-bit asymmetric, group 128, 65536 calibration rows; output MSE on 2048 unseen rows relative to "
           "min-max:", "", "| layer (N x K) | act-order | seconds | peak extra GPU MB | Hessian MB | "
           "GPTQ / min-max output MSE |", "|---|---|---|---|---|---|"]
    for r in d["gptq"]:
        out.append(f"| {r['n']} x {r['k']} | {r['act_order']} | {r['seconds']:.2f} | {r['peak_extra_gpu_mb']:.0f} | "
                   f"{r['hessian_mb']:.0f} | {r['gptq_over_minmax']:.3f} |")
    out += ["", "FP8 W8A8 (`torch._scaled_mm`, row-wise scales) vs bf16 `torch.matmul`, median ms (CUDA events):", "",
            "| N x K | m | bf16 | FP8 (fused act. quant) | FP8 (eager act. quant) | `_scaled_mm` alone | "
            "bf16 / FP8 | bf16 / `_scaled_mm` |", "|---|---|---|---|---|---|---|---|"]
    for r in d["fp8"]:
        out.append(f"| {r['n']} x {r['k']} | {r['m']} | {r['bf16_ms']:.4f} | {r['fp8_ms']:.4f} | "
                   f"{r['fp8_eager_quant_ms']:.4f} | {r['scaled_mm_only_ms']:.4f} | {r['speedup']:.2f} | "
                   f"{r['scaled_mm_speedup']:.2f} |")
    return out + [""]


def gpu_kernels_section(d: dict) -> list[str]:
    env, rows = d["env"], d["rows"]
    out = ["## W8A8 and W4A16 kernels on the GPU (`python bench/gpu_kernels.py --all-configs`)", "",
           f"{env.get('gpu')} (driver {env['device'].get('driver')}), torch {env['torch']}, CUDA {env['cuda']}, "
           f"{env['date']}; command: `{env['command']}` (all in one run through `bash bench/gpu_suite.sh`). Median ms "
           "of CUDA events, interleaved, L2 flushed before every sample. W8A8 GEMM: INT8 operands in, scales and "
           "bf16 out fused; W8A8 layer: the per-token quantization kernel + the GEMM; W4A16: group 128, bf16 "
           "activations, as a converted module runs it (mpq's decode kernel up to m = 16, CUTLASS beyond); "
           "tinygemm: `aten._weight_int4pack_mm`, group 128.", "",
           "| N x K | m | bf16 | `_int_mm` | W8A8 GEMM | W8A8 layer | W4A16 | tinygemm | `_int_mm` / W8A8 | "
           "bf16 / W8A8 layer | bf16 / W4A16 | bf16 / tinygemm | W8A8 TOP/s | W8A8 GB/s | W4A16 GB/s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['n']} x {r['k']} | {r['m']} | {r['bf16_ms']:.4f} | {_num(r.get('int_mm_ms'))} | "
                   f"{r['cutlass_w8a8_gemm_ms']:.4f} | {r['cutlass_w8a8_layer_ms']:.4f} | "
                   f"{r['w4a16_ms']:.4f} | {_num(r.get('tinygemm_w4a16_ms'))} | "
                   f"{_num(r.get('int_mm_over_w8a8_gemm'))} | {r['bf16_over_w8a8_layer']:.2f} | "
                   f"{r['bf16_over_w4a16']:.2f} | {_num(r.get('bf16_over_tinygemm'))} | {r['w8a8_tops']:.0f} | "
                   f"{r['w8a8_gbs']:.0f} | {r['w4a16_gbs']:.0f} |")
    big = [r for r in rows if r["m"] == r["n"] == r["k"] == 8192]
    prefill = [r["int_mm_over_w8a8_gemm"] for r in rows if r["m"] >= 128 and "int_mm_over_w8a8_gemm" in r]
    decode = [r["bf16_over_w4a16"] for r in rows if r["m"] in (1, 16) and r["n"] != 8192]
    out += ["", "Goals (H100): W8A8 >= 1.4x `_int_mm` at 8192^3: "
            + (f"{big[0]['int_mm_over_w8a8_gemm']:.2f}x" if big else "not measured")
            + f"; >= 1.0x at every m >= 128 shape: min {min(prefill):.2f}x; W4A16 >= 3.5x bf16 at m = 1 and 16: "
            f"{min(decode):.2f}x to {max(decode):.2f}x. Peaks: 1979 dense INT8 TOP/s, 3.35 TB/s HBM.", ""]
    configs = sorted(k for k in rows[0] if k.startswith(("w8a8_", "w4a16_config", "w4a16_decode")) and "_config" in k
                     and k.endswith("_ms"))
    if configs:
        out += ["Every tile configuration (ms; `kernels/csrc/*_c<N>.cu`; the tables in `kernels/cutlass_w8a8.py` "
                "and `kernels/cutlass_w4a16.py` pick among them by m; W4A16 4-6 run on reordered weights; W4A16 "
                "decode: mpq's kernel, m <= 64 only):", "",
                "| N x K | m | " + " | ".join(c[:-3].replace("_config", " ").replace("_", " ") for c in configs) + " |",
                "|---|---|" + "---|" * len(configs)]
        for r in rows:
            cells = (f"{r[c]:.4f}" if c in r else "" for c in configs)
            out.append(f"| {r['n']} x {r['k']} | {r['m']} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def gpu_e2e_section(d: dict) -> list[str]:
    env = d["env"]
    out = ["## Llama-7B-shaped stack on the GPU (`python bench/gpu_e2e.py`)", "",
           f"{env.get('gpu')}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}; command: `{env['command']}`."
           f" {d['blocks']} decoder blocks of Llama-7B's shapes with embedding and head (random bf16 weights), "
           "applied on the real kernels; decode = 1 token, prefill = 2048 tokens; eager calls and CUDA-graph "
           f"replays. The mixed config is `mpq.search`'s under `{d['budget']}` (the script asks for `latency=0.42` of "
           "bf16 and, where the kernels cannot meet it, for 2% above the smallest latency the search can reach; "
           f"profiled on this GPU: {d['profiled_workloads']} workloads): {d['mixed_histogram']}.", "",
           "| phase | mode | config | ms | speed-up vs bf16 |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['phase']} | {r['mode']} | {r['config']} | {r['ms']:.3f} | {r['speedup_vs_bf16']:.2f}x |")
    return out + [""]


def profile_scale_section(results: list[dict]) -> list[str]:
    out = ["## Profiling at 7B scale (`python bench/profile_scale.py`)", "",
           "The Llama-7B-shaped model (32 blocks, built on the meta device), its (layer, option) pairs deduplicated "
           "into unique workloads, measured with 1 and then 2 profilers (Ray actors, one per device slot).", "",
           "| device | layers | layer-option pairs | unique workloads | tasks | profilers | wall s | workloads/s | "
           "rows per node | speed-up |", "|---|---|---|---|---|---|---|---|---|---|"]
    for d in results:
        for r in d["runs"]:
            speed = d["runs"][0]["wall_s"] / r["wall_s"]
            out.append(f"| {d['device']['name']} ({d['device']['device']}) | {d['layers']} | {d['pairs']} | "
                       f"{d['unique_workloads']} | {r['tasks']} | {r['profilers']} | {r['wall_s']:.1f} | "
                       f"{r['workloads_per_s']:.2f} | {', '.join(map(str, r['measured_per_node'].values()))} | "
                       f"{speed:.2f}x |")
        m = d["median_ratio"]
        out += ["", f"{d['date']}, `{d['command']}`: both tables cover the same workloads: {d['tables_same_keys']}; "
                f"median latency, {d['runs'][-1]['profilers']} profilers / 1: geometric mean {m['geomean']:.2f} "
                f"(range {m['min']:.2f}-{m['max']:.2f}).", ""]
    return out


def _num(v) -> str:
    return "" if v is None or v != v else (f"{v:.3f}" if isinstance(v, float) else str(v))


def main() -> None:
    parts = ["# Benchmarks", "", "Generated by `python bench/render.py` from `bench/results/*.json`; each section "
             "names the command that produced it. CPU numbers come from a 2-vCPU VM whose speed drifts by up to "
             "~30% between minutes, so compare rows of one run, not runs.", ""]
    sections = {"cpu_demo.json": demo_section, "cpu_kernels.json": kernels_section}
    for name, fn in sections.items():
        path = RESULTS / name
        if path.exists():
            parts += fn(json.loads(path.read_text()))
    load = lambda n: json.loads((RESULTS / n).read_text()) if (RESULTS / n).exists() else None  # noqa: E731
    if any(load(f"solvers_{p}.json") for p in ("scale", "quality", "latency")):
        parts += solvers_section(load("solvers_scale.json"), load("solvers_quality.json"),
                                 load("solvers_latency.json"))
    if load("dashboard_render.json"):
        parts += dashboard_section(load("dashboard_render.json"))
    if load("quantizers.json"):
        parts += quantizers_section(load("quantizers.json"))
    if load("gpu_quant.json"):
        parts += gpu_quant_section(load("gpu_quant.json"))
    if load("gpu_kernels.json"):
        parts += gpu_kernels_section(load("gpu_kernels.json"))
    if load("gpu_e2e.json"):
        parts += gpu_e2e_section(load("gpu_e2e.json"))
    groups = {"sensitivity_*.json": sensitivity_section, "hutchinson_*.json": hutchinson_section,
              "profile_scale_*.json": profile_scale_section}
    for pattern, fn in groups.items():
        found = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))]
        if found:
            parts += fn(found)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
