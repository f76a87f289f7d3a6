"""The ``mpq`` command line. Its flags and defaults come from the option dataclasses (:mod:`mpq.options`) and the
functions' own defaults; its choices from the plug-in registries.

    mpq search --model digits-cnn --budget size=0.3 --out runs/demo
    mpq solve runs/demo --budget size=0.2                      # another budget on a finished run, in seconds
    mpq search --resume runs/demo [--budget size=0.25]         # continue an interrupted search
    mpq profile --model digits-cnn
    mpq apply --model digits-cnn --config runs/demo/config.json --out runs/demo/quantized.pt
    mpq dashboard runs/demo [--open]
    mpq sensitivity-report --model digits-cnn --out runs/estimators
    mpq models

Every subcommand is a :class:`Command` (a name, help, ``add_arguments(parser)`` and ``run(args) -> exit code``)
in the ``mpq.commands`` registry: :func:`register_command`, or an ``mpq.commands`` entry point naming a Command,
adds one. Only the command being run builds its flags, so ``mpq --help`` and ``mpq dashboard`` import no torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mpq.plugins import COMMANDS

log = logging.getLogger("mpq")
SEARCH_ARGS = "search_args.json"  # what a run directory needs to be resumed from the command line


@dataclass(frozen=True)
class Command:
    """One ``mpq`` subcommand."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def register_command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None],
                     run: Callable[[argparse.Namespace], int]) -> Command:
    """Add ``mpq NAME``: ``add_arguments`` declares its flags, ``run`` does the work and returns the exit code."""
    return COMMANDS.add(name, Command(name, help, add_arguments, run))


def load_task(spec: str, eval: str | None = None, data: str | None = None):
    """A bundled reference model by name, a saved Hugging Face model directory (evaluated with ``eval`` on
    ``data``, see :func:`mpq.hf.hf_task`), or ``package.module:function`` returning a ReferenceTask-like object
    (attributes ``model``, ``calib``, ``eval_fn``, ``metric``, ``higher_is_better``, ``name``)."""
    from mpq.hf import hf_task, is_hf_dir
    from mpq.models import load_reference, reference_names

    if is_hf_dir(spec):
        import pickle

        try:
            return hf_task(spec, eval or "perplexity", data)
        except pickle.UnpicklingError as e:  # weights_only=True refused an object that is not plain tensors
            from mpq.errors import ConfigError

            raise ConfigError(f"--data {data}: not a file of plain tensors (it loads only with weights_only=False, "
                              f"which mpq never does): {str(e).splitlines()[0][:200]}") from None
    if eval or data:
        raise SystemExit(f"mpq: --eval/--data apply to a Hugging Face model directory; {spec!r} is not one "
                         f"(no config.json)")
    if ":" in spec:
        mod, _, fn = spec.partition(":")
        sys.path.insert(0, str(Path.cwd()))
        return getattr(importlib.import_module(mod), fn)()
    if spec in reference_names():
        return load_reference(spec)
    raise SystemExit(f"mpq: unknown model {spec!r}: use one of {', '.join(reference_names())}, a Hugging Face model "
                     f"directory, or module:function")


def model_arguments(sp: argparse.ArgumentParser, model_required: bool = True) -> None:
    """``--model``, ``--eval``, ``--data``, ``--device``: what every command that loads a model takes."""
    from mpq.evaluators import EVALUATORS
    from mpq.options import SpaceOptions

    default_device = SpaceOptions.__dataclass_fields__["device"].default
    sp.add_argument("--model", required=model_required,
                    help="bundled model (mpq models), a saved Hugging Face model directory, or module:fn")
    sp.add_argument("--eval", default=None, choices=EVALUATORS,
                    help="metric of a Hugging Face model directory (default perplexity)")
    sp.add_argument("--data", default=None,
                    help="data of a Hugging Face model: a text file (perplexity) or a .pt of inputs/labels")
    sp.add_argument("--device", default=None, action="append",
                    help=f"target device (default {default_device}): cpu, cuda, or a kind of node on a Ray cluster "
                         "such as cuda:h100 (nodes declare the resource mpq_device_cuda_h100); search: repeat for "
                         "one frontier per device")


def devices_of(args) -> list[str]:
    """The ``--device`` values (a run directory saved before ``--device`` could repeat holds one string)."""
    from mpq.options import SpaceOptions

    given = args.device or [SpaceOptions.__dataclass_fields__["device"].default]
    return [given] if isinstance(given, str) else list(given)


def one_device(args) -> str:
    devices = devices_of(args)
    if len(devices) > 1:
        raise SystemExit(f"mpq {args.cmd}: one --device at a time (got {devices}); only search takes several")
    return devices[0]


_devices, _one_device = devices_of, one_device  # the names earlier releases exported


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mpq", description="Mixed-precision bit-allocation search for PyTorch models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = p.add_subparsers(dest="cmd", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, command in COMMANDS.items():
        sp = sub.add_parser(name, help=command.help, description=command.help)
        if name == chosen:
            command.add_arguments(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser(argv).parse_args(argv)
    args.argv = argv
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    from mpq.errors import MpqError

    try:
        return COMMANDS.get(args.cmd).run(args)
    except MpqError as e:
        print(f"mpq: error: {e}", file=sys.stderr)
        return 2


def command_line() -> str | None:
    return "mpq " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None


def budget_slug(budget) -> str:
    return re.sub(r"[^a-z0-9.@=-]+", "_", str(budget).replace(", ", ",").lower()).strip("_") or "budget"


def given_flags(command: Command, argv: list[str]) -> dict[str, Any]:
    """The options of ``command`` that ``argv`` sets explicitly (not the defaults): what ``--resume`` must apply
    or refuse."""
    parser = argparse.ArgumentParser(add_help=False)
    command.add_arguments(parser)
    for action in parser._actions:  # argparse has no public switch for "no defaults"
        action.default = argparse.SUPPRESS
    rest = argv[argv.index(command.name) + 1:] if command.name in argv else argv
    known, _ = parser.parse_known_args(rest)
    return vars(known)


if __name__ == "__main__":
    sys.exit(main())
