"""LRP-QViT: per-layer contribution by Layer-wise Relevance Propagation, turned into per-option scores.

Relevance starts at the predicted output (the argmax logit of every sample, or of every position for a language
model) and is propagated to every layer. It is computed as gradient x input on a forward pass whose non-linear
pieces follow the rules of the LRP-for-transformers literature (Ali et al. 2022, "XAI for Transformers"; Achtibat et
al. 2024, AttnLRP), which make the pass locally linear so that gradient x input *is* LRP-0 with those rules:

- LayerNorm / RMSNorm: the normalising denominator is treated as a constant (LN-rule);
- softmax (attention weights): treated as constants, so relevance flows through the values (AH-rule);
- element-wise activations (GELU, SiLU, tanh, sigmoid): identity rule, ``f(x) = x * [f(x)/x]`` with the ratio constant;
- ReLU, linear layers, convolutions, pooling and residual sums need no change (LRP-0).

For a bias-free network this conserves relevance exactly: at any cut through the network the relevances sum to the
explained output (tested). A layer's contribution is the total absolute relevance at its output, averaged over the
batches, as LRP-QViT aggregates it; the score of an option is ``contribution x (relative weight error + relative
activation error)`` of the layer under that option's numerics.

zennit, the maintained PyTorch LRP library, depends on torchvision (which forces a multi-GB CUDA torch on this
project's CPU installs) and has no transformer rules, so the rules above are implemented here.
"""

from __future__ import annotations

import contextlib
import time

import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpq.calib import CalibrationSet, model_output
from mpq.config import FLOAT
from mpq.layers import LayerInventory, call_model, modules_by_name, weight_matrix
from mpq.numerics import fake_quantize_activation
from mpq.kernel_registry import scheme_for
from mpq.sensitivity.base import SensitivityEstimator, SensitivityResult, register_estimator
from mpq.space import SearchSpace


def _identity_rule(fn):
    def wrapped(x, *args, **kwargs):
        y = fn(x, *args, **kwargs)
        safe = torch.where(x.abs() > 1e-12, x, torch.ones_like(x))
        ratio = torch.where(x.abs() > 1e-12, y / safe, torch.zeros_like(x))
        return x * ratio.detach()
    return wrapped


def _detached(fn):
    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs).detach()
    return wrapped


def _layer_norm_rule(layer_norm):
    def wrapped(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        dims = tuple(range(-len(normalized_shape), 0))
        mean = x.mean(dim=dims, keepdim=True)
        std = (x.var(dim=dims, keepdim=True, unbiased=False) + eps).sqrt().detach()
        y = (x - mean) / std
        if weight is not None:
            y = y * weight
        return y if bias is None else y + bias
    return wrapped


def _rms_norm_rule(rms_norm):
    def wrapped(x, normalized_shape, weight=None, eps=None):
        dims = tuple(range(-len(normalized_shape), 0))
        eps = torch.finfo(x.dtype).eps if eps is None else eps
        rms = (x.pow(2).mean(dim=dims, keepdim=True) + eps).sqrt().detach()
        y = x / rms
        return y if weight is None else y * weight
    return wrapped


@contextlib.contextmanager
def lrp_rules():
    """Patch torch's functional non-linearities with their LRP rules for the duration of the block."""
    patches = [(F, "gelu", _identity_rule), (F, "silu", _identity_rule), (torch, "tanh", _identity_rule),
               (torch, "sigmoid", _identity_rule), (F, "softmax", _detached), (torch, "softmax", _detached),
               (torch.Tensor, "softmax", _detached), (F, "layer_norm", _layer_norm_rule)]
    if hasattr(F, "rms_norm"):
        patches.append((F, "rms_norm", _rms_norm_rule))
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in patches]
    try:
        for (obj, name, rule), (_, _, original) in zip(patches, saved):
            setattr(obj, name, rule(original))
        yield
    finally:
        for obj, name, original in saved:
            setattr(obj, name, original)


def layer_relevance(model: nn.Module, inputs, names: list[str]) -> tuple[dict[str, Tensor], Tensor]:
    """Relevance at each named layer's output and at the explained output: ``(per-layer R, target logits)``.

    The explained output is the sum over samples (and positions) of the predicted class's logit.
    """
    modules = modules_by_name(model, names)
    outputs: dict[str, list[Tensor]] = {n: [] for n in names}
    handles = [modules[n].register_forward_hook(lambda mod, args, out, n=n: outputs[n].append(out)) for n in names]
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        # Only the named layers' weights require grad: their outputs join the graph whatever the input is (token ids
        # included), and autograd.grad below leaves every .grad untouched.
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            modules[n].weight.requires_grad_(True)
        with torch.enable_grad(), lrp_rules():
            out = model_output(call_model(model, inputs))
            logits = out.reshape(-1, out.shape[-1])
            target = logits.gather(1, logits.argmax(1, keepdim=True))
            flat = [o for n in names for o in outputs[n]]
            grads = torch.autograd.grad(target.sum(), flat, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        for p, flag in saved.items():
            p.requires_grad_(flag)
    by_id = {id(o): g for o, g in zip(flat, grads)}
    rel = {n: sum((o * by_id[id(o)]).detach() if by_id[id(o)] is not None else torch.zeros_like(o).detach()
                  for o in outs) for n, outs in outputs.items()}
    return rel, target.detach()


@register_estimator
class LRPEstimator(SensitivityEstimator):
    """LRP-QViT contribution scores times each option's relative quantization error."""

    name = "lrp"

    def __init__(self, batches: int | None = None, activations: bool = True):
        self.batches = batches
        self.activations = activations

    def estimate(self, model: nn.Module, calib: CalibrationSet, space: SearchSpace, inventory: LayerInventory,
                 loss_fn=None, progress: bool = True) -> SensitivityResult:
        t0 = time.perf_counter()
        names = [n for n in space.layers if any(b != FLOAT for b in space[n])]
        modules = modules_by_name(model, names)
        batches = calib.inputs()[: self.batches]
        contrib = dict.fromkeys(names, 0.0)
        inputs: dict[str, list[Tensor]] = {n: [] for n in names}
        handles = [modules[n].register_forward_pre_hook(lambda mod, args, n=n: inputs[n].append(args[0].detach()))
                   for n in names]
        was_training = model.training
        model.eval()
        try:
            for x in batches:
                rel, _ = layer_relevance(model, x, names)
                for n in names:
                    contrib[n] += float(rel[n].abs().sum()) / len(batches)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)
        total = sum(contrib.values()) or 1.0
        rows = []
        for n, bits in space.pairs():
            row = {"layer": n, "option": bits.name, "raw_score": 0.0, "contribution": contrib.get(n, 0.0) / total,
                   "weight_rel_error": 0.0, "act_rel_error": 0.0}
            if bits != FLOAT:
                scheme = scheme_for(inventory[n], bits, space.device)
                w = weight_matrix(modules[n]).detach()
                if scheme.weight is not None:
                    dw = space.quantizer.fake(n, w, scheme.weight) - w
                    row["weight_rel_error"] = float(dw.pow(2).sum() / w.pow(2).sum().clamp_min(1e-30))
                if self.activations and not scheme.act.is_float:
                    num = sum(float((fake_quantize_activation(a, scheme.act) - a).pow(2).sum()) for a in inputs[n])
                    den = sum(float(a.pow(2).sum()) for a in inputs[n])
                    row["act_rel_error"] = num / max(den, 1e-30)
                row["raw_score"] = row["contribution"] * (row["weight_rel_error"] + row["act_rel_error"])
            rows.append(row)
        stats = pd.DataFrame({"layer": names, "contribution": [contrib[n] / total for n in names]})
        cost = {"forward_passes": len(batches), "backward_passes": len(batches), "seconds": time.perf_counter() - t0}
        return SensitivityResult(self.name, pd.DataFrame(rows), stats, cost)

