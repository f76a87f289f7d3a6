"""HAWQ-V2/V3 Hessian-trace sensitivity.

For each layer, Hutchinson's estimator gives the trace of the loss Hessian with respect to the layer's weight,
``Tr(H_W) = E[v^T H_W v]`` for Rademacher ``v``, from Hessian-vector products (double backprop). One probe draws
``v`` over every layer's weight (and input activation) at once: the cross-layer terms of ``v^T H v`` have zero mean,
so each layer's estimate stays unbiased at one HVP per probe. Probes cycle through the calibration batches and stop
once every *score* below is known to within ``tol`` (its standard error, from the traces' standard errors, over the
score; scores under ``floor`` of the largest are held to that floor instead, so that negligible scores do not run
the probes to ``max_probes``). Scores, not traces, set the stopping point because a trace that multiplies a tiny
perturbation need not be known precisely.

The score of option ``b`` is the second-order estimate of the loss increase when the layer is quantized with it,

    score = 1/2 * Tr(H_W)/n_W * ||Q_b(W) - W||^2  +  1/2 * Tr(H_A)/n_A * E||Q_b(A) - A||^2,

where the activation term (HAWQ-V2) uses the Hessian with respect to the layer's input, measured by adding a zero
perturbation ``delta`` to the input and differentiating with respect to it. ``Q_b`` is the exact numerics of the
kernel that runs ``b`` on the target device. Negative trace estimates (non-convex regions) are clipped to zero.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import pandas as pd
import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from tqdm.auto import tqdm

from mpq.calib import CalibrationSet, LossFn, default_loss
from mpq.config import FLOAT, LayerBits
from mpq.layers import LayerInventory, call_model, modules_by_name, weight_matrix
from mpq.numerics import ActQuantSpec, fake_quantize_activation
from mpq.kernel_registry import scheme_for
from mpq.sensitivity.base import SensitivityEstimator, SensitivityResult, register_estimator
from mpq.space import SearchSpace

log = logging.getLogger(__name__)


@dataclass
class TraceEstimate:
    """Running Hutchinson estimate of one Hessian block's trace."""

    numel: int
    probes: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, value: float) -> None:
        self.probes += 1
        self.total += value
        self.total_sq += value * value

    @property
    def mean(self) -> float:
        return self.total / max(self.probes, 1)

    @property
    def stderr(self) -> float:
        if self.probes < 2:
            return math.inf
        var = max(self.total_sq / self.probes - self.mean**2, 0.0) * self.probes / (self.probes - 1)
        return math.sqrt(var / self.probes)


class _Generators:
    """One seeded generator per device, so probes are drawn where they are used (no host-to-device copies)."""

    def __init__(self, seed: int):
        self.seed, self.gens = seed, {}

    def __call__(self, device: torch.device) -> torch.Generator:
        if device not in self.gens:
            self.gens[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self.gens[device]


def _rademacher(shape, gens: _Generators, device: torch.device) -> Tensor:
    return torch.randint(0, 2, shape, generator=gens(device), device=device).float().mul_(2).sub_(1)


Estimates = dict[tuple[str, str], TraceEstimate]


class _HessianGraph:
    """Sets a model up for Hessian-vector products w.r.t. the named layers' weights (and, with ``activations``,
    their inputs, through a zero perturbation added by a pre-hook), and restores it on exit."""

    def __init__(self, model: nn.Module, names: list[str], activations: bool):
        self.model, self.names, self.activations = model, names, activations
        self.modules = modules_by_name(model, names)
        self.weights = [self.modules[n].weight for n in names]
        self.deltas: dict[str, list[Tensor]] = {}

    def __enter__(self) -> _HessianGraph:
        self.saved_grad = {p: p.requires_grad for p in self.model.parameters()}
        self.was_training = self.model.training
        for p in self.model.parameters():
            p.requires_grad_(False)
        for w in self.weights:
            w.requires_grad_(True)
        self.model.eval()

        def pre_hook(name):
            def fn(mod, args):
                if not args[0].is_floating_point():  # an embedding's ids: no activation to perturb
                    return None
                d = torch.zeros_like(args[0], requires_grad=True)
                self.deltas.setdefault(name, []).append(d)
                return (args[0] + d,) + tuple(args[1:])
            return fn

        self.handles = [self.modules[n].register_forward_pre_hook(pre_hook(n)) for n in self.names] \
            if self.activations else []
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        for p, flag in self.saved_grad.items():
            p.requires_grad_(flag)
        self.model.train(self.was_training)

    def gradients(self, inputs, targets, loss_fn: LossFn):
        """``(keys, variables, grads)`` with a graph for second derivatives; variables that carry no curvature
        (gradient constant in them) are dropped."""
        self.deltas.clear()
        # Fused attention kernels (flash, memory-efficient) have no second derivative; the math one does.
        with sdpa_kernel(SDPBackend.MATH):
            loss = loss_fn(call_model(self.model, inputs), targets)
        keys = [("w", n) for n in self.names]
        variables = list(self.weights)
        for n in self.names if self.activations else []:
            for d in self.deltas.get(n, []):
                keys.append(("a", n))
                variables.append(d)
        grads = torch.autograd.grad(loss, variables, create_graph=True, allow_unused=True)
        kept = [(k, v, g) for k, v, g in zip(keys, variables, grads) if g is not None and g.requires_grad]
        return [k for k, _, _ in kept], [v for _, v, _ in kept], [g for _, _, g in kept]


def hessian_vector_products(grads: list[Tensor], variables: list[Tensor], vectors: list[Tensor], batched: bool
                            ) -> list[Tensor]:
    """``H v`` for each variable; with ``batched`` every vector has a leading probe dimension and the products are
    computed in one vectorised backward pass (``is_grads_batched``)."""
    hvs = torch.autograd.grad(grads, variables, grad_outputs=vectors, retain_graph=True, allow_unused=True,
                              is_grads_batched=batched)
    return [torch.zeros_like(v) if hv is None else hv for v, hv in zip(vectors, hvs)]


def hutchinson_traces(model: nn.Module, calib: CalibrationSet, names: list[str], loss_fn: LossFn = default_loss,
                      activations: bool = True, min_probes: int = 16, max_probes: int = 256, tol: float = 0.05,
                      seed: int = 0, progress: bool = False, converged: Callable[[Estimates], bool] | None = None,
                      batch_probes: int = 1) -> Estimates:
    """Hessian traces of the loss w.r.t. each named layer's weight (``("w", name)``) and input (``("a", name)``).

    Each step takes the next calibration batch, builds the gradient graph once and applies ``batch_probes``
    Rademacher probes to it in one vectorised Hessian-vector product. Stops after ``min_probes`` once
    ``converged(estimates)`` holds (default: every trace's standard error is within ``tol`` of it, or of 1% of the
    largest trace), or at ``max_probes``. Probes of one step share its batch, so with ``batch_probes > 1`` the
    standard errors leave out part of the between-batch variance.
    """
    converged = converged or (lambda e: _converged(e, tol))
    batch_probes = max(1, int(batch_probes))
    est: Estimates = {}
    gens = _Generators(seed)
    bar = tqdm(total=max_probes, desc="hessian probes", disable=not progress, leave=False)
    done = 0
    try:
        with _HessianGraph(model, names, activations) as graph, torch.enable_grad():
            for n, w in zip(names, graph.weights):
                est[("w", n)] = TraceEstimate(w.numel())
            step = 0
            while done < max_probes:
                p = min(batch_probes, max_probes - done)
                inputs, targets = calib.batches[step % len(calib)]
                step += 1
                keys, variables, grads = graph.gradients(inputs, targets, loss_fn)
                shape = (lambda v: (p, *v.shape)) if p > 1 else (lambda v: v.shape)
                probes = [_rademacher(shape(v), gens, v.device) for v in variables]
                hvs = hessian_vector_products(grads, variables, probes, batched=p > 1)
                sums: dict[tuple[str, str], Tensor] = {}
                for key, var, z, hv in zip(keys, variables, probes, hvs):
                    per_probe = (z * hv).reshape(p, -1).sum(1) if p > 1 else (z * hv).sum().reshape(1)
                    sums[key] = sums[key] + per_probe if key in sums else per_probe
                    if key[0] == "a" and key not in est:
                        est[key] = TraceEstimate(var.numel())
                # one device-to-host copy per step, not one per probe and layer
                values = dict(zip(sums, torch.stack(list(sums.values())).cpu().tolist())) if sums else {}
                for i in range(p):
                    for key, e in est.items():
                        e.add(values[key][i] if key in values else 0.0)
                done += p
                bar.update(p)
                if done >= min_probes and converged(est):
                    break
    finally:
        bar.close()
    return est


def relative_change_rule(tol: float) -> Callable[[Estimates], bool]:
    """PyHessian's stopping rule: every running mean moved by less than ``tol`` of itself since the last check."""
    last: dict[tuple[str, str], float] = {}

    def check(est: Estimates) -> bool:
        ok = bool(last) and all(abs(e.mean - last.get(k, math.inf)) <= tol * max(abs(e.mean), 1e-30)
                                for k, e in est.items())
        last.update({k: e.mean for k, e in est.items()})
        return ok
    return check


def top_eigenvalues(model: nn.Module, calib: CalibrationSet, names: list[str], loss_fn: LossFn = default_loss,
                    iters: int = 20, tol: float = 1e-2, seed: int = 0) -> dict[str, float]:
    """HAWQ-V1: the largest eigenvalue of each layer's Hessian block, by power iteration on the first calibration
    batch. All layers iterate together: one vectorised product whose probe ``i`` is non-zero only in layer ``i``."""
    gens = _Generators(seed)
    inputs, targets = calib.batches[0]
    with _HessianGraph(model, names, activations=False) as graph, torch.enable_grad():
        keys, variables, grads = graph.gradients(inputs, targets, loss_fn)
        idx = {k[1]: i for i, k in enumerate(keys)}
        vecs = [torch.randn(v.shape, generator=gens(v.device), device=v.device) for v in variables]
        vecs = [v / v.norm() for v in vecs]
        eig = dict.fromkeys(names, 0.0)
        for _ in range(iters):
            batched = [torch.zeros((len(variables), *v.shape), device=v.device) for v in variables]
            for i, v in enumerate(vecs):
                batched[i][i] = v
            hvs = hessian_vector_products(grads, variables, batched, batched=True)
            new_vecs, moved = [], 0.0
            for i, v in enumerate(vecs):
                hv = hvs[i][i]
                lam = float((v * hv).sum())
                moved = max(moved, abs(lam - eig[keys[i][1]]) / max(abs(lam), 1e-30))
                eig[keys[i][1]] = lam
                norm = hv.norm()
                new_vecs.append(hv / norm if norm > 0 else v)
            vecs = new_vecs
            if moved < tol:
                break
    return {n: eig.get(n, 0.0) if n in idx else 0.0 for n in names}


def _converged(est: dict[tuple[str, str], TraceEstimate], tol: float) -> bool:
    largest = max(abs(e.mean) for e in est.values()) or 1.0
    return all(e.stderr <= tol * max(abs(e.mean), 0.01 * largest) for e in est.values())


@torch.no_grad()
def activation_numels(model: nn.Module, calib: CalibrationSet, names: list[str]) -> dict[str, int]:
    """Elements of each layer's input on one calibration batch (all calls summed), the ``n_A`` of its trace."""
    modules = modules_by_name(model, names)
    counts: dict[str, int] = dict.fromkeys(names, 0)
    handles = [modules[n].register_forward_pre_hook(
        lambda mod, args, n=n: counts.__setitem__(n, counts[n] + args[0].numel())) for n in names]
    try:
        call_model(model, calib.batches[0][0])
    finally:
        for h in handles:
            h.remove()
    return counts


@torch.no_grad()
def activation_errors(model: nn.Module, calib: CalibrationSet, specs: dict[str, list[ActQuantSpec]]
                      ) -> dict[tuple[str, ActQuantSpec], float]:
    """Mean over calibration batches of ``||Q(A) - A||^2`` of each layer's input, for each activation spec."""
    modules = modules_by_name(model, specs)
    sums: dict[tuple[str, ActQuantSpec], float] = {}

    def pre_hook(name):
        def fn(mod, args):
            x = args[0].float()
            for spec in specs[name]:
                diff = fake_quantize_activation(x, spec) - x
                sums[(name, spec)] = sums.get((name, spec), 0.0) + float((diff * diff).sum())
        return fn

    handles = [modules[n].register_forward_pre_hook(pre_hook(n)) for n in specs]
    try:
        for inputs in calib.inputs():
            call_model(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return {k: v / len(calib) for k, v in sums.items()}


@dataclass
class _ScoreTerms:
    """One (layer, option) score as ``w_coef * Tr(H_W) + a_coef * Tr(H_A)``."""

    layer: str
    w_coef: float  # 1/2 ||Q(W) - W||^2 / n_W
    a_coef: float  # 1/2 E||Q(A) - A||^2 / n_A
    weight_error: float
    act_error: float

    def score(self, est: Estimates) -> tuple[float, float, float]:
        """(score, weight term, activation term), negative traces clipped to zero."""
        w = self.w_coef * max(est[("w", self.layer)].mean, 0.0)
        a_est = est.get(("a", self.layer))
        a = self.a_coef * max(a_est.mean, 0.0) if a_est is not None else 0.0
        return w + a, w, a

    def stderr(self, est: Estimates) -> float:
        var = (self.w_coef * est[("w", self.layer)].stderr) ** 2
        a_est = est.get(("a", self.layer))
        if a_est is not None and self.a_coef:
            var += (self.a_coef * a_est.stderr) ** 2
        return math.sqrt(var)


def _scores_converged(terms: list[_ScoreTerms], tol: float, floor: float) -> Callable[[Estimates], bool]:
    def check(est: Estimates) -> bool:
        scores = [t.score(est)[0] for t in terms]
        top = max(scores, default=0.0)
        return all(t.stderr(est) <= tol * max(s, floor * top) for t, s in zip(terms, scores))
    return check


@register_estimator
class HessianTraceEstimator(SensitivityEstimator):
    """HAWQ-V2/V3: average Hessian trace times the quantization perturbation, per (layer, option)."""

    name = "hessian"

    def __init__(self, min_probes: int = 16, max_probes: int = 128, tol: float = 0.1, floor: float = 0.01,
                 activations: bool = True, seed: int = 0, batch_probes: int | None = None, stop: str = "stderr",
                 mode: str = "trace", eigen_iters: int = 20):
        if stop not in ("stderr", "change"):
            raise ValueError(f"stop rule {stop!r} not supported: use 'stderr' (scores known to tol) or 'change' "
                             f"(running means move by less than tol)")
        if mode not in ("trace", "eigen"):
            raise ValueError(f"mode {mode!r} not supported: use 'trace' (HAWQ-V2/V3) or 'eigen' (HAWQ-V1)")
        self.min_probes = min_probes
        self.max_probes = max_probes
        self.tol = tol
        self.floor = floor
        self.activations = activations and mode == "trace"
        self.seed = seed
        self.batch_probes = batch_probes  # None: 16 on a GPU (6x faster on an H100), 1 on CPU (no gain there)
        self.stop = stop
        self.mode = mode
        self.eigen_iters = eigen_iters

    def estimate(self, model: nn.Module, calib: CalibrationSet, space: SearchSpace, inventory: LayerInventory,
                 loss_fn: LossFn | None = None, progress: bool = True) -> SensitivityResult:
        t0 = time.perf_counter()
        if loss_fn is None:
            calib = calib.with_pseudo_labels(model)
            loss_fn = default_loss
        names = [n for n in space.layers if any(b != FLOAT for b in space[n])]
        schemes = {(n, b): scheme_for(inventory[n], b, space.device) for n in names for b in space[n] if b != FLOAT}

        # Perturbations first (cheap, no gradients): they weight each trace in the scores.
        act_specs: dict[str, list[ActQuantSpec]] = {}
        for (n, _), sch in schemes.items():
            if self.activations and not sch.act.is_float and sch.act not in act_specs.setdefault(n, []):
                act_specs[n].append(sch.act)
        act_err = activation_errors(model, calib, act_specs) if act_specs else {}
        act_numel = activation_numels(model, calib, names) if self.activations else {}
        modules = modules_by_name(model, names)
        terms: dict[tuple[str, LayerBits], _ScoreTerms] = {}
        for (n, bits), sch in schemes.items():
            w = weight_matrix(modules[n])
            w_err = space.quantizer.quantize(n, w, sch.weight).error(w) if sch.weight is not None else 0.0
            a_err = act_err.get((n, sch.act), 0.0)
            terms[(n, bits)] = _ScoreTerms(n, 0.5 * w_err / modules[n].weight.numel(),
                                           0.5 * a_err / act_numel[n] if a_err else 0.0, w_err, a_err)

        rule = _scores_converged(list(terms.values()), self.tol, self.floor) if self.stop == "stderr" \
            else relative_change_rule(self.tol)
        on_gpu = any(p.is_cuda for p in model.parameters())
        batch_probes = self.batch_probes or (16 if on_gpu else 1)
        if self.mode == "eigen":
            # HAWQ-V1: the top eigenvalue stands in for the average curvature: score = 1/2 lambda_max ||dW||^2.
            lams = top_eigenvalues(model, calib, names, loss_fn, self.eigen_iters, seed=self.seed)
            # an exact value, recorded as two equal samples: mean lambda, zero spread
            est = {("w", n): TraceEstimate(1, 2, 2 * lams[n], 2 * lams[n] ** 2) for n in names}
            for t in terms.values():
                t.w_coef *= modules[t.layer].weight.numel()
        else:
            est = hutchinson_traces(model, calib, names, loss_fn, self.activations, self.min_probes,
                                    self.max_probes, self.tol, self.seed, progress, converged=rule,
                                    batch_probes=batch_probes) if names else {}

        rows = []
        for n, bits in space.pairs():
            row = {"layer": n, "option": bits.name, "raw_score": 0.0, "raw_score_stderr": 0.0, "weight_term": 0.0,
                   "act_term": 0.0, "weight_error": 0.0, "act_error": 0.0}
            if bits != FLOAT:
                t = terms[(n, bits)]
                row["raw_score"], row["weight_term"], row["act_term"] = t.score(est)
                row.update(raw_score_stderr=t.stderr(est), weight_error=t.weight_error, act_error=t.act_error)
            rows.append(row)

        stats = []
        for n in names:
            w, a = est[("w", n)], est.get(("a", n))
            nan = float("nan")
            stats.append({"layer": n, "weight_trace": w.mean, "weight_trace_stderr": w.stderr, "weight_numel": w.numel,
                          "act_trace": a.mean if a else nan, "act_trace_stderr": a.stderr if a else nan,
                          "act_numel": a.numel if a else 0, "probes": w.probes, "avg_weight_trace": w.mean / w.numel})
        probes = max((e.probes for e in est.values()), default=0) if self.mode == "trace" else 0
        steps = math.ceil(probes / batch_probes) if self.mode == "trace" else self.eigen_iters
        # converged: the stopping rule ended the probes early, or the score rule holds at the end
        done = self.mode == "eigen" or probes < self.max_probes or (
            bool(est) and _scores_converged(list(terms.values()), self.tol, self.floor)(est))
        cost = {"forward_passes": steps + 2 * len(calib), "backward_passes": 2 * steps, "probes": probes,
                "batch_probes": batch_probes, "mode": self.mode, "stop": self.stop,
                "seconds": time.perf_counter() - t0, "converged": done}
        log.info("hessian: %d probes over %d layers in %.1fs (%s)", probes, len(names), cost["seconds"],
                 "converged" if done else f"stopped at max_probes={self.max_probes}")
        return SensitivityResult(self.name, pd.DataFrame(rows), pd.DataFrame(stats), cost)
