"""The target of a search: which kind of device its latencies are measured on and its kernels run on.

A target names a kind of device: ``cpu`` and ``cuda``, or a labelled kind such as ``cuda:h100`` or ``cpu:graviton``
that nodes of a Ray cluster declare with the custom resource ``mpq_device_<kind>`` (see :mod:`mpq.workers.cluster`).
It lives in the core because every stage names it; only the workers know how to reach one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mpq.errors import ConfigError
from mpq.kernel_registry import normalize_device

RESOURCE_PREFIX = "mpq_device_"


@dataclass(frozen=True)
class Target:
    """A kind of device to measure on: ``name`` as the user wrote it, ``device`` the kernels' device."""

    name: str
    device: str

    @classmethod
    def parse(cls, spec: str | Target) -> Target:
        if isinstance(spec, Target):
            return spec
        text = str(spec).strip().lower()
        device = normalize_device(text)
        label = text.partition(":")[2]
        if label and not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", label):
            raise ConfigError(f"device {spec!r}: the label after ':' may hold letters, digits, '_', '.' and '-'")
        # "cuda:0" is an index, not a kind of device
        return cls(device if not label or label.isdigit() else f"{device}:{label}", device)

    @property
    def label(self) -> str | None:
        return self.name.partition(":")[2] or None

    @property
    def resource(self) -> str:
        """The Ray custom resource a node declares to offer this kind of device."""
        return RESOURCE_PREFIX + re.sub(r"[^a-z0-9]+", "_", self.name).strip("_")

    @property
    def slug(self) -> str:
        """A file-name-safe form (run subdirectories)."""
        return re.sub(r"[^a-z0-9]+", "-", self.name).strip("-")
