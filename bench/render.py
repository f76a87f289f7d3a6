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
    out = ["## CPU kernels vs the float layer and the INT8 kernel (`bench/cpu_kernels.py`)", "", _env(d), "",
           f"SIMD path of mpq's low-bit kernel: `{d.get('code_path', '?')}`; load average before/after "
           f"{d.get('loadavg_before')} / {d.get('loadavg_after')}. Median latency of one call of the module `apply` "
           "installs (casts, padding and bias included), the float `nn.Linear`, and `w8a16` "
           "(`_weight_int8pack_mm`, the INT8 kernel), measured side by side; `x float` and `x int8` are speed-ups "
           "over those (above 1: faster). Options marked * are not offered (mpq's 4-bit asymmetric groups, timed "
           "next to tinygemm's `w4a16g*`, which store the same bytes).", ""]
    if "goals" in d:
        g = d["goals"]
        out += [f"Goals: at m = 1 every option below 8 bits faster than `w8a16`: {g['m1_faster_than_int8']} "
                f"(4096x4096: {g['m1_faster_than_int8_4096']}; worst {_num(g['m1_worst_vs_int8'])}x); at m = 256 "
                f"within 2x of float: {g['m256_within_2x_float']} (worst {_num(g['m256_worst_vs_float'])}x).", ""]
    if d["rows"] and "m" not in d["rows"][0]:  # the format before issue 16
        out += ["| kind | weight | input | option | float (ms) | quantized (ms) | float / quantized |",
                "|---|---|---|---|---|---|---|"]
        out += [f"| {r['kind']} | {r['weight']} | {r['input']} | {r['option']} | {r['float_ms']:.4f} | "
                f"{r['quant_ms']:.4f} | {r['speedup']:.2f} |" for r in d["rows"]]
        return out + [""]
    groups: dict = {}
    for r in d["rows"]:
        groups.setdefault((r["n"], r["k"]), {}).setdefault(r["option"], {})[r["m"]] = r
    ms = sorted({r["m"] for r in d["rows"]})
    for (n, k), opts in groups.items():
        out += [f"### N x K = {n} x {k}", "",
                "| option | " + " | ".join(f"m={m} ms | x float | x int8" for m in ms) + " |",
                "|---|" + "---|---|---|" * len(ms)]
        for opt, by_m in opts.items():
            star = "" if next(iter(by_m.values()))["offered"] else "*"
            cells = []
            for m in ms:
                r = by_m.get(m)
                cells += ["", "", ""] if r is None else \
                    [f"{r['ms']:.4f}", f"{r['vs_float']:.2f}", f"{r['vs_int8']:.2f}"]
            out.append(f"| {opt}{star} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def search_quality_section(d: dict) -> list[str]:
    out = ["## Search quality at 6, 4, 3 and 2.5 weight bits (`bench/search_quality.py`)", "", _env(d["env"]), "",
           "A budget of b bits is the size of the uniform model storing b bits a weight with its scales (`w{b}a16sym` "
           "per channel, `w2a16g32sym` at 2.5; embeddings per row); every row gets that size_mb. Metric on held-out "
           "data (perplexity, or NLL for the CNN); `increase` is over float; `mixed default` is `mpq.search` with "
           "its defaults (wall seconds), applied on the real kernels.", ""]
    for m in d.get("models", []):
        metric = m["metric"]
        out += [f"### {m['model']} (float {metric} {m['float']:.5g}; {m['layers']} layers, {m['weights']:,} weights)",
                "", f"| bits | row | size (MB) of limit | bits/weight (+ scales) | {metric} | increase | seconds | "
                "options |", "|---|---|---|---|---|---|---|---|"]
        for r in m["rows"]:
            bpw = "" if r["bits_per_weight"] is None else \
                f"{r['bits_per_weight_nominal']:.3g} ({r['bits_per_weight']:.3g})"
            out.append(f"| {r['budget_bits']:g} | {r['row']} | {r['size_mb']:.4f} of {r['limit_mb']:.4f} | {bpw} | "
                       f"{r[metric]:.5g} | {r['increase']:+.4g} | {r['seconds']:.0f} | "
                       f"{', '.join(f'{k} {v}' for k, v in r['histogram'].items())} |")
        for g in m.get("goals", []):
            out.append("")
            out.append(f"Goals at {g['budget_bits']:g} bits: mixed beats both uniform rows: {g['beats_uniform']}" +
                       (f"; increase / uniform min-max's {g['increase_vs_minmax']:.3f} (goal <= 0.15)"
                        if "increase_vs_minmax" in g else "") +
                       (f"; relative to float {g['relative_to_float']:+.4%} (goal <= 0.2 %)"
                        if "relative_to_float" in g else ""))
        out.append("")
    return out


def options_section(d: dict) -> list[str]:
    out = ["## The low-bit option set: frontier shares and scale dtype (`bench/search_quality.py --sections "
           "frontier,scales`)", "", _env(d["env"]), ""]
    if "frontier" in d:
        out += ["Share of the zoo's layers (" + ", ".join(d["frontier"]["models"]) + ") on whose frontier of stored "
                "bytes vs Hessian-weighted output error (min-max rounding) each option lies; the kernel offers the "
                "options at 25 % or more (plus what the rule of no duplicates leaves).", "",
                "| kind | option | on frontier | layers | share |", "|---|---|---|---|---|"]
        out += [f"| {r['kind']} | {r['option']} | {r['on_frontier']} | {r['layers']} | {r['share']:.0%} |"
                for r in d["frontier"]["rows"]]
        out.append("")
    if "scales" in d:
        out += ["### Scale dtype", "", "Weight error with bf16 scales (and zeros) over fp16 ones, every zoo layer at "
                "per-channel, g32 and g128 (above 1: bf16 worse).", "",
                "| bits | scheme | median | min | max | cases |", "|---|---|---|---|---|---|"]
        out += [f"| {r['bits']} | {'sym' if r['symmetric'] else 'asym'} | {r['median']:.4f} | {r['min']:.4f} | "
                f"{r['max']:.4f} | {r['cases']} |" for r in d["scales"]["rows"]]
        out.append("")
    return out


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
    if "ceilings" not in d:  # a result of the earlier per-sample-flush benchmark: nothing here renders it
        return []
    import sys

    sys.path.insert(0, str(ROOT))
    from bench.gpu_render import kernels_section

    return kernels_section(d)


def gpu_e2e_section(d: dict) -> list[str]:
    env = d["env"]
    out = ["## Llama-7B-shaped stack on the GPU (`python bench/gpu_e2e.py`)", "",
           f"{env.get('gpu')}, torch {env['torch']}, CUDA {env['cuda']}, {env['date']}; command: `{env['command']}`."
           f" {d['blocks']} decoder blocks of Llama-7B's shapes with embedding and head (random bf16 weights), "
           "applied on the real kernels; decode = 1 token, prefill = 2048 tokens; eager calls and CUDA-graph "
           f"replays. The mixed config is `mpq.search`'s for target `{d.get('target', 'cuda')}` under "
           f"`{d['budget']}` (asked: `{d.get('requested_budget', d['budget'])}` of bf16 at the calibration batch; "
           "where the kernels cannot meet it, 5% above the smallest latency the search can reach; "
           f"profiled on this GPU: {d['profiled_workloads']} workloads): {d['mixed_histogram']}.", "",
           "| phase | mode | config | ms | speed-up vs bf16 |", "|---|---|---|---|---|"]
    for r in d["rows"]:
        out.append(f"| {r['phase']} | {r['mode']} | {r['config']} | {r['ms']:.3f} | {r['speedup_vs_bf16']:.2f}x |")
    if d.get("search_summary"):  # the search's own rows: its prediction next to its end-to-end measurement
        out += ["", "The search's summary (at the calibration batch, in the target's mode):", "",
                "| config | size (MB) | latency predicted (ms) | latency measured (ms) | measured / predicted |",
                "|---|---|---|---|---|"]
        for r in d["search_summary"]:
            ratio = r["latency_measured_ms"] / r["latency_predicted_ms"] if r["latency_predicted_ms"] else float("nan")
            out.append(f"| {r['name']} | {r['size_mb']:.1f} | {r['latency_predicted_ms']:.3f} | "
                       f"{r['latency_measured_ms']:.3f} | {ratio:.2f} |")
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


def study_resolve_section(d: dict) -> list[str]:
    r = d["resolve"]
    out = ["## One study, many budgets (`bench/study_resolve.py`)", "", _env(d),
           f"; load average before {d.get('loadavg_before')}, after {d.get('loadavg_after')}", "",
           f"`mpq.study({r['model']})` with an empty profile cache ({r['profile']} profiling) took "
           f"{r['study_seconds']:.1f} s (" + ", ".join(f"{k} {v:.1f}" for k, v in r["study_stages_seconds"].items())
           + f"); `study.solve` at {len(r['solves'])} budgets took {r['solve_seconds_total']:.2f} s in all, "
           f"**{100 * r['ratio']:.2f} %** of the study (goal: under 5 %). Solving predicts from the study's tables; "
           f"`evaluate=True` also applies each result on the real kernels, times and evaluates it "
           f"({r['evaluated_seconds_total']:.1f} s for the four, {100 * r['evaluated_ratio']:.1f} %).", "",
           "| budget | solve (s) | chosen | size (MB) | predicted latency (ms) | evaluated solve (s) | "
           "metric real kernels |", "|---|---|---|---|---|---|---|"]
    for s, e in zip(r["solves"], r["evaluated"]):
        out.append(f"| `{s['budget']}` | {s['seconds']:.2f} | {s['chosen']} | {s['size_mb']:.4g} | "
                   f"{s['latency_predicted_ms']:.4g} | {e['seconds']:.1f} | {e['metric_real']:.4g} |")
    out += ["", "An impossible budget (`size_mb=1e-6`) on every bundled model, with an estimator that raises if "
            "called: seconds from the call to the BudgetError (model loading excluded).", "",
            "| model | seconds | estimator ran | profiler ran | error |", "|---|---|---|---|---|"]
    for row in d["infeasible"]:
        out.append(f"| {row['model']} | {row['seconds']:.2f} | {row['estimator_calls'] > 0} | "
                   f"{row['profiler_calls'] > 0} | {row['error']} |")
    return out + [""]

def _pct(e: dict) -> str:
    return f"{e['median_pct']:.1f}% / {e['p90_pct']:.1f}%"


def latency_accuracy_section(results: list[dict]) -> list[str]:
    out = ["## Latency accuracy: predicted vs measured whole-model latency (`bench/latency_accuracy.py`)", "",
           "Each cell is the median / 90th-percentile absolute error over the configs (latency frontier of a damage "
           "proxy, uniform and random configs, each applied and timed end to end). *retest*: the same configs timed "
           "again (the noise floor); *additive before/after*: the layer table's sum plus the rest of the model, "
           "timed as before issue 18 (each workload alone) and context-faithfully (weights as cold as in the "
           "model); *selected*: the predictor that validated best in k-fold cross-validation (held-out errors; "
           "all candidates in the last column). *floor*: the smallest latency reached by the predictor's fastest "
           "and the uniform configs, measured, against the best config measured. *untrusted*: rows the noise "
           "checks flagged (layer rows, configs). Goals: median <= 5%, p90 <= 15%, floor within 5%.", ""]
    for d in results:
        out += [_env(d), "", f"target `{d['target']}`, {d['threads']} threads; /proc/loadavg before "
                f"{d.get('loadavg_before')}, after {d.get('loadavg_after')}; {d['wall_seconds'] / 60:.0f} min.", "",
                "| phase (load at start) | model | configs | retest | additive before | additive after | selected | "
                "floor vs best | untrusted | all held-out medians |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in d["results"]:
            load = r.get("loadavg_at_start") or ["?"]
            held = ", ".join(f"{n} {v['median_pct']:.1f}%" for n, v in r["heldout"].items())
            untrusted = (f"{r['profiles']['after']['untrusted_rows']}/{r['profiles']['after']['rows']}, "
                         f"{r['untrusted_configs']}/{r['configs']}")
            out.append(f"| {r['phase']} ({load[0]}) | {r['model']} | {r['configs']} | {_pct(r['retest'])} | "
                       f"{_pct(r['additive_before'])} | {_pct(r['additive_after'])} | {r['selected']}: "
                       f"{_pct(r['selected_errors'])} | {r['floor']['floor_over_best_pct']:+.1f}% | {untrusted} | "
                       f"{held} |")
        out.append("")
    return out

def export_section(d: dict) -> list[str]:
    """Exported checkpoints run by their serving stacks (bench/export_gguf.py)."""
    ran = d["llama_cpp"] == "ran"
    out = ["## Serving formats: exported checkpoints in llama.cpp and transformers (`bench/export_gguf.py`)", "",
           _env(d), "", f"{d['model']}, trained {d['train']['steps']} steps (last loss {d['train']['last_loss']:.3f}); "
           f"perplexity on {d['eval']['windows']} held-out windows of {d['eval']['seq']} tokens, the same token ids "
           f"for every runner. llama.cpp: "
           + (f"llama-cpp-python {d['versions']['llama_cpp_python']} (tokenizer round trip identical: "
              f"{d['tokenizer_tokens_match_llama_cpp']})" if ran else d["llama_cpp"]) + ".", "",
           "| config | mpq fake-quant ppl | llama.cpp ppl (GGUF) | GGUF dequantized in torch ppl | GGUF MB | "
           "mpq predicted MB | transformers ppl (compressed-tensors) | compressed-tensors MB | GGUF types |",
           "|---|---|---|---|---|---|---|---|---|"]
    def f(v, digits: int = 4) -> str:
        return "" if v is None else f"{v:.{digits}f}"

    for r in d["rows"]:
        out.append(f"| {r['config']} | {f(r['mpq_fakequant_ppl'])} | {f(r.get('llama_cpp_ppl'))} | "
                   f"{f(r['gguf_dequantized_in_torch_ppl'])} | {f(r['gguf_bytes'] / 1e6, 3)} | "
                   f"{f(r['predicted_bytes'] / 1e6, 3)} | {f(r.get('ct_transformers_ppl'))} | "
                   f"{f(r['ct_bytes'] / 1e6 if 'ct_bytes' in r else None, 3)} | "
                   f"{r['gguf_types'].removeprefix('types by parameters: ')} |")
    return out + [""]


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
    if load("search_quality.json"):
        parts += search_quality_section(load("search_quality.json"))
    if load("search_quality_options.json"):
        parts += options_section(load("search_quality_options.json"))
    if load("gpu_quant.json"):
        parts += gpu_quant_section(load("gpu_quant.json"))
    if load("gpu_kernels.json"):
        parts += gpu_kernels_section(load("gpu_kernels.json"))
    if load("gpu_e2e.json"):
        parts += gpu_e2e_section(load("gpu_e2e.json"))
    if load("study_resolve.json"):
        parts += study_resolve_section(load("study_resolve.json"))

    if load("export_gguf.json"):
        parts += export_section(load("export_gguf.json"))
    groups = {"sensitivity_*.json": sensitivity_section, "hutchinson_*.json": hutchinson_section,
              "profile_scale_*.json": profile_scale_section, "latency_accuracy_*.json": latency_accuracy_section}
    for pattern, fn in groups.items():
        found = [json.loads(p.read_text()) for p in sorted(RESULTS.glob(pattern))]
        if found:
            parts += fn(found)
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts))
    print(ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
