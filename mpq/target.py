"""The target of a search: which kind of device its latencies are measured on, and how the model runs there.

A target names a kind of device: ``cpu`` and ``cuda``, or a labelled kind such as ``cuda:h100`` or ``cpu:graviton``
that nodes of a Ray cluster declare with the custom resource ``mpq_device_<kind>`` (see :mod:`mpq.workers.cluster`).
It also names the *deployment mode*, because a model replayed from a CUDA graph and the same model launched eagerly
from Python are different latency problems (on an H200, a 4-block decode stack measured 3.07 ms eager and 0.56 ms
replayed). Spelling: ``<kind>[+<mode>]``:

- ``eager`` (the default): the forward pass as Python runs it, kernel launch by kernel launch;
- ``graph`` (CUDA only): the whole forward captured once as a CUDA graph and replayed; ``cuda-graph`` is short
  for ``cuda+graph`` and ``cuda:h100+graph`` labels the kind;
- ``compile``: the forward compiled by ``torch.compile`` (where it compiles).

Layer timings, the rest of the model and whole-model timings are all measured in the target's mode, and a latency
table measured in another mode is refused (:meth:`mpq.workers.LatencyTable.require_mode`). It lives in the core
because every stage names it; only the workers know how to reach one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mpq.errors import ConfigError
from mpq.kernel_registry import normalize_device

RESOURCE_PREFIX = "mpq_device_"
MODES = {"cpu": ("eager", "compile"), "cuda": ("eager", "graph", "compile")}


@dataclass(frozen=True)
class Target:
    """A kind of device to measure on: ``name`` the kind (``cuda:h100``), ``device`` the kernels' device and
    ``mode`` how the model runs there (``eager``, ``graph`` or ``compile``)."""

    name: str
    device: str
    mode: str = "eager"

    @classmethod
    def parse(cls, spec: str | Target) -> Target:
        if isinstance(spec, Target):
            return spec
        text = str(spec).strip().lower()
        kind, plus, mode = text.partition("+")
        if not plus and kind.endswith("-graph"):
            kind, mode = kind.removesuffix("-graph"), "graph"
        device = normalize_device(kind)
        mode = mode or "eager"
        if mode not in MODES[device]:
            raise ConfigError(f"device {spec!r}: mode {mode!r} is not offered on {device}; allowed: "
                              f"{', '.join(MODES[device])} (spelled '{device}+<mode>', or 'cuda-graph')")
        label = kind.partition(":")[2]
        if label and not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", label):
            raise ConfigError(f"device {spec!r}: the label after ':' may hold letters, digits, '_', '.' and '-'")
        # "cuda:0" is an index, not a kind of device
        return cls(device if not label or label.isdigit() else f"{device}:{label}", device, mode)

    @property
    def label(self) -> str | None:
        return self.name.partition(":")[2] or None

    @property
    def spec(self) -> str:
        """The target as one string that :meth:`parse` reads back (``cuda:h100+graph``; the kind alone for eager)."""
        return self.name if self.mode == "eager" else f"{self.name}+{self.mode}"

    @property
    def resource(self) -> str:
        """The Ray custom resource a node declares to offer this kind of device (any mode runs on it)."""
        return RESOURCE_PREFIX + re.sub(r"[^a-z0-9]+", "_", self.name).strip("_")

    @property
    def slug(self) -> str:
        """A file-name-safe form (run subdirectories); the mode is part of it unless eager."""
        return re.sub(r"[^a-z0-9]+", "-", self.spec).strip("-")
