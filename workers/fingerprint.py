"""Device fingerprints: what a latency measurement depends on, hashed into the profile cache's key."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import socket
import subprocess
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
    from mpq.kernel_registry import kernels_for, normalize_device

    dev = normalize_device(device)
    fp: dict[str, Any] = {"device": dev, "arch": platform.machine(), "torch": torch.__version__,
                          "kernels": {k.name: k.version for k in kernels_for(dev)}}
    if dev == "cpu":
        fp.update({"name": _cpu_model(), "logical_cores": os.cpu_count(),
                   "threads": torch.get_num_threads(),
                   "quantized_engine": torch.backends.quantized.engine})
    else:
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        fp.update({"name": props.name, "sm_count": props.multi_processor_count,
                   "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                   "memory_gib": round(props.total_memory / 2**30), "l2_mib": getattr(props, "L2_cache_size", 0) >> 20,
                   **_nvidia_smi(index)})
    return fp


def _nvidia_smi(index: int) -> dict[str, Any]:
    """Driver version and maximum SM/memory clocks (fixed properties: current clocks would split the cache)."""
    return _nvidia_smi_query(_physical_index(index))


@functools.lru_cache(maxsize=None)
def _nvidia_smi_query(physical: str) -> dict[str, Any]:
    # once per GPU and process: every chunk of measurements takes a fingerprint, and nvidia-smi takes ~0.1 s
    fields = ["driver_version", "clocks.max.sm", "clocks.max.mem"]
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                              f"--id={physical}"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return {}
    values = [v.strip() for v in out.stdout.strip().split(",")]
    if out.returncode != 0 or len(values) != len(fields):
        return {}
    return {"driver": values[0], "max_sm_mhz": values[1], "max_mem_mhz": values[2]}


def _physical_index(index: int) -> str:
    """nvidia-smi numbers GPUs physically; CUDA_VISIBLE_DEVICES (set by Ray for a GPU actor) renumbers them."""
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index].strip() if index < len(visible) else str(index)


def fingerprint_id(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def host() -> str:
    return socket.gethostname()
