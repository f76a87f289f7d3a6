"""Latency profiling workers: measure each layer workload with each kernel on a real device, in-process or on
Ray actors (one per device slot of a cluster), and keep the results in a profile cache keyed by device fingerprint."""

from mpq.workers.cache import ProfileCache, default_cache_dir
from mpq.workers.fingerprint import device_fingerprint, fingerprint_id
from mpq.workers.cluster import DeviceUnavailableError, ProfilerPool, Target, ensure_ray
from mpq.workers.profiler import LatencyTable, measure_workloads, profile_workloads
from mpq.workers.timing import (TimingStats, time_callable, time_layers_in_model, time_model, time_models,
                                time_rest_of_model)
from mpq.workers.workloads import Workload, workload_of, workloads_for

__all__ = ["ProfileCache", "default_cache_dir", "device_fingerprint", "fingerprint_id", "LatencyTable",
           "ensure_ray", "DeviceUnavailableError", "ProfilerPool", "Target", "measure_workloads",
           "profile_workloads", "TimingStats", "time_callable", "time_model",
           "time_models", "time_rest_of_model", "time_layers_in_model",
           "Workload", "workload_of", "workloads_for"]
