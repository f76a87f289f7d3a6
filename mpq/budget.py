"""Budgets: one field per resource, infinity meaning no limit (like MCT's ``ResourceUtilization``).

Absolute limits are ``size_mb``, ``bops`` and ``latency_ms``; relative ones are fractions of the float model:
``size``, ``latency`` and ``bops_ratio``. :meth:`Budget.resolve` turns a budget into absolute limits for one model;
where both kinds are given for a resource, the tighter one wins.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

from mpq.errors import BudgetError

INF = math.inf
_ABSOLUTE = {"size_mb": "size_mb", "bops": "bops", "latency_ms": "latency_ms"}
_RELATIVE = {"size": "size_mb", "bops_ratio": "bops", "latency": "latency_ms"}
_UNITS = {"size_mb": "MB", "bops": "BOPs", "latency_ms": "ms"}


@dataclass(frozen=True)
class Budget:
    size_mb: float = INF
    bops: float = INF
    latency_ms: float = INF
    size: float = INF  # fraction of the float model's size
    latency: float = INF  # fraction of the float model's latency
    bops_ratio: float = INF  # fraction of the float model's BOPs

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise BudgetError(f"budget {f.name}={v!r} is not a number") from None
            if math.isnan(v) or v <= 0:
                raise BudgetError(f"budget {f.name}={v!r} must be a positive number (inf for no limit)")
            object.__setattr__(self, f.name, v)

    @property
    def is_unlimited(self) -> bool:
        return all(math.isinf(getattr(self, f.name)) for f in fields(self))

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | Budget | None) -> Budget:
        """From ``"size=0.3,latency_ms=2"``, a dict, or a Budget."""
        if spec is None:
            return cls()
        if isinstance(spec, Budget):
            return spec
        if isinstance(spec, str):
            items = {}
            for part in filter(None, (p.strip() for p in spec.replace(";", ",").split(","))):
                key, sep, value = part.partition("=")
                if not sep:
                    raise BudgetError(f"budget term {part!r} is not key=value; keys: {', '.join(cls.keys())}")
                items[key.strip()] = value.strip()
            spec = items
        unknown = set(spec) - set(cls.keys())
        if unknown:
            raise BudgetError(f"unknown budget keys {sorted(unknown)}; allowed: {', '.join(cls.keys())} "
                              f"(absolute: size_mb, bops, latency_ms; relative to float: size, latency, bops_ratio)")
        return cls(**dict(spec))  # __post_init__ converts and checks each value

    @staticmethod
    def keys() -> list[str]:
        return [f.name for f in fields(Budget)]

    def resolve(self, reference: Mapping[str, float]) -> dict[str, float]:
        """Absolute limits ``{size_mb, bops, latency_ms}`` for a model whose float totals are ``reference``."""
        limits = {r: getattr(self, k) for k, r in _ABSOLUTE.items()}
        for k, r in _RELATIVE.items():
            frac = getattr(self, k)
            if not math.isinf(frac):
                limits[r] = min(limits[r], frac * reference[r])
        return limits

    def given(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if not math.isinf(v)}

    def __str__(self) -> str:
        return ", ".join(f"{k}={v:g}" for k, v in self.given().items()) or "unlimited"


def format_resource(name: str, value: float) -> str:
    if name == "bops":
        return f"{value:.4g} BOPs"
    return f"{value:.4g} {_UNITS.get(name, '')}".strip()
