"""Budgets: one field per resource, infinity meaning no limit (like MCT's ``ResourceUtilization``).

Absolute limits are ``size_mb``, ``bops`` and ``latency_ms``; relative ones are fractions of the float model:
``size``, ``latency`` and ``bops_ratio``. :meth:`Budget.resolve` turns a budget into absolute limits for one model;
where both kinds are given for a resource, the tighter one wins.

A latency limit may name the workload it is for (a **phase**), each profiled at its own shape and constrained as its
own cost column:

- ``latency_ms@B`` / ``latency@B``: a forward pass of ``B`` rows (the calibration input's other dimensions kept);
- ``decode_ms@B`` / ``decode@B`` (language models): one new token for each of ``B`` sequences (``B`` = 1 if not
  given), a forward pass on ``B x 1`` token ids;
- ``prefill_ms@S`` / ``prefill@S`` (language models): one sequence of ``S`` tokens (the calibration length if not
  given).

So ``"latency_ms@1=0.5,latency_ms@64=9"`` or ``"decode=0.6,prefill_ms@2048=40"``; the ``_ms`` forms are absolute,
the others fractions of the float model's latency in that phase.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping

from mpq.errors import BudgetError

INF = math.inf
_ABSOLUTE = {"size_mb": "size_mb", "bops": "bops", "latency_ms": "latency_ms"}
_RELATIVE = {"size": "size_mb", "bops_ratio": "bops", "latency": "latency_ms"}
_UNITS = {"size_mb": "MB", "bops": "BOPs", "latency_ms": "ms"}
_PHASE_KEY = re.compile(r"^(?P<kind>latency|decode|prefill)(?P<abs>_ms)?(?:@(?P<n>\d+))?$")
PHASE_KINDS = {"latency": "batch", "decode": "decode", "prefill": "prefill"}


@dataclass(frozen=True)
class Phase:
    """A workload a latency limit is for: ``batch`` (``n`` rows), ``decode`` (``n`` sequences, one token each) or
    ``prefill`` (one sequence of ``n`` tokens); ``n`` None means the default (decode: 1; prefill: the calibration
    sequence length)."""

    kind: str
    n: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in PHASE_KINDS.values():
            raise BudgetError(f"phase kind {self.kind!r} unknown: use one of {', '.join(PHASE_KINDS.values())}")
        if self.n is not None and (not isinstance(self.n, int) or self.n < 1):
            raise BudgetError(f"phase {self.kind}@{self.n!r}: the number after @ must be a positive whole number")

    def column(self, default_seq: int | None = None) -> str:
        """The cost column of this phase: ``latency_ms@8``, ``decode_ms@1``, ``prefill_ms@2048``."""
        n = self.n
        if n is None and self.kind == "decode":
            n = 1
        if n is None and self.kind == "prefill":
            if default_seq is None:
                raise BudgetError("a prefill limit without @S needs the model's sequence length: write "
                                  "prefill_ms@2048=... or give token-id calibration batches")
            n = default_seq
        if n is None:
            raise BudgetError("a batch latency phase needs @B (e.g. latency_ms@1)")
        prefix = {"batch": "latency", "decode": "decode", "prefill": "prefill"}[self.kind]
        return f"{prefix}_ms@{n}"


def parse_phase_key(key: str) -> tuple[Phase, bool] | None:
    """``(phase, absolute)`` of a phase budget key, or None when ``key`` is not one (plain ``latency_ms`` and
    ``latency`` are not phases: they are the calibration batch's latency)."""
    m = _PHASE_KEY.match(key)
    if not m or (m["kind"] == "latency" and m["n"] is None):
        return None
    return Phase(PHASE_KINDS[m["kind"]], None if m["n"] is None else int(m["n"])), m["abs"] is not None


def _number(key: str, value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise BudgetError(f"budget {key}={value!r} is not a number") from None
    if math.isnan(v) or v <= 0:
        raise BudgetError(f"budget {key}={value!r} must be a positive number (inf for no limit)")
    return v


@dataclass(frozen=True)
class Budget:
    size_mb: float = INF
    bops: float = INF
    latency_ms: float = INF
    size: float = INF  # fraction of the float model's size
    latency: float = INF  # fraction of the float model's latency
    bops_ratio: float = INF  # fraction of the float model's BOPs
    phases: Mapping[str, float] = field(default_factory=dict)  # phase key (latency_ms@1, decode, ...) -> limit

    def __post_init__(self) -> None:
        for f in fields(self):
            if f.name != "phases":
                object.__setattr__(self, f.name, _number(f.name, getattr(self, f.name)))
        phases = {}
        for key, value in dict(self.phases or {}).items():
            if parse_phase_key(str(key)) is None:
                raise BudgetError(f"{key!r} is not a latency phase: use latency_ms@B, latency@B, decode_ms@B, "
                                  f"decode@B, prefill_ms@S or prefill@S")
            phases[str(key)] = _number(str(key), value)
        object.__setattr__(self, "phases", phases)  # a plain dict: budgets pickle (Ray tasks, deep copies)

    @property
    def is_unlimited(self) -> bool:
        return all(math.isinf(v) for v in self.given_values()) or not self.given()

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | Budget | None) -> Budget:
        """From ``"size=0.3,latency_ms=2"``, ``"latency_ms@1=0.5,decode=0.6"``, a dict, or a Budget."""
        if spec is None:
            return cls()
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            spec = _parse_text(spec)
        if not isinstance(spec, Mapping):
            raise BudgetError(f"a budget is a string like 'size=0.3', a dict or a Budget, got {type(spec).__name__}")
        plain = {k: v for k, v in spec.items() if k in cls.keys()}
        phases = {k: v for k, v in spec.items() if k not in plain and isinstance(k, str) and parse_phase_key(k)}
        unknown = set(spec) - set(plain) - set(phases)
        if unknown:
            raise BudgetError(f"unknown budget keys {sorted(map(str, unknown))}; allowed: {', '.join(cls.keys())} "
                              f"(absolute: size_mb, bops, latency_ms; relative to float: size, latency, bops_ratio; "
                              f"per phase: latency_ms@B, decode_ms@B, prefill_ms@S and their relative forms)")
        return cls(**plain, phases=phases)  # __post_init__ converts and checks each value

    @staticmethod
    def keys() -> list[str]:
        return [f.name for f in fields(Budget) if f.name != "phases"]

    def phase_limits(self) -> list[tuple[str, Phase, bool, float]]:
        """``(key, phase, absolute, value)`` of every phase limit."""
        out = []
        for key, value in self.phases.items():
            phase, absolute = parse_phase_key(key)
            out.append((key, phase, absolute, value))
        return out

    def resolve(self, reference: Mapping[str, float],
                column_of: Callable[[Phase], str] | None = None) -> dict[str, float]:
        """Absolute limits ``{size_mb, bops, latency_ms, <phase columns>}`` for a model whose float totals are
        ``reference`` (one entry per cost column); ``column_of`` names a phase's column (default
        :meth:`Phase.column`)."""
        limits = {r: getattr(self, k) for k, r in _ABSOLUTE.items()}
        for k, r in _RELATIVE.items():
            frac = getattr(self, k)
            if not math.isinf(frac):
                limits[r] = min(limits[r], frac * reference[r])
        for key, phase, absolute, value in self.phase_limits():
            col = (column_of or Phase.column)(phase)
            if not absolute and col not in reference:
                raise BudgetError(f"budget {key}={value:g} is relative to the float model's {col}, which was not "
                                  f"measured")
            limit = value if absolute else value * reference[col]
            limits[col] = min(limits.get(col, INF), limit)
        return limits

    def given(self) -> dict[str, float]:
        plain = {k: getattr(self, k) for k in self.keys() if not math.isinf(getattr(self, k))}
        return {**plain, **{k: v for k, v in self.phases.items() if not math.isinf(v)}}

    def given_values(self) -> list[float]:
        return list(self.given().values())

    def __str__(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.given().items()) or "unlimited"

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.given().items())))


def _parse_text(spec: str) -> dict[str, str]:
    items: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.replace(";", ",").split(","))):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise BudgetError(f"budget term {part!r} is not key=value; keys: {', '.join(Budget.keys())} or a phase "
                              f"like latency_ms@1")
        if key in items:
            raise BudgetError(f"budget key {key!r} given twice ({key}={items[key]}, {key}={value.strip()}): give "
                              f"each key once")
        items[key] = value.strip()
    return items


def format_resource(name: str, value: float) -> str:
    if name == "bops":
        return f"{value:.4g} BOPs"
    unit = _UNITS.get(name) or ("ms" if "_ms@" in name else "")
    return f"{value:.4g} {unit}".strip()
