"""The options of each stage of a study, as frozen dataclasses validated on construction.

One dataclass per stage: :class:`SpaceOptions` (target device, allowed and pinned options), :class:`SensitivityOptions`
(estimator, quantizer), :class:`ProfileOptions` (latency measurement), :class:`SolveOptions` (solver, tie-break,
frontier) and :class:`EvaluateOptions` (what is measured on the real kernels). Their field names are the keyword
arguments of :func:`mpq.study` / :func:`mpq.search`, their defaults are the defaults of both and of the command line
(which builds its flags from these fields: see :func:`add_arguments`), and :class:`StudyOptions` (all of them) is
saved in the run directory as the record a study resumes from.

Names that plug-ins provide (estimators, quantizers, solvers) are checked against their registries, and their
options against what the plug-in takes, here: a typo fails before anything expensive runs.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Callable, Mapping, get_type_hints

from mpq.config import LayerBits
from mpq.errors import ConfigError
from mpq.plugins import ESTIMATORS, SOLVERS, check_options, load_plugins

PROFILE_BACKENDS = ("ray", "inprocess")
TIE_BREAK = "latency_ms"  # among allocations within tie_tolerance of the best score, the fastest


def option(default: Any, help: str, choices: Callable[[], list[str]] | None = None, cli: bool = True,
           flag: str | None = None) -> Any:
    """A dataclass field with what the command line needs: help text, choices (read from a registry when the
    parser is built), whether it is a flag at all, and its spelling when not ``--field-name``."""
    return field(default=default, metadata={"help": help, "choices": choices, "cli": cli, "flag": flag})


def _whole(name: str, value: Any, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be a whole number >= {minimum}" +
                          (" (or None)" if allow_none else ""))


def _mapping(name: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name} must be a dict, got {type(value).__name__} {value!r}")
    return dict(value)


def _frozen_set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


# --------------------------------------------------------------------------------------------------------------------
# estimator specs: a name, or a weighted combination of registered names
# --------------------------------------------------------------------------------------------------------------------
_TERM = re.compile(r"(?:([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*\*\s*)?([a-z_][a-z0-9_]*)")


def _split_terms(spec: str) -> list[str]:
    """The ``+``-separated terms of a combination; an empty term (``"hessian+"``, ``"+lrp"``, ``"a++b"``) is an
    error. A ``+`` inside a number's exponent (``1e+2*lrp``) does not split."""
    terms, current = [], ""
    for ch in spec:
        if ch == "+" and not (current[-1:] in ("e", "E") and current[:-1].replace(".", "").strip().isdigit()):
            terms.append(current.strip())
            current = ""
        else:
            current += ch
    terms.append(current.strip())
    if any(not t for t in terms):
        raise ConfigError(f"sensitivity {spec!r} has an empty term: write e.g. 'hessian', '0.7*hessian+0.3*lrp'")
    return terms


def parse_combination(spec: str | Mapping[str, float] | list[str] | tuple[str, ...]) -> dict[str, float]:
    """``"hessian"``, ``"hessian+lrp"``, ``"0.7*hessian+0.3*lrp"``, ``["hessian", "lrp"]`` or ``{name: weight}``;
    every name must be a registered estimator and every weight finite and non-negative."""
    if isinstance(spec, Mapping):
        weights = {str(k): float(v) for k, v in spec.items()}
    elif isinstance(spec, (list, tuple)):
        weights = {str(k): 1.0 for k in spec}
    elif isinstance(spec, str):
        weights = {}
        for term in _split_terms(spec):
            m = _TERM.fullmatch(term)
            if not m:
                raise ConfigError(f"cannot parse sensitivity term {term!r} of {spec!r}: use e.g. 'hessian', "
                                  f"'0.5*lrp' or '0.7*hessian+0.3*decoupled'")
            if m[2] in weights:
                raise ConfigError(f"estimator {m[2]!r} appears twice in {spec!r}: give each once, with its weight")
            weights[m[2]] = float(m[1] or 1.0)
    else:
        raise ConfigError(f"sensitivity must be an estimator name, a combination or an estimator, got {spec!r}")
    for name, w in weights.items():
        if name not in ESTIMATORS:
            raise ConfigError(f"unknown sensitivity estimator {name!r}; available: {', '.join(_estimator_names())}")
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"weight {w!r} of estimator {name!r} must be a finite non-negative number")
    if not weights or sum(weights.values()) <= 0:
        raise ConfigError(f"no estimator with a positive weight in {spec!r}")
    return weights


def estimator_options(spec: str | Mapping[str, float] | list[str], options: Mapping[str, Any] | None
                      ) -> dict[str, dict[str, Any]]:
    """Per member estimator, its keyword arguments; unknown names or keys are a :class:`ConfigError` that names
    the estimator, the key and the options it takes. ``options`` are one estimator's keyword arguments, or, for
    a combination, keyed by estimator name."""
    weights = parse_combination(spec)
    options = dict(options or {})
    per_name = bool(options) and all(k in ESTIMATORS for k in options)
    if len(weights) > 1 and options and not per_name:
        raise ConfigError(f"options for a combination of estimators must be keyed by estimator name, got "
                          f"{sorted(options)}")
    if per_name:
        stray = sorted(set(options) - set(weights))
        if stray:
            raise ConfigError(f"options given for estimators {stray} that {spec!r} does not use")
    out = {n: dict(options.get(n, {}) if per_name else options) for n in weights}
    for name, opts in out.items():
        if not isinstance(opts, Mapping):
            raise ConfigError(f"options of estimator {name!r} must be a dict, got {opts!r}")
        check_options("sensitivity estimator", name, ESTIMATORS.get(name), opts, exclude=("map_fn",))
    return out


def _estimator_names() -> list[str]:
    return sorted(ESTIMATORS.names())


def _quantizer_names() -> list[str]:
    """The registered quantizers (mpq.quantizers keeps its own table; its entry points load here)."""
    load_plugins("mpq.quantizers")
    from mpq.quantizers import available_quantizers

    return available_quantizers()


@dataclass(frozen=True)
class SpaceOptions:
    """Where the config runs and which options it may take."""

    device: str = option("cpu", "target device: cpu, cuda, or a kind of node on a Ray cluster such as cuda:h100",
                         cli=False)
    allowed: tuple[str, ...] | None = option(None, "options every layer may take, e.g. w8a8,w4a16g32 (default: all "
                                                   "the device's kernels run)")
    pinned: Mapping[str, str] | None = option(None, 'layers fixed to one option, as JSON: \'{"fc2": "float"}\'')

    def __post_init__(self) -> None:
        from mpq.target import Target

        _frozen_set(self, "device", Target.parse(self.device).spec)  # the kind and its deployment mode
        if self.allowed is not None:
            allowed = [self.allowed] if isinstance(self.allowed, str) else list(self.allowed)
            names = tuple((b if isinstance(b, LayerBits) else LayerBits.parse(str(b))).name for b in allowed)
            if not names:
                raise ConfigError("allowed=[] leaves no option: give at least one, or None for every option")
            _frozen_set(self, "allowed", names)
        pinned = _mapping("pinned", self.pinned)
        _frozen_set(self, "pinned", {k: (v if isinstance(v, LayerBits) else LayerBits.parse(str(v))).name
                                     for k, v in pinned.items()} or None)


@dataclass(frozen=True)
class SensitivityOptions:
    """How each (layer, option) is scored, and how its integers are chosen."""

    # fisher by default: on the CPU kernels' ~33 options a layer it ranks measured damage as well as hessian or
    # better (BENCHMARKS.md, issue 19) at one backward per batch instead of up to 128 double backwards
    sensitivity: Any = option("fisher", "estimator or weighted combination, e.g. fisher, hessian, lrp, "
                                        "'0.7*fisher+0.3*decoupled'", choices=None)
    sensitivity_options: Mapping[str, Any] | None = option(None, "the estimator's options as JSON, e.g. "
                                                                  '\'{"max_probes": 64}\'')
    sensitivity_check: int = option(24, "single-layer options whose damage is measured after scoring, to report "
                                        "the estimator's Kendall tau with the run (0: none)")
    quantizer: Any = option("gptq", "how each option's integers are chosen: gptq error feedback (act-order, "
                                    "MSE-clipped ranges; chosen by bench/search_quality.py), mse clipping, minmax",
                            choices=_quantizer_names)
    quantizer_options: Mapping[str, Any] | None = option(None, 'the quantizer\'s options as JSON, e.g. '
                                                                '\'{"act_order": true}\'')

    def __post_init__(self) -> None:
        _frozen_set(self, "sensitivity_options", _mapping("sensitivity_options", self.sensitivity_options))
        _frozen_set(self, "quantizer_options", _mapping("quantizer_options", self.quantizer_options))
        _whole("sensitivity_check", self.sensitivity_check, 0)
        if isinstance(self.sensitivity, list):
            _frozen_set(self, "sensitivity", tuple(self.sensitivity))
        if isinstance(self.sensitivity, Mapping):
            _frozen_set(self, "sensitivity", dict(self.sensitivity))
        if not callable(getattr(self.sensitivity, "estimate", None)):  # an estimator instance is taken as it is
            estimator_options(self.sensitivity, self.sensitivity_options)  # names and keys, or ConfigError
        self._check_quantizer()

    def _check_quantizer(self) -> None:
        load_plugins("mpq.quantizers")
        from mpq.quantizers import Quantizer, get_quantizer

        if isinstance(self.quantizer, Quantizer):
            if self.quantizer_options:
                raise ConfigError("quantizer_options given with a ready Quantizer instance: pass them to it")
            return
        cls = type(get_quantizer(self.quantizer))  # an unknown name is a ConfigError naming the known ones
        check_options("quantizer", str(self.quantizer), cls, self.quantizer_options)


@dataclass(frozen=True)
class ProfileOptions:
    """How latencies are measured on the target."""

    profile: str = option("ray", "where latencies are measured: ray (profiler actors on the target's nodes) or "
                                 "inprocess", choices=lambda: list(PROFILE_BACKENDS))
    address: str | None = option(None, "Ray cluster address (default: a local cluster, or RAY_ADDRESS)")
    workers: int | None = option(None, "at most this many profilers per device (default: one per device slot)")
    threads: int | None = option(None, "intra-op threads for latency measurement (default: torch's)")
    repeats: int = option(15, "timed repeats per workload")
    warmup: int = option(3, "warm-up calls per workload")
    batch_size: int | None = option(None, "batch to profile and time at (default: the calibration batch)")
    cache: Any = option(True, "measure every workload again instead of reading the profile cache", flag="--no-cache")
    latency_configs: int = option(16, "configs timed end to end (uniform, latency frontier, random; cached) to choose "
                                      "the latency predictor by held-out error (0: the table's sum)")

    def __post_init__(self) -> None:
        if self.profile not in PROFILE_BACKENDS:
            raise ConfigError(f"profile={self.profile!r} not supported: use one of {', '.join(PROFILE_BACKENDS)}")
        _whole("workers", self.workers, 1, allow_none=True)
        _whole("threads", self.threads, 1, allow_none=True)
        _whole("repeats", self.repeats, 1)
        _whole("warmup", self.warmup, 0)
        _whole("batch_size", self.batch_size, 1, allow_none=True)
        _whole("latency_configs", self.latency_configs, 0)
        if 0 < self.latency_configs < 4:
            raise ConfigError(f"latency_configs={self.latency_configs!r}: choosing a predictor needs at least 4 "
                              f"measured configs (0 keeps the table's sum)")


@dataclass(frozen=True)
class SolveOptions:
    """How the allocation is found under a budget, and which frontier is drawn."""

    solver: str = option("ilp", "the allocation solver", choices=lambda: SOLVERS.names())
    solver_options: Mapping[str, Any] | None = option(None, 'JSON, e.g. \'{"n_trials": 500}\' for optuna or '
                                                            '\'{"min_bits": {"fc2": 8}}\'')
    tie_tolerance: float = option(0.01, "allocations within this much of the lowest normalised score are ties; "
                                        "the fastest of them is chosen (0: the strict optimum)")
    frontier_points: int = option(12, "points per exact frontier before it is spread over the range")
    verify: bool = option(True, "return the solver's choice unmeasured (default, for a latency budget on a live "
                                "study: the choice, its frontier neighbours and the uniform baselines are timed "
                                "end to end and the least-damage one measured within the budget is returned)",
                          flag="--no-verify")
    check_uniform: bool = option(True, "return the solver's choice without comparing it with the uniform configs "
                                       "(default, on a live study: the choice and the fitting uniform configs of "
                                       "least predicted damage are measured on the calibration split, and a "
                                       "uniform one that measures less damage is returned)",
                                 flag="--no-check-uniform")

    def __post_init__(self) -> None:
        cls = SOLVERS.get(self.solver)  # an unknown name is a ConfigError naming the registered solvers
        options = _mapping("solver_options", self.solver_options)
        _frozen_set(self, "solver_options", options)
        cls.check_options(options)  # unknown keys and constraints the solver does not honour
        if not isinstance(self.tie_tolerance, (int, float)) or math.isnan(self.tie_tolerance) or \
                self.tie_tolerance < 0:
            raise ConfigError(f"tie_tolerance={self.tie_tolerance!r} must be a non-negative number")
        _whole("frontier_points", self.frontier_points, 1)
        for name in ("verify", "check_uniform"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")

    @property
    def breaks_ties(self) -> bool:
        """Whether the solver can take the tie-break (secondary cost within a slack)."""
        return "secondary" in SOLVERS.get(self.solver).honours


@dataclass(frozen=True)
class EvaluateOptions:
    """What the chosen config is measured with on the real kernels."""

    evaluate_frontier: bool = option(True, "skip the fake-quant metric of every frontier point",
                                     flag="--no-evaluate-frontier")
    evaluate_workers: int | None = option(None, "with --profile ray: evaluate the frontier points, and measure the "
                                                "configs of ilp+refine and the uniform check, on this many Ray "
                                                "actors (eval_fn must be picklable)")
    metric: str = option("metric", "the evaluator's metric name", cli=False)
    higher_is_better: bool = option(True, "whether a higher metric is better", cli=False)

    def __post_init__(self) -> None:
        _whole("evaluate_workers", self.evaluate_workers, 1, allow_none=True)
        if not isinstance(self.metric, str):
            raise ConfigError(f"metric must be a name (a string), got {self.metric!r}")


STAGES = {"space": SpaceOptions, "sensitivity": SensitivityOptions, "profile": ProfileOptions,
          "solve": SolveOptions, "evaluate": EvaluateOptions}


@dataclass(frozen=True)
class StudyOptions:
    """Every stage's options: what a study was made with, and what it resumes from."""

    space: SpaceOptions = field(default_factory=SpaceOptions)
    sensitivity: SensitivityOptions = field(default_factory=SensitivityOptions)
    profile: ProfileOptions = field(default_factory=ProfileOptions)
    solve: SolveOptions = field(default_factory=SolveOptions)
    evaluate: EvaluateOptions = field(default_factory=EvaluateOptions)

    @staticmethod
    def names() -> dict[str, str]:
        """Every option's name -> the stage it belongs to."""
        return {f.name: stage for stage, cls in STAGES.items() for f in fields(cls)}

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> StudyOptions:
        """From keyword arguments as :func:`mpq.study` takes them (each routed to its stage's dataclass)."""
        owner = cls.names()
        unknown = sorted(set(kwargs) - set(owner))
        if unknown:
            raise ConfigError(f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                              f"options: {', '.join(sorted(owner))}")
        per_stage: dict[str, dict[str, Any]] = {s: {} for s in STAGES}
        for k, v in kwargs.items():
            per_stage[owner[k]][k] = v
        return cls(**{s: STAGES[s](**per_stage[s]) for s in STAGES})

    def with_options(self, **kwargs: Any) -> StudyOptions:
        """A copy with some options changed (validated like new ones)."""
        merged = {**self.flat(), **kwargs}
        return StudyOptions.from_kwargs(**merged)

    def flat(self) -> dict[str, Any]:
        return {f.name: getattr(getattr(self, s), f.name) for s, c in STAGES.items() for f in fields(c)}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-safe (plug-in instances are recorded by name and cannot be resumed from)."""
        return {s: {f.name: _jsonable(getattr(getattr(self, s), f.name)) for f in fields(c)}
                for s, c in STAGES.items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StudyOptions:
        """Inverse of :meth:`to_dict`. A plug-in instance (recorded by name) comes back as its registered name, or
        as the default when it had none."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"study options must be an object of stages, got {type(data).__name__}")
        flat = {k: v for stage in STAGES for k, v in dict(data.get(stage) or {}).items()}
        defaults = {f.name: f.default for c in STAGES.values() for f in fields(c)}
        for name in ("sensitivity", "quantizer"):
            value = flat.get(name)
            if isinstance(value, Mapping) and "instance" in value:
                registered = value.get("name") in (ESTIMATORS.names() if name == "sensitivity" else
                                                   _quantizer_names())
                flat[name] = value["name"] if registered else defaults[name]
                flat[f"{name}_options"] = {}
        return cls.from_kwargs(**flat)


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return {"instance": type(value).__name__, "name": getattr(value, "name", None)}


# --------------------------------------------------------------------------------------------------------------------
# command-line flags from the fields
# --------------------------------------------------------------------------------------------------------------------
def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos}): {text!r}") from None


def _list_arg(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One flag per field of the options dataclass ``cls``: ``--field-name``, typed from the annotation, its
    default the field's, its choices read from the registries now."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        if not meta.get("cli", True) or f.name in skip:
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        default = f.default if f.default is not MISSING else None
        help_text = meta.get("help", "")
        if isinstance(default, bool) or hints[f.name] is bool:
            action = "store_false" if default else "store_true"
            parser.add_argument(flag, dest=f.name, action=action, default=default, help=help_text)
            continue
        kind = _arg_type(hints[f.name], default)
        choices = meta["choices"]() if meta.get("choices") else None
        shown = f" (default {default})" if default not in (None, {}) else ""
        parser.add_argument(flag, dest=f.name, type=kind, default=default, choices=choices, help=help_text + shown)


def _arg_type(hint: Any, default: Any) -> Callable[[str], Any]:
    text = str(hint)
    if "Mapping" in text or "dict" in text:
        return _json_arg
    if "tuple" in text or "list" in text:
        return _list_arg
    if hint in (int, int | None) or isinstance(default, int) and not isinstance(default, bool):
        return int
    if hint in (float, float | None) or isinstance(default, float):
        return float
    return str


__all__ = ["SpaceOptions", "SensitivityOptions", "ProfileOptions", "SolveOptions", "EvaluateOptions",
           "StudyOptions", "STAGES", "PROFILE_BACKENDS", "add_arguments", "option", "parse_combination",
           "estimator_options"]
