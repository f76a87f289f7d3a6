"""Calibration data: a list of ``(inputs, targets)`` batches, checked against the model once.

Accepted forms: a tensor (one batch of inputs), a list of tensors, a list of ``(inputs, targets)`` pairs, a dict of
keyword inputs, or any iterable of those (a ``DataLoader``). A 2-tuple batch is read as ``(inputs, targets)``.
Without targets, the loss uses the float model's own predictions as labels (as data-free HAWQ/ZeroQ do).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mpq.errors import CalibrationError
from mpq.layers import call_model, describe_input, first_tensor

LossFn = Callable[[Any, Any], Tensor]


def model_output(out: Any) -> Tensor:
    """The main tensor of a model's output (``.logits`` or the first element of a tuple)."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    raise CalibrationError(f"cannot find a tensor in the model output of type {type(out).__name__}")


def default_loss(output: Any, target: Tensor) -> Tensor:
    """Cross-entropy over the last dim (any leading dims), or MSE for float targets shaped like the output."""
    out = model_output(output)
    if target.is_floating_point() and target.shape == out.shape:
        return F.mse_loss(out, target)
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), target.reshape(-1))


@dataclass
class CalibrationSet:
    batches: list[tuple[Any, Any]]

    @property
    def example(self) -> Any:
        return self.batches[0][0]

    @property
    def batch_size(self) -> int:
        return int(first_tensor(self.example).shape[0])

    def __len__(self) -> int:
        return len(self.batches)

    def inputs(self) -> list[Any]:
        return [x for x, _ in self.batches]

    @classmethod
    def from_any(cls, data: Any, max_batches: int | None = None) -> CalibrationSet:
        if data is None:
            raise CalibrationError("no calibration data: give a tensor, a list of (inputs, targets) batches, "
                                   "or a DataLoader")
        if isinstance(data, CalibrationSet):
            return data
        if isinstance(data, (Tensor, dict)):
            items: Iterable = [data]
        elif isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
            items = [data]  # one (inputs, targets) batch
        else:
            items = data
        batches = []
        for b in itertools.islice(items, max_batches):
            if isinstance(b, (tuple, list)) and len(b) == 2:
                batches.append((b[0], b[1]))
            elif isinstance(b, (tuple, list)) and len(b) == 1:
                batches.append((b[0], None))
            else:
                batches.append((b, None))
        if not batches:
            raise CalibrationError("calibration data is empty: give at least one batch")
        first = first_tensor(batches[0][0])
        if first.dim() == 0:
            raise CalibrationError(f"calibration batch 0 is a 0-d tensor ({first.dtype}): inputs need a batch "
                                   f"dimension first")
        for i, (x, _) in enumerate(batches[1:], start=1):
            t = first_tensor(x)
            if t.shape[1:] != first.shape[1:] or t.dtype != first.dtype:
                raise CalibrationError(
                    f"calibration batch {i} is {describe_input(x)} but batch 0 is {describe_input(batches[0][0])}: "
                    f"every batch must have the same shape after the batch dimension and the same dtype")
        return cls(batches)

    def check(self, model: nn.Module) -> Any:
        """Check every batch (non-empty, finite inputs), run batch 0 through ``model`` and check the targets
        against its output; a mismatch raises a :class:`CalibrationError` that names the layer it failed in, the
        shapes, and what is allowed. Returns the output of batch 0."""
        from mpq.checks import check_batches, run_model_checked

        check_batches(self.batches)
        with torch.no_grad():
            out = run_model_checked(model, self.example, "calibration batch 0")
        check_batches(self.batches, model_output(out))
        return out

    def with_pseudo_labels(self, model: nn.Module) -> CalibrationSet:
        """Fill missing targets with the float model's argmax predictions."""
        if all(t is not None for _, t in self.batches):
            return self
        out = []
        with torch.no_grad():
            for x, t in self.batches:
                if t is None:
                    t = model_output(call_model(model, x)).argmax(-1)
                out.append((x, t))
        return CalibrationSet(out)
