"""``mpq export RUN --format compressed-tensors|gguf --out DIR``: a run directory of ``mpq search`` as a serving
checkpoint, registered in ``mpq.cli``'s command registry: :func:`add_arguments` declares its flags, :func:`run`
runs it.

The run gives the config (``config.json``), the device whose numerics it was searched for and the quantizer
(``run.json``), and the model (``search_args.json`` of a command-line search: the ``--model`` spec, reloaded as
``mpq search`` loads it; or ``--model`` here). A Hugging Face model directory also gives the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from mpq.errors import ConfigError

log = logging.getLogger(__name__)

SEARCH_ARGS = "search_args.json"  # written by `mpq search` (mpq.cli) into its run directory


HELP = "write a run's config as a compressed-tensors (vLLM) or GGUF (llama.cpp) checkpoint"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``mpq export``."""
    from mpq.export import FORMATS, GGUF_FLOAT_TYPES, GGUF_PREFERENCES  # light: no torch until the command runs

    p.add_argument("run", help="run directory of mpq search (config.json, run.json)")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="directory to write the checkpoint and export.md into")
    p.add_argument("--model", default=None, help="the model (default: the run's own --model); a Hugging Face "
                                                 "directory, a bundled model or module:fn")
    p.add_argument("--eval", default=None, help="as mpq search: the metric of a Hugging Face directory")
    p.add_argument("--data", default=None, help="as mpq search: its data (needed for gptq's calibration)")
    p.add_argument("--device", default=None, help="whose numerics the config uses (default: the run's device)")
    p.add_argument("--quantizer", default=None, help="default: the one the run recorded in config.json")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model directory)")
    p.add_argument("--gguf-prefer", default="size", choices=GGUF_PREFERENCES,
                   help="size: types of each option's bit width; exact: the smallest types holding mpq's values")
    p.add_argument("--gguf-float", default="F32", choices=GGUF_FLOAT_TYPES, help="type of float matrices in GGUF")
    p.add_argument("--gguf-type", action="append", default=[], metavar="LAYER=TYPE",
                   help="GGUF type of one layer, e.g. lm_head=Q6_K (repeatable)")


def _run_settings(run_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    if not (run_dir / "config.json").exists():
        raise ConfigError(f"{run_dir} is not an mpq run directory: it has no config.json (a search over several "
                          f"devices keeps one run per device in a subdirectory)")
    run = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    args = json.loads((run_dir / SEARCH_ARGS).read_text()) if (run_dir / SEARCH_ARGS).exists() else {}
    return run, args


def _gguf_types(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        layer, sep, qtype = pair.partition("=")
        if not sep or not layer or not qtype:
            raise ConfigError(f"--gguf-type {pair!r}: expected LAYER=TYPE, e.g. lm_head=Q6_K")
        out[layer] = qtype.upper()
    return out


def load_model(spec: str, eval: str | None, data: str | None, needs_calibration: bool):
    """The model (and calibration batches when the quantizer needs them), loaded as ``mpq search`` loads it."""
    from mpq.hf import is_hf_dir, load_hf_model

    if is_hf_dir(spec) and not needs_calibration:
        return load_hf_model(spec), None
    from mpq.cli import load_task  # the face's loader: bundled models, Hugging Face directories, module:fn

    task = load_task(spec, eval, data)
    return task.model, task.calib


def run(args: argparse.Namespace) -> int:
    """Export the run ``args.run``; prints where it went and the written vs predicted size."""
    from mpq.config import BitConfig
    from mpq.export import export
    from mpq.quantizers import get_quantizer

    run_dir = Path(args.run)
    run_info, search_args = _run_settings(run_dir)
    config = BitConfig.load(run_dir / "config.json")
    spec = args.model or search_args.get("model")
    if not spec:
        raise ConfigError(f"{run_dir} does not say which model it searched (no {SEARCH_ARGS}): give --model")
    quantizer = args.quantizer or (config.quantizer.to_dict() if config.quantizer is not None else None)
    name = quantizer.get("name") if isinstance(quantizer, dict) else quantizer
    needs_calibration = get_quantizer(name).needs_calibration if name else False
    model, calib = load_model(spec, args.eval or search_args.get("eval"), args.data or search_args.get("data"),
                              needs_calibration)
    device = args.device or run_info.get("device") or "cpu"
    from mpq.hf import is_hf_dir

    tokenizer = args.tokenizer or (spec if is_hf_dir(spec) else None)
    report = export(model, config, format=args.format, out=args.out, device=device, tokenizer=tokenizer,
                    quantizer=quantizer, calib_data=calib, gguf_prefer=args.gguf_prefer,
                    gguf_types=_gguf_types(args.gguf_type), gguf_float=args.gguf_float)
    print(f"wrote {args.format} to {Path(args.out).resolve()}: {report.written_total_bytes / 1e6:.3f} MB of model "
          f"files, mpq predicted {report.predicted_total_bytes / 1e6:.3f} MB; per layer: "
          f"{Path(args.out) / 'export.md'}")
    return 0


def _register() -> None:
    from mpq.cli import register_command

    register_command("export", HELP, add_arguments, run)


_register()
