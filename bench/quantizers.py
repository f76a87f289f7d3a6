"""Quantizer benchmark: does better rounding (GPTQ) plus mixed precision keep accuracy at 4, 3 and 2.5 weight bits?

For each zoo model, weights only (activations stay float), every layer's options are 2/3/4/5/6/8 bits per channel or in
groups of 32/64/128, stored asymmetric with fp16 scales and zeros (size counts them). A budget of "b bits" is the size
of the uniform b-bit per-channel model (2.5: halfway between 2 and 3), so the mixed configs get exactly the bytes of
the uniform ones. Rows:

- uniform <quantizer>: every layer at the largest uniform option within the budget (2.5: the 2-bit one below it);
- mixed <quantizer>: the ILP's allocation under the budget, scored by measured single-layer damage on the calibration
  batches with that quantizer's weights: the KL divergence of the output from the float model's (``decoupled:kl``,
  the best estimator of the sensitivity benchmark on both LMs; always positive, so no option is a false "free"
  one as a noisy loss delta can be);

each evaluated on held-out data (LMs: perplexity; the CNN: NLL and KL to the float model). Also GPTQ's cost:
seconds per layer and the bytes of its Hessians.

    python bench/quantizers.py                     # char-lm, llama-lm, digits-cnn
    python bench/quantizers.py --models char-lm
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import environment, write_result  # noqa: E402
from mpq.config import BitConfig, LayerBits  # noqa: E402
from mpq.costs import MB, build_cost_table  # noqa: E402
from mpq.evaluators import classification_metrics  # noqa: E402
from mpq.fakequant import fake_quantize  # noqa: E402
from mpq.layers import discover_layers, weight_matrix  # noqa: E402
from mpq.models import load_reference  # noqa: E402
from mpq.numerics import GenericNumerics  # noqa: E402
from mpq.quantizers import get_quantizer  # noqa: E402
from mpq.kernel_registry import scheme_for  # noqa: E402
from mpq.sensitivity.measured import single_layer_deltas  # noqa: E402
from mpq.calib import CalibrationSet  # noqa: E402
from mpq.solvers import ilp_allocate  # noqa: E402
from mpq.space import generic_space  # noqa: E402

log = logging.getLogger("bench.quantizers")
NUMERICS = GenericNumerics(symmetric=False, scale_dtype="float16")
BITS, GROUPS = (8, 6, 5, 4, 3, 2), (None, 128, 64, 32)
TARGETS = (4.0, 3.0, 2.5)


def metrics_of(task, model, reference) -> dict[str, float]:
    if task.metric == "perplexity":
        return {"perplexity": task.eval_fn(model)}
    return classification_metrics(model, task.heldout, reference)


def avg_bits(table: pd.DataFrame, choice: dict[str, str], weights: dict[str, int]) -> float:
    idx = table.set_index(["layer", "option"])
    return sum(idx.loc[(l, o), "size_mb"] * MB * 8 for l, o in choice.items()) / sum(weights.values())


def run_model(name: str, gptq_options: dict) -> dict:
    task = load_reference(name)
    model = task.model.eval()
    calib = CalibrationSet.from_any(task.calib)
    inv = discover_layers(model, calib.example)
    weights = {l.name: l.n * l.k for l in inv}
    fixed = {"size_mb": inv.float_bytes_other() / MB}
    reference = metrics_of(task, model, model)
    log.info("%s: %d layers, float %s", name, len(inv), reference)
    rows, cost = [], {}
    for qname in ("minmax", "gptq"):
        t0 = time.perf_counter()
        quant = get_quantizer(qname, **(gptq_options if qname == "gptq" else {})).prepare(model, calib.inputs(), inv)
        t_prepare = time.perf_counter() - t0
        space = generic_space(inv, BITS, (None,), GROUPS, quant, NUMERICS)
        t0 = time.perf_counter()
        for layer, bits in space.pairs():  # every (layer, format) once: the cache serves the rest
            if bits.w_bits is not None:
                quant.quantize(layer, weight_matrix(model.get_submodule(layer)), scheme_for(inv[layer], bits,
                                                                                            NUMERICS).weight)
        t_quant = time.perf_counter() - t0
        cost[qname] = {"prepare_s": t_prepare, "quantize_all_s": t_quant,
                       "s_per_layer_format": t_quant / sum(1 for _, b in space.pairs() if b.w_bits),
                       "hessian_bytes": sum(h.numel() * h.element_size() for h in getattr(quant, "hessians",
                                                                                           {}).values())}
        t0 = time.perf_counter()
        damage = single_layer_deltas(model, calib, space, inv, metrics=("kl",), progress=False)
        cost[qname]["sensitivity_s"] = time.perf_counter() - t0
        table = build_cost_table(inv, space).merge(damage.rename(columns={"kl": "score"}), on=["layer", "option"])
        uniform_size = {b: sum(table[(table.option == LayerBits(b).name)].size_mb) for b in (2, 3, 4)}
        for target in TARGETS:
            lo, hi = int(target), int(target) + (target % 1 > 0)
            limit = fixed["size_mb"] + (uniform_size[lo] + uniform_size.get(hi, uniform_size[lo])) / 2
            uniform = _uniform_within(table, space, limit - fixed["size_mb"])
            mixed = dict(ilp_allocate(table, {"size_mb": limit}, fixed).choice)
            for kind, choice in (("uniform", uniform), ("mixed", mixed)):
                config = BitConfig(choice)
                q_model = fake_quantize(model, config, NUMERICS, inv, quantizer=quant)
                row = {"model": name, "target_bits": target, "quantizer": qname, "allocation": kind,
                       "avg_bits": avg_bits(table, choice, weights), "size_mb": fixed["size_mb"] + sum(
                           table.set_index(["layer", "option"]).loc[list(choice.items()), "size_mb"]),
                       "limit_mb": limit, "histogram": config.histogram(), **metrics_of(task, q_model, model)}
                rows.append(row)
                log.info("%s", row)
    return {"model": name, "float": reference, "rows": rows, "cost": cost, "layers": len(inv),
            "weights": sum(weights.values())}


def _uniform_within(table: pd.DataFrame, space, budget_mb: float) -> dict[str, str]:
    """The uniform option (one name for every layer that has it) with the largest size within the budget."""
    best, best_size = None, -1.0
    for option in sorted(set(table.option) - {"float"}):
        sub = table[table.option == option]
        if set(sub.layer) != set(space.layers):
            continue  # a group size some layer cannot take (wider than its K) is not uniform
        size = float(sub.size_mb.sum())
        if best_size < size <= budget_mb + 1e-12:
            best, best_size = option, size
    return {l: best for l in space.layers}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="char-lm,llama-lm,digits-cnn")
    p.add_argument("--gptq", type=json.loads, default={"act_order": True, "clip": True},
                   help="GPTQ options as JSON (default: act-order and MSE-clipped group ranges)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    out = {"env": environment("cpu"), "numerics": {"symmetric": NUMERICS.symmetric,
                                                   "scale_dtype": NUMERICS.scale_dtype},
           "bits": BITS, "groups": GROUPS, "gptq": args.gptq, "models": []}
    for name in args.models.split(","):
        out["models"].append(run_model(name, args.gptq))
    out["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    print(write_result("quantizers", out))


if __name__ == "__main__":
    main()
