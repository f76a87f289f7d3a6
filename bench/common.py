"""Shared by the benchmarks: where results go and what every result file records."""

from __future__ import annotations

import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def environment(device: str = "cpu", threads: int | None = None) -> dict[str, Any]:
    from mpq.workers.profiler import fingerprint_with_threads

    fp = fingerprint_with_threads(device, threads)
    return {"device": fp, "python": sys.version.split()[0], "torch": torch.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform(),
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def write_result(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
