"""Latency profiling workers: measure each layer workload with each kernel on a real device, in-process or on
Ray actors (one per device slot of a cluster), in the target's deployment mode, with load evidence around every
chunk; keep the results in a profile cache keyed by device fingerprint; time whole configs end to end, verify a
search's candidates by measurement and re-validate a cache."""

from mpq.workers.cache import CacheLockedError, ProfileCache, default_cache_dir
from mpq.workers.check import CheckReport, check_cache
from mpq.workers.cluster import (DeviceUnavailableError, ProfilerPool, Target, WorkerLostError, WorkerTimeoutError,
                                 ensure_ray)
from mpq.workers.endtoend import config_key, measure_configs, model_key, time_configs
from mpq.workers.fingerprint import device_fingerprint, fingerprint_id
from mpq.workers.noise import NoisePolicy
from mpq.workers.profiler import LatencyTable, ModeMismatchError, measure_workloads, profile_workloads
from mpq.workers.timing import (TimingStats, time_callable, time_layers_in_model, time_model, time_models,
                                time_rest_of_model, time_workload)
from mpq.workers.verify import Candidate, Floor, Verdict, reachable_floor, verify_candidates, verify_columns
from mpq.workers.workloads import Workload, context_bytes_of, workload_of, workloads_for

__all__ = ["ProfileCache", "CacheLockedError", "default_cache_dir", "CheckReport", "check_cache",
           "device_fingerprint", "fingerprint_id", "LatencyTable", "ModeMismatchError", "ensure_ray",
           "DeviceUnavailableError", "WorkerLostError", "WorkerTimeoutError", "ProfilerPool", "Target",
           "measure_workloads", "profile_workloads", "NoisePolicy", "TimingStats", "time_callable", "time_model",
           "time_models", "time_rest_of_model", "time_layers_in_model", "time_workload", "config_key",
           "measure_configs", "model_key", "time_configs", "Candidate", "Floor", "Verdict", "reachable_floor",
           "verify_candidates", "verify_columns", "Workload", "context_bytes_of", "workload_of", "workloads_for"]
