"""Serving formats: write a searched config as a checkpoint that vLLM / llm-compressor or llama.cpp load as it is.

    import mpq
    report = mpq.export(model, result.config, format="compressed-tensors", out="served/ct", tokenizer=tok)
    report = mpq.export(model, result.config, format="gguf", out="served/gguf", tokenizer=tok)

Both formats hold mpq's own integers (the search's quantizer, the device's numerics), and both write a report
(``export.md``, ``export.json``) that says per layer what was written, its bytes and the bytes mpq predicted.
What a format cannot express is refused by name before anything is written (compressed-tensors), or mapped to the
nearest type with the difference in the report (GGUF). ``mpq export RUN --format ... --out DIR`` does the same for
a run directory of ``mpq search`` (see :mod:`mpq.export.cli`).

``import mpq`` does not import this package; ``mpq.export`` is resolved on first use.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any, Mapping

FORMATS = ("compressed-tensors", "gguf")
GGUF_PREFERENCES = ("size", "exact")  # see mpq.export.gguf_file.choose_type
GGUF_FLOAT_TYPES = ("F32", "F16")


def export(model, config, format: str = "compressed-tensors", out: str | Path = "export", device: Any = "cpu",
           tokenizer: Any = None, quantizer: Any = None, calib_data: Any = None,
           gguf_prefer: str = "size", gguf_types: Mapping[str, str] | None = None, gguf_float: str = "F32",
           name: str | None = None):
    """Write ``model`` quantized as ``config`` says, in a serving ``format``, into the directory ``out``.

    ``device`` gives the numerics of the options: the device the config was searched for (its kernels, also
    where they cannot run here), ``None``/a :class:`~mpq.numerics.GenericNumerics`, or a function
    ``(LayerInfo, LayerBits) -> QuantScheme``. ``quantizer`` (default: the one the config records) chooses the
    integers; GPTQ needs ``calib_data``. ``tokenizer`` (an object or a directory) goes into the checkpoint; GGUF
    needs one. GGUF options: ``gguf_prefer`` ``"size"`` (types of the option's bit width) or ``"exact"`` (the
    smallest types that hold mpq's values exactly), ``gguf_types`` per-layer overrides (``{"lm_head": "Q6_K"}``),
    ``gguf_float`` the type of float matrices (``F32``, ``F16``). Returns the
    :class:`~mpq.export.report.ExportReport` (also written as ``export.md``/``export.json``).
    """
    from mpq.config import BitConfig
    from mpq.errors import ConfigError
    from mpq.export.plan import build_plan

    if format not in FORMATS:
        raise ConfigError(f"export format {format!r} not known: use one of {', '.join(FORMATS)}")
    if not isinstance(config, BitConfig):
        config = BitConfig.load(config)
    plan = build_plan(model, config, device, quantizer=quantizer, calib_data=calib_data)
    if format == "compressed-tensors":
        from mpq.export import compressed_tensors

        return compressed_tensors.write(plan, out, tokenizer=tokenizer)
    from mpq.export import gguf_file

    return gguf_file.write(plan, out, tokenizer=tokenizer, prefer=gguf_prefer, types=gguf_types,
                           float_type=gguf_float, name=name)


class _CallableModule(types.ModuleType):
    """Importing ``mpq.export.cli`` binds the package ``mpq.export`` on ``mpq``, over the lazy function of the same
    name; calling the package calls :func:`export`, so ``mpq.export(...)`` works either way."""

    def __call__(self, *args: Any, **kwargs: Any):
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["export", "FORMATS", "GGUF_PREFERENCES", "GGUF_FLOAT_TYPES"]
