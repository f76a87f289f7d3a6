"""Diagonal empirical Fisher sensitivity: the second-order loss increase of each option, with the Fisher in place
of the Hessian (close to it at a trained minimum) and only its diagonal kept, in one of two places.

``where="output"`` (the default): at the layer's output ``y``,

    score = 1/2 * E_samples sum_e (dl/dy_e)^2 * (y_q - y)_e^2,

where ``y_q`` is the option's fake-quant layer (the real quantizer's rounded weights and the kernel's input
quantization) on the calibration inputs. The output error keeps the correlations between a row's rounding errors
(what ``||dW||^2`` forgets: ``dW X`` depends on the inputs), and the per-sample gradient says which outputs the loss
feels. A sample's outputs reach only its own loss, so ``B * dL_batch/dy`` is that sample's gradient: one ordinary
backward per batch.

``where="weight"``: ``1/2 * sum_ij F_ij (Q_b(W) - W)_ij^2`` plus the analogous input term for integer activations.
A micro-batch gradient of ``m`` samples is their mean, so ``m * g_mb^2`` has expectation ``F + (m - 1) *
mean_grad^2``; at a trained minimum the mean gradient is small, and micro-batches of a few samples keep the backward
count low.

Why not the Hessian trace (``hessian``): the trace averages curvature over the whole layer, so two options with the
same ``||dW||^2`` score the same even when one puts its error where it matters; and Hutchinson's probes need double
backprop until the traces converge (179 s on char-lm against fisher's 14 s, which ranks measured damage better:
BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import time

import pandas as pd
import torch
from torch import Tensor, nn

from mpq.calib import CalibrationSet, LossFn, default_loss
from mpq.config import FLOAT
from mpq.fakequant import FakeQuantLayer
from mpq.kernel_registry import scheme_for
from mpq.layers import LayerInventory, call_model, is_hf_conv1d, modules_by_name, weight_matrix
from mpq.numerics import ActQuantSpec, fake_quantize_activation
from mpq.sensitivity.base import SensitivityEstimator, SensitivityResult, register_estimator
from mpq.space import SearchSpace

log = logging.getLogger(__name__)
WHERE = ("output", "weight")


def _split(inputs, targets, size: int) -> list[tuple[object, Tensor]]:
    """``(inputs, targets)`` in micro-batches of ``size`` samples (tensors split on their first dim)."""
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor) or size >= inputs.shape[0]:
        return [(inputs, targets)]
    return list(zip(inputs.split(size), targets.split(size)))


def fisher_diagonals(model: nn.Module, calib: CalibrationSet, names: list[str], loss_fn: LossFn = default_loss,
                     micro_batch: int = 4, max_backward: int = 64,
                     act_specs: dict[str, list[ActQuantSpec]] | None = None
                     ) -> tuple[dict[str, Tensor], dict[tuple[str, ActQuantSpec], float], int, int]:
    """Per named layer, the diagonal empirical Fisher of its weight (output channels first, like
    :func:`~mpq.layers.weight_matrix`); per (layer, activation spec), ``1/2 E sum (dl/da)^2 (Q(a) - a)^2``.

    Returns ``(fisher, act_terms, backward passes, samples)``; stops after ``max_backward`` micro-batches.
    """
    act_specs = act_specs or {}
    modules = modules_by_name(model, names)
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    fisher = {n: torch.zeros_like(modules[n].weight, dtype=torch.float32) for n in names}
    act_sums: dict[tuple[str, ActQuantSpec], float] = {}
    inputs_seen: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def pre_hook(name):
        def fn(mod, args):
            # a zero perturbation on the input: its gradient is dL/da (embeddings take ids: nothing to perturb)
            if not args[0].is_floating_point():
                return None
            d = torch.zeros_like(args[0], requires_grad=True)
            inputs_seen.setdefault(name, []).append((args[0].detach(), d))
            return (args[0] + d,) + tuple(args[1:])
        return fn

    handles = [modules[n].register_forward_pre_hook(pre_hook(n)) for n in act_specs]
    backward = samples = 0
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for n in names:
            modules[n].weight.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            for inputs, targets in calib.batches:
                for x, y in _split(inputs, targets, micro_batch):
                    if backward >= max_backward:
                        break
                    inputs_seen.clear()
                    m = int(y.shape[0]) if isinstance(y, Tensor) and y.dim() else 1
                    loss = loss_fn(call_model(model, x), y)
                    grads = torch.autograd.grad(
                        loss, [modules[n].weight for n in names] + [d for v in inputs_seen.values() for _, d in v],
                        allow_unused=True)
                    for n, g in zip(names, grads[: len(names)]):
                        if g is not None:
                            fisher[n] += m * g.detach().float().pow(2)
                    rest = list(grads[len(names):])
                    for n, seen in inputs_seen.items():
                        for a, _ in seen:
                            g = rest.pop(0)
                            if g is None:
                                continue
                            # m * dL_mb/da is each sample's own gradient: summed over elements and samples here
                            g2 = (m * g.detach().float()).pow(2)
                            for spec in act_specs[n]:
                                err = (fake_quantize_activation(a.float(), spec) - a.float()).pow(2)
                                act_sums[(n, spec)] = act_sums.get((n, spec), 0.0) + float((g2 * err).sum())
                    backward += 1
                    samples += m
    finally:
        _restore(model, was_training, handles, saved)
    out = {}
    for n in names:
        f = fisher[n] / max(backward, 1)
        out[n] = f.t() if is_hf_conv1d(modules[n]) else f
    act_terms = {k: 0.5 * v / max(samples, 1) for k, v in act_sums.items()}
    return out, act_terms, backward, samples


def output_fisher_terms(model: nn.Module, calib: CalibrationSet, names: list[str], fakes, loss_fn: LossFn,
                        max_batches: int | None = None) -> tuple[dict[tuple[str, str], float], int, int]:
    """Per (layer, option): ``1/2 E_samples sum_e (dl/dy_e)^2 (y_q - y)_e^2`` over the layer's outputs ``y``, where
    ``y_q`` is the option's fake-quant layer (its weights *and* activations as the kernel computes them) on the same
    input. ``fakes`` maps each layer to ``{option: module}``. One backward per batch: a sample's outputs reach only
    its own loss, so ``B * dL/dy`` is each sample's gradient.

    Returns ``(terms, backward passes, samples)``."""
    modules = modules_by_name(model, names)
    seen: dict[str, list[list]] = {n: [] for n in names}

    def hook(name):
        def fn(mod, args, out):
            d = torch.zeros_like(out, requires_grad=True)  # its gradient is dL/dy
            seen[name].append([args[0].detach(), out.detach(), d])
            return out + d
        return fn

    sums: dict[tuple[str, str], float] = {}
    backward = samples = 0
    saved = {p: p.requires_grad for p in model.parameters()}
    was_training = model.training
    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        for inputs, targets in calib.batches[:max_batches]:
            for v in seen.values():
                v.clear()
            with torch.enable_grad():
                loss = loss_fn(call_model(model, inputs), targets)
                ds = [rec[2] for v in seen.values() for rec in v]
                grads = torch.autograd.grad(loss, ds, allow_unused=True)
            grad_of = {id(d): g for d, g in zip(ds, grads)}
            m = int(targets.shape[0]) if isinstance(targets, Tensor) and targets.dim() else 1
            with torch.no_grad():
                for n in names:
                    for x, y, d in seen[n]:
                        g = grad_of.get(id(d))
                        if g is None:
                            continue
                        w = (m * g.float()).pow(2)
                        for opt, fq in fakes[n].items():
                            sums[(n, opt)] = sums.get((n, opt), 0.0) + float((w * (fq(x).float() - y.float()).pow(2))
                                                                             .sum())
            backward += 1
            samples += m
    finally:
        _restore(model, was_training, handles, saved)
    return {k: 0.5 * v / max(samples, 1) for k, v in sums.items()}, backward, samples


@register_estimator
class FisherEstimator(SensitivityEstimator):
    """Diagonal empirical Fisher times each option's real rounding error (see the module docstring)."""

    name = "fisher"

    def __init__(self, where: str = "output", micro_batch: int = 4, max_backward: int = 64,
                 activations: bool = True):
        if where not in WHERE:
            raise ValueError(f"where={where!r} not supported: use 'output' (the layer's output error, weighted by "
                             f"its per-sample squared gradient) or 'weight' (the weights' diagonal Fisher)")
        if not isinstance(micro_batch, int) or micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch!r} must be a whole number >= 1")
        if not isinstance(max_backward, int) or max_backward < 1:
            raise ValueError(f"max_backward={max_backward!r} must be a whole number >= 1")
        self.where, self.micro_batch, self.max_backward, self.activations = where, micro_batch, max_backward, \
            activations

    def estimate(self, model: nn.Module, calib: CalibrationSet, space: SearchSpace, inventory: LayerInventory,
                 loss_fn: LossFn | None = None, progress: bool = True) -> SensitivityResult:
        t0 = time.perf_counter()
        if loss_fn is None:  # the float model's own predictions as labels, as the measured damage uses
            calib = calib.with_pseudo_labels(model)
            loss_fn = default_loss
        names = [n for n in space.layers if any(b != FLOAT for b in space[n])]
        schemes = {(n, b): scheme_for(inventory[n], b, space.device) for n in names for b in space[n] if b != FLOAT}
        modules = modules_by_name(model, names)
        if self.where == "output":
            fakes = {n: {} for n in names}
            for (n, bits), sch in schemes.items():
                fakes[n][bits.name] = FakeQuantLayer(modules[n], sch, n, space.quantizer)
            terms, backward, samples = output_fisher_terms(model, calib, names, fakes, loss_fn, self.max_backward)
            rows = [{"layer": n, "option": bits.name, "raw_score": terms.get((n, bits.name), 0.0)}
                    for n, bits in space.pairs()]
            stats = pd.DataFrame()
        else:
            rows, stats, backward, samples = self._weight_scores(model, calib, space, names, schemes, modules,
                                                                 loss_fn)
        seconds = time.perf_counter() - t0
        log.info("fisher (%s): %d backward passes (%d samples) over %d layers in %.1fs", self.where, backward,
                 samples, len(names), seconds)
        cost = {"forward_passes": backward, "backward_passes": backward, "samples": samples, "seconds": seconds,
                "where": self.where}
        return SensitivityResult(self.name, pd.DataFrame(rows), stats, cost)

    def _weight_scores(self, model, calib, space, names, schemes, modules, loss_fn):
        act_specs: dict[str, list[ActQuantSpec]] = {}
        for (n, _), sch in schemes.items():
            if self.activations and not sch.act.is_float and sch.act not in act_specs.setdefault(n, []):
                act_specs[n].append(sch.act)
        act_specs = {n: v for n, v in act_specs.items() if v}
        fisher, act_terms, backward, samples = fisher_diagonals(model, calib, names, loss_fn, self.micro_batch,
                                                                self.max_backward, act_specs)
        rows = []
        for n, bits in space.pairs():
            row = {"layer": n, "option": bits.name, "raw_score": 0.0, "weight_term": 0.0, "act_term": 0.0}
            if bits != FLOAT:
                sch = schemes[(n, bits)]
                if sch.weight is not None:
                    w = weight_matrix(modules[n]).detach()
                    dw = (space.quantizer.fake(n, w, sch.weight) - w).float()
                    row["weight_term"] = 0.5 * float((fisher[n] * dw.pow(2)).sum())
                row["act_term"] = act_terms.get((n, sch.act), 0.0)
                row["raw_score"] = row["weight_term"] + row["act_term"]
            rows.append(row)
        stats = pd.DataFrame([{"layer": n, "fisher_sum": float(fisher[n].sum()),
                               "fisher_mean": float(fisher[n].mean())} for n in names])
        return rows, stats, backward, samples


def _restore(model, was_training: bool, handles, saved) -> None:
    """Undo what a gradient pass set up: its hooks, the parameters' requires_grad flags, the train/eval mode."""
    for h in handles:
        h.remove()
    for p, flag in saved.items():
        p.requires_grad_(flag)
    model.train(was_training)
