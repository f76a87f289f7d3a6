"""``apply``: swap a model's layers for modules running the device's real kernels, as a bit config says; and
``load_quantized``, which rebuilds a saved quantized model. These change the model they are given (``search`` and
``study`` never do); ``load_quantized`` changes it only once everything it needs has loaded.
"""

from __future__ import annotations

import copy
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from mpq.calib import CalibrationSet
from mpq.config import BitConfig, QuantizerSpec
from mpq.errors import ConfigError
from mpq.kernel_registry import kernel_for, normalize_device, torch_device
from mpq.layers import LayerInventory, discover_layers, set_submodule
from mpq.quantizers import Quantizer, get_quantizer
from mpq.space import validate_config

log = logging.getLogger(__name__)


@contextmanager
def eval_mode(model: nn.Module):
    """Evaluation mode for the duration of a search; the caller's mode comes back after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def apply(model: nn.Module, bit_config: BitConfig | str | Path, device: str = "cpu",
          inventory: LayerInventory | None = None, quantizer: str | Quantizer | None = None,
          calib_data: Any = None) -> nn.Module:
    """Swap every quantized layer of ``bit_config`` for its kernel's module on ``device``; float layers stay.

    Changes ``model`` in place and returns it. The config is validated first: a missing layer or bits that no kernel
    of ``device`` runs raise a :class:`~mpq.errors.ConfigError` naming the layer and the allowed options.
    ``quantizer`` chooses the integers (``"minmax"``, ``"mse"``, ``"gptq"`` or an instance); by default the one the
    config records (:attr:`BitConfig.quantizer`). GPTQ needs ``calib_data`` (unless given an already prepared
    instance), whose inputs reach every layer before any layer is swapped.
    """
    config = bit_config if isinstance(bit_config, BitConfig) else BitConfig.load(bit_config)
    dev = normalize_device(device)
    inv = inventory or discover_layers(model)
    validate_config(config, model, dev, inventory=inv)
    quant = prepared_quantizer(quantizer if quantizer is not None else config.quantizer, model, calib_data, inv)
    for name, bits in config.quantized().items():
        layer = inv[name]
        quantized = kernel_for(layer, bits, dev).quantize_module(model.get_submodule(name), layer, bits, quant)
        set_submodule(model, name, quantized.to(torch_device(device)))
    model.eval()
    return model


def prepared_quantizer(spec: str | Mapping[str, Any] | QuantizerSpec | Quantizer | None, model: nn.Module,
                       calib_data: Any, inventory: LayerInventory) -> Quantizer:
    """The quantizer named by ``spec`` (a name, recorded settings ``{"name": ..., **options}``, a
    :class:`QuantizerSpec`, or an instance), prepared on ``calib_data`` when it needs calibration and has none yet."""
    if isinstance(spec, QuantizerSpec):
        quant = get_quantizer(spec.name, **dict(spec.options))
    elif isinstance(spec, Mapping):
        options = dict(spec)
        quant = get_quantizer(options.pop("name", None), **options)
    else:
        quant = get_quantizer(spec)
    if quant.needs_calibration and not quant.prepared:
        if calib_data is None:
            raise ConfigError(f"quantizer {quant.name!r} rounds with calibration inputs: pass calib_data (the "
                              f"search's calibration batches), or use quantizer='minmax' or 'mse'")
        with eval_mode(model):
            quant.prepare(model, CalibrationSet.from_any(calib_data).inputs(), inventory)
    return quant


def load_quantized(model: nn.Module, bit_config: BitConfig | str | Path, state_dict: str | Path | Mapping,
                   device: str = "cpu") -> nn.Module:
    """Rebuild a saved quantized model: apply the config to a fresh float model, then load the packed weights
    (a state dict of plain tensors, loaded with ``weights_only=True``).

    The config is applied to a copy first and the state loaded into that copy; only when both succeed are the
    quantized modules moved into ``model``, so a state dict that does not match leaves ``model`` as it was.
    """
    config = bit_config if isinstance(bit_config, BitConfig) else BitConfig.load(bit_config)
    state = _load_state(state_dict, device)
    work = apply(copy.deepcopy(model), config, device, quantizer="minmax")  # the loaded state replaces the integers
    try:
        work.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        first = str(e).strip().splitlines()
        raise ConfigError(f"the state dict does not match the model with this config applied ({len(config.quantized())}"
                          f" quantized layers): {' '.join(l.strip() for l in first[:3])[:600]}; the model was not "
                          f"changed") from None
    for name in config.quantized():
        set_submodule(model, name, work.get_submodule(name))
    model.load_state_dict(work.state_dict())
    model.eval()
    return model


def _load_state(state_dict: str | Path | Mapping, device: str) -> Mapping:
    if isinstance(state_dict, Mapping):
        return state_dict
    path = Path(state_dict)
    if not path.is_file():
        raise ConfigError(f"no saved state dict at {path}")
    try:
        state = torch.load(path, map_location=torch_device(device), weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError for files that are not plain-tensor dicts
        raise ConfigError(f"{path} is not a state dict of plain tensors that loads with weights_only=True "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}); mpq never "
                          f"unpickles arbitrary objects") from None
    if not isinstance(state, Mapping):
        raise ConfigError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


__all__ = ["apply", "load_quantized", "prepared_quantizer", "eval_mode"]
