"""Device fingerprints: what a latency measurement depends on, hashed into the profile cache's key.

Besides the device itself (CPU model and threads, or GPU, driver and clocks) the fingerprint holds what changes
timings without changing the hardware: the deployment mode, the timing method's version, the CPU frequency
governor and turbo setting where sysfs shows them, the GPU's power cap and application clocks.
"""

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


# How workloads are timed; rows timed by another method are another device's rows. 2: cold weights rotated over
# copies, the deployment mode, load evidence and a reference workload around every chunk.
TIMING_VERSION = 2
# 3 (graph mode only): layer workloads replayed from one CUDA graph over rotating weight copies
# (:func:`mpq.workers.cuda_timing.time_rotating`), many calls per replay, instead of one flushed call per replay.
GRAPH_TIMING_VERSION = 3


def timing_version(mode: str = "eager") -> int:
    """The timing method's version for rows measured in ``mode``."""
    return GRAPH_TIMING_VERSION if mode == "graph" else TIMING_VERSION


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cpu_frequency_settings() -> dict[str, Any]:
    """The CPU frequency governor, turbo/boost switch and frequency range, where this machine exposes them."""
    out: dict[str, Any] = {}
    governor = _read("/sys/devices/system/cpu/cpu0/cpufreq/scaling_governor")
    if governor:
        out["governor"] = governor
    no_turbo = _read("/sys/devices/system/cpu/intel_pstate/no_turbo")
    boost = _read("/sys/devices/system/cpu/cpufreq/boost")
    if no_turbo is not None:
        out["turbo"] = no_turbo == "0"
    elif boost is not None:
        out["turbo"] = boost == "1"
    for key, name in (("max_khz", "scaling_max_freq"), ("min_khz", "scaling_min_freq")):
        value = _read(f"/sys/devices/system/cpu/cpu0/cpufreq/{name}")
        if value:
            out[key] = value
    return out


def device_fingerprint(device: str = "cpu", mode: str = "eager") -> dict[str, Any]:
    """The properties a measurement depends on, read where the measurement runs (e.g. inside a Ray task) after its
    thread count is set: the recorded ``threads`` is the intra-op thread count torch reports there; ``mode`` is the
    target's deployment mode (:class:`mpq.target.Target`)."""
    from mpq.kernel_registry import kernels_for, normalize_device
    from mpq.workers.timing import last_level_cache_bytes

    dev = normalize_device(device)
    fp: dict[str, Any] = {"device": dev, "mode": mode, "timing": timing_version(mode), "arch": platform.machine(),
                          "torch": torch.__version__, "kernels": {k.name: k.version for k in kernels_for(dev)}}
    if dev == "cpu":
        fp.update({"name": _cpu_model(), "logical_cores": os.cpu_count(),
                   "threads": torch.get_num_threads(),
                   "quantized_engine": torch.backends.quantized.engine,
                   "llc_mib": last_level_cache_bytes() >> 20, **cpu_frequency_settings()})
    else:
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        fp.update({"name": props.name, "sm_count": props.multi_processor_count,
                   "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda,
                   "memory_gib": round(props.total_memory / 2**30), "l2_mib": getattr(props, "L2_cache_size", 0) >> 20,
                   **_nvidia_smi(index)})
    return fp


def _nvidia_smi(index: int) -> dict[str, Any]:
    """Driver version, maximum and application SM/memory clocks and the power cap: settings, not readings (current
    clocks would split the cache at every measurement)."""
    return _nvidia_smi_query(_physical_index(index))


@functools.lru_cache(maxsize=None)
def _nvidia_smi_query(physical: str) -> dict[str, Any]:
    # once per GPU and process: every chunk of measurements takes a fingerprint, and nvidia-smi takes ~0.1 s
    names = {"driver_version": "driver", "clocks.max.sm": "max_sm_mhz", "clocks.max.mem": "max_mem_mhz",
             "clocks.applications.graphics": "app_sm_mhz", "clocks.applications.memory": "app_mem_mhz",
             "power.limit": "power_limit_w"}
    # the later fields are missing on some GPUs and drivers: ask for all, then for the first three alone
    for fields in (list(names), list(names)[:3]):
        values = _query_gpu(physical, fields)
        if values is not None:
            return {names[f]: v for f, v in zip(fields, values)}
    return {}


def _query_gpu(physical: str, fields: list[str]) -> list[str] | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits",
                              f"--id={physical}"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    values = [v.strip() for v in out.stdout.strip().split(",")]
    return values if out.returncode == 0 and len(values) == len(fields) else None


def _physical_index(index: int) -> str:
    """nvidia-smi numbers GPUs physically; CUDA_VISIBLE_DEVICES (set by Ray for a GPU actor) renumbers them."""
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index].strip() if index < len(visible) else str(index)


def fingerprint_id(fp: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def host() -> str:
    return socket.gethostname()
