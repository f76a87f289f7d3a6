"""Training-free proxies: no gradients, one or a few calibration batches.

- ``entropy`` (QuantMCU's value-driven metric): the information an option destroys, as the drop in entropy of the
  weight and input-activation value distributions. Both the float and the quantized values are histogrammed on the
  same fine grid (2^16 bins over the float range), so the drop counts how many distinct values quantization merges:
  ``dH = H(x) - H(Q(x))`` in bits per element, for weights and activations, summed.
- ``relative_error``: the layer's output error ``||y_q - y||^2 / ||y||^2`` on the calibration batch, with the
  kernel's exact numerics (the quantity layer-wise PTQ minimises).
- ``output_error``: the same error unnormalised, per sample (``||y_q - y||^2 / batch``).
- ``entropy_error`` (an EMQ-style combination): ``relative_error * (1 + dH)``.

The estimator scores with one proxy (``proxy=``) and exposes every proxy's table, so the judge can rank them all.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
from torch import Tensor, nn

from mpq.calib import CalibrationSet
from mpq.config import FLOAT
from mpq.fakequant import FakeQuantLayer
from mpq.layers import LayerInventory, call_model, modules_by_name, weight_matrix
from mpq.numerics import fake_quantize_activation
from mpq.kernel_registry import scheme_for
from mpq.sensitivity.base import ScoreError, SensitivityEstimator, SensitivityResult, register_estimator
from mpq.space import SearchSpace

PROXIES = ("entropy", "relative_error", "output_error", "entropy_error")
HIST_BINS = 2**16


def histogram_entropy(values: Tensor, lo: float, hi: float, bins: int = HIST_BINS) -> float:
    """Entropy in bits of ``values`` histogrammed into ``bins`` equal bins over ``[lo, hi]``."""
    v = values.detach().float().flatten()
    if hi <= lo:
        return 0.0
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    p = counts[counts > 0] / v.numel()
    return float(-(p * p.log2()).sum())


def entropy_drop(x: Tensor, xq: Tensor, what: str = "values") -> float:
    """Bits per element lost when ``x`` becomes ``xq`` (both histogrammed on the grid of ``x``'s range)."""
    if x.numel() == 0:
        raise ScoreError(f"{what} are empty: no entropy to measure")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ScoreError(f"{what} hold {bad} NaN/Inf value{'s' if bad > 1 else ''} of {x.numel()}: the entropy of "
                         f"their histogram is undefined; check the model's weights and calibration inputs")
    lo, hi = float(x.min()), float(x.max())
    return max(histogram_entropy(x, lo, hi) - histogram_entropy(xq.clamp(lo, hi), lo, hi), 0.0)


@register_estimator
class EntropyProxyEstimator(SensitivityEstimator):
    """Gradient-free proxies (see the module docstring); scores with ``proxy``, exposes all of them."""

    name = "entropy"

    def __init__(self, proxy: str = "entropy", batches: int = 1):
        if proxy not in PROXIES:
            raise ValueError(f"unknown proxy {proxy!r}; available: {', '.join(PROXIES)}")
        self.proxy = proxy
        self.batches = batches

    @torch.no_grad()
    def estimate(self, model: nn.Module, calib: CalibrationSet, space: SearchSpace, inventory: LayerInventory,
                 loss_fn=None, progress: bool = True) -> SensitivityResult:
        t0 = time.perf_counter()
        names = [n for n in space.layers if any(b != FLOAT for b in space[n])]
        modules = modules_by_name(model, names)
        inputs: dict[str, list[Tensor]] = {n: [] for n in names}
        handles = [modules[n].register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0].detach()))
                   for n in names]
        try:
            batches = calib.inputs()[: self.batches]
            for x in batches:
                call_model(model, x)
        finally:
            for h in handles:
                h.remove()

        rows = []
        for n, bits in space.pairs():
            row = {"layer": n, "option": bits.name, **dict.fromkeys(PROXIES, 0.0), "weight_bits_lost": 0.0,
                   "act_bits_lost": 0.0}
            if bits != FLOAT:
                scheme = scheme_for(inventory[n], bits, space.device)
                mod = modules[n]
                if scheme.weight is not None:
                    w = weight_matrix(mod)
                    row["weight_bits_lost"] = entropy_drop(w, space.quantizer.fake(n, w, scheme.weight),
                                                           f"the weights of layer {n!r}")
                fq = FakeQuantLayer(mod, scheme, n, space.quantizer)
                err = ref = 0.0
                n_samples = 0
                act_lost = []
                for x in inputs[n]:
                    y, yq = mod(x), fq(x)
                    err += float((yq - y).float().pow(2).sum())
                    ref += float(y.float().pow(2).sum())
                    n_samples += x.shape[0]
                    if not scheme.act.is_float:
                        act_lost.append(entropy_drop(x, fake_quantize_activation(x, scheme.act),
                                                     f"the inputs of layer {n!r}"))
                row["act_bits_lost"] = sum(act_lost) / len(act_lost) if act_lost else 0.0
                row["relative_error"] = err / max(ref, 1e-30)
                row["output_error"] = err / max(n_samples, 1)
                row["entropy"] = row["weight_bits_lost"] + row["act_bits_lost"]
                row["entropy_error"] = row["relative_error"] * (1.0 + row["entropy"])
            rows.append(row)
        table = pd.DataFrame(rows)
        scores = table.assign(raw_score=table[self.proxy])
        cost = {"forward_passes": len(batches), "backward_passes": 0, "seconds": time.perf_counter() - t0,
                "proxy": self.proxy}
        tables = {p: table[["layer", "option", p]].rename(columns={p: "value"}) for p in PROXIES}
        return SensitivityResult(self.name, scores, pd.DataFrame(), cost, tables)
