"""Input checks that run before anything expensive, each naming the layer, the value and what is allowed.

- :func:`check_weights`: NaN/Inf in any parameter or buffer, named by the module that holds it.
- :func:`run_model_checked`: a forward pass whose failure names the module it failed in (the innermost one running
  when PyTorch raised), with that module's input and what it expects, not just the model's first layer.
- :func:`check_batches`: empty tensors, NaN/Inf in float inputs, and targets that the loss cannot take (ids out of
  the output's range, wrong dtype, a count that does not match the output's rows).
- :func:`check_allowed`: ``allowed`` options that no kernel of the device runs for any layer of the model.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from mpq.errors import CalibrationError, ConfigError, ModelError
from mpq.layers import call_model, describe_input


def check_weights(model: nn.Module) -> None:
    """Raise :class:`ModelError` for the first parameter or buffer holding NaN or Inf, naming its module."""
    for kind, named in (("parameter", model.named_parameters()), ("buffer", model.named_buffers())):
        for name, t in named:
            if not t.is_floating_point() or t.device.type == "meta" or t.numel() == 0:
                continue
            finite = torch.isfinite(t.detach())
            if not bool(finite.all()):
                module, _, attr = name.rpartition(".")
                bad = int((~finite).sum())
                first = tuple(int(i) for i in (~finite).nonzero()[0])
                raise ModelError(f"layer {module or '<root>'!r}: {kind} {attr!r} {tuple(t.shape)} holds {bad} NaN/Inf "
                                 f"value{'s' if bad > 1 else ''} (first at index {first}: "
                                 f"{float(t.detach()[first])}); mpq needs finite weights: fix or reload the "
                                 f"checkpoint")


def _expects(name: str, m: nn.Module) -> str:
    if isinstance(m, nn.Embedding):
        return f"integer ids in [0, {m.num_embeddings})"
    if isinstance(m, nn.Linear):
        return f"a last dimension of {m.in_features} ({m.weight.dtype})"
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        dims = "[batch, channels, length]" if isinstance(m, nn.Conv1d) else "[batch, channels, height, width]"
        return f"{dims} with {m.in_channels} channels ({m.weight.dtype})"
    if isinstance(m, nn.LayerNorm):
        return f"trailing dimensions {tuple(m.normalized_shape)}"
    weight = getattr(m, "weight", None)
    return f"inputs matching its weight {tuple(weight.shape)} ({weight.dtype})" if isinstance(weight, Tensor) \
        else "inputs it can take"


def run_model_checked(model: nn.Module, inputs: Any, what: str = "calibration batch 0") -> Any:
    """Run the model; a failure is a :class:`CalibrationError` naming the module PyTorch failed in, its input and
    what it expects."""
    stack: list[tuple[str, nn.Module, Any]] = []
    failed: list[tuple[str, nn.Module, Any]] = []

    def pre(name):
        def hook(mod, args):
            stack.append((name, mod, args))
        return hook

    def post(mod, args, out):
        if stack:
            stack.pop()

    handles = []
    for name, m in model.named_modules():
        if name:
            handles += [m.register_forward_pre_hook(pre(name)), m.register_forward_hook(post)]
    try:
        return call_model(model, inputs)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        failed = list(stack)
        raise CalibrationError(_mismatch(model, inputs, what, failed, e)) from e
    finally:
        for h in handles:
            h.remove()


def _mismatch(model: nn.Module, inputs: Any, what: str, failed: list, error: Exception) -> str:
    said = str(error).splitlines()[0] if str(error) else type(error).__name__
    head = f"{what} ({describe_input(inputs)}) does not fit the model"
    if not failed:
        return f"{head}: the model's own forward raised before any submodule ran. PyTorch said: {said}"
    name, module, args = failed[-1]
    got = describe_input(args[0]) if args else "no positional input"
    return (f"{head}: layer {name!r} ({type(module).__name__}) got {got} but expects {_expects(name, module)}. "
            f"PyTorch said: {said}")


def check_batches(batches: Iterable[tuple[Any, Any]], output: Tensor | None = None) -> None:
    """Each batch non-empty, its float inputs finite; each target usable with ``output`` (the main tensor of the
    model's output on batch 0): class ids within its last dimension, as many as its rows, or floats shaped like
    it."""
    for i, (x, y) in enumerate(batches):
        for label, t in _tensors(x):
            where = f"calibration batch {i}" + (f" input {label!r}" if label else "")
            if t.numel() == 0:
                raise CalibrationError(f"{where} is empty (shape {tuple(t.shape)}): every batch needs at least one "
                                       f"sample")
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad = int((~torch.isfinite(t)).sum())
                raise CalibrationError(f"{where} {tuple(t.shape)} holds {bad} NaN/Inf values: calibration inputs "
                                       f"must be finite")
        if y is not None and output is not None:
            _check_target(i, y, output)


def _tensors(x: Any) -> list[tuple[str, Tensor]]:
    if isinstance(x, Tensor):
        return [("", x)]
    if isinstance(x, dict):
        return [(str(k), v) for k, v in x.items() if isinstance(v, Tensor)]
    if isinstance(x, (list, tuple)):
        return [(str(j), v) for j, v in enumerate(x) if isinstance(v, Tensor)]
    return []


def _check_target(i: int, y: Any, out: Tensor) -> None:
    where = f"calibration batch {i}: targets"
    if not isinstance(y, Tensor):
        raise CalibrationError(f"{where} are a {type(y).__name__}; give a tensor of class ids (or None to use the "
                               f"float model's own predictions)")
    if y.is_floating_point():
        if tuple(y.shape) != tuple(out.shape):
            raise CalibrationError(f"{where} are floats of shape {tuple(y.shape)}: float targets (regression, MSE) "
                                   f"must be shaped like the output {tuple(out.shape)}; class targets must be "
                                   f"integers")
        if not bool(torch.isfinite(y).all()):
            raise CalibrationError(f"{where} hold NaN/Inf values")
        return
    if y.dtype == torch.bool or y.is_complex():
        raise CalibrationError(f"{where} have dtype {y.dtype}: give integer class ids (torch.long)")
    classes = int(out.shape[-1])
    rows = out.numel() // max(classes, 1)
    if y.numel() != rows and i == 0:
        raise CalibrationError(f"{where} hold {y.numel()} ids (shape {tuple(y.shape)}) but the output "
                               f"{tuple(out.shape)} has {rows} rows of {classes} classes: one id per row")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= classes):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise CalibrationError(f"{where} hold class id {bad}, outside [0, {classes}) (the output's last dimension "
                               f"has {classes} classes)")


def check_allowed(inventory, device: str, allowed: Iterable[str] | None) -> None:
    """Every option in ``allowed`` must be run by some kernel of ``device`` for some layer of the model."""
    if allowed is None:
        return
    from mpq.config import LayerBits
    from mpq.kernel_registry import allowed_text, layer_options, normalize_device

    offered: set = set()
    for layer in inventory:
        offered |= set(layer_options(layer, device))
    missing = [b for b in allowed if LayerBits.parse(b) not in offered and LayerBits.parse(b).name != "float"]
    if missing:
        # an option spelled without its scheme (w3a16) next to the ones offered with it (w3a16sym, w3a16g128asym)
        near = sorted({b.name for m in missing for b in offered if b.name.startswith(m) and b.name != m})
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise ConfigError(f"allowed option{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}: no "
                          f"{normalize_device(device)} kernel runs {'them' if len(missing) > 1 else 'it'} for any "
                          f"layer of this model{hint}; the options there are: {allowed_text(offered)}")


__all__ = ["check_weights", "run_model_checked", "check_batches", "check_allowed"]
