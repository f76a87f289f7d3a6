"""Built-in evaluators: causal-LM perplexity on a token stream, and classification accuracy / NLL / KL to float.

Each ``*_eval`` function returns an ``eval_fn(model) -> float`` for :func:`mpq.search`; the plain functions return
every number at once for reports and benchmarks. Models may return a tensor of logits or a Hugging Face output
(``.logits``); inputs are tensors or dicts of keyword tensors.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpq.calib import model_output
from mpq.errors import CalibrationError
from mpq.layers import call_model

EVALUATORS = ("perplexity", "accuracy", "nll", "kl")


def token_windows(tokens: Tensor, seq_len: int, batch_size: int) -> list[Tensor]:
    """Non-overlapping windows of ``seq_len + 1`` tokens (input and shifted target), in batches."""
    tokens = torch.as_tensor(tokens).reshape(-1)
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise CalibrationError(f"token stream of {tokens.numel()} tokens is shorter than one window of "
                               f"{seq_len + 1}: give more text or a smaller seq_len")
    windows = torch.stack([tokens[i * seq_len: i * seq_len + seq_len + 1] for i in range(n)])
    return [windows[i: i + batch_size] for i in range(0, n, batch_size)]


def lm_batches(tokens: Tensor, seq_len: int, batch_size: int) -> list[tuple[Tensor, Tensor]]:
    """``(input_ids, next_ids)`` batches of a token stream, for calibration or evaluation."""
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in token_windows(tokens, seq_len, batch_size)]


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[tuple[Any, Tensor]]) -> float:
    """``exp`` of the mean next-token cross-entropy over every target token of ``(inputs, targets)`` batches."""
    total, count = 0.0, 0
    for inputs, targets in batches:
        logits = model_output(call_model(model, inputs)).float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return math.exp(total / count)


def perplexity_eval(batches: Sequence[tuple[Any, Tensor]]) -> Callable[[nn.Module], float]:
    return lambda model: perplexity(model, batches)


@torch.no_grad()
def classification_metrics(model: nn.Module, batches: Sequence[tuple[Any, Tensor]],
                           reference: nn.Module | None = None) -> dict[str, float]:
    """Top-1 accuracy, mean NLL of the labels, and (with a float ``reference`` model) the mean KL divergence of the
    model's predictive distribution from the reference's, ``KL(p_ref || p_model)`` per example."""
    correct = n = 0
    nll = kl = 0.0
    for inputs, labels in batches:
        logits = model_output(call_model(model, inputs)).float()
        logp = F.log_softmax(logits, dim=-1)
        correct += int((logits.argmax(-1) == labels).sum())
        nll += float(F.nll_loss(logp, labels, reduction="sum"))
        if reference is not None:
            ref = F.log_softmax(model_output(call_model(reference, inputs)).float(), dim=-1)
            kl += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
        n += labels.numel()
    out = {"accuracy": correct / n, "nll": nll / n}
    if reference is not None:
        out["kl"] = kl / n
    return out


def classification_eval(batches: Sequence[tuple[Any, Tensor]], metric: str = "accuracy",
                        reference: nn.Module | None = None) -> Callable[[nn.Module], float]:
    """``eval_fn`` for one of ``accuracy``, ``nll`` or ``kl`` (which needs the float ``reference``)."""
    if metric not in ("accuracy", "nll", "kl"):
        raise CalibrationError(f"classification metric {metric!r} not known: use accuracy, nll or kl")
    if metric == "kl" and reference is None:
        raise CalibrationError("metric 'kl' compares with the float model: pass reference=<float model>")
    return lambda model: classification_metrics(model, batches, reference if metric == "kl" else None)[metric]


def higher_is_better(metric: str) -> bool:
    return metric == "accuracy"
