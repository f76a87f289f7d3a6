"""Device fingerprints: what a latency measurement depends on, hashed into the profile cache's key."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
from typing import Any

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_fingerprint(device: str = "cpu") -> dict[str, Any]:
    """The properties a measurement depends on, read where the measurement runs (e.g. inside a Ray task) after its
    thread count is set: the recorded ``threads`` is the intra-op thread count torch reports there."""
    from mpq.registry import kernels_for, normalize_device

    dev = normalize_device(device)
    fp: dict[str, Any] = {"device": dev, "arch": platform.machine(), "torch": torch.__version__,
                          "kernels": {k.name: k.version for k in kernels_for(dev)}}
    if dev == "cpu":
        fp.update({"name": _cpu_model(), "logical_cores": os.cpu_count(),
                   "threads": torch.get_num_threads(),
                   "quantized_engine": torch.backends.quantized.engine})
    else:
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        fp.update({"name": props.name, "sm_count": props.multi_processor_count,
                   "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda})
    return fp


def fingerprint_id(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def host() -> str:
    return socket.gethostname()
