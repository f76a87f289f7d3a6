"""Shared fixtures: one local Ray cluster per test session, a private profile cache, the reference tasks."""

from __future__ import annotations

import os
import tempfile

import pytest
import torch

# A private profile cache for the whole session, set before mpq reads it.
os.environ.setdefault("MPQ_CACHE_DIR", tempfile.mkdtemp(prefix="mpq-test-cache-"))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.pop("RAY_ADDRESS", None)  # tests never attach to a real cluster


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local 2-CPU Ray cluster for the session (about 6 s to start), as mpq starts one: on 127.0.0.1 only."""
    ray = pytest.importorskip("ray")
    from mpq.workers import ensure_ray

    started = not ray.is_initialized()
    if started:
        ensure_ray(num_cpus=2)
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def digits_task():
    from mpq.models import load_reference

    return load_reference("digits-cnn")


@pytest.fixture(scope="session")
def lm_task():
    from mpq.models import load_reference

    return load_reference("char-lm", eval_windows_n=16)


@pytest.fixture
def fresh_cache(tmp_path):
    from mpq.workers import ProfileCache

    return ProfileCache(tmp_path / "profiles.sqlite")


def between_fastest_and_float(study, column="latency_ms") -> float:
    """A latency limit from this study's own measurements: halfway from the fastest allocation to the float model
    (or just above the fastest when float is fastest), so that timing drift between runs cannot make it
    unreachable."""
    fastest = float(study.table.groupby("layer")[column].min().sum()) + study.costs.fixed[column]
    flt = study.costs.reference[column]
    return fastest + 0.5 * (flt - fastest) if flt > fastest else fastest * (1 + 1e-6)


def _lowbit_missing() -> bool:
    from mpq.kernels.cpu_lowbit import extension_error

    return extension_error() is not None


# tests whose expected options include mpq's own CPU kernels (built just in time: needs a C++ compiler)
NEEDS_LOWBIT = pytest.mark.skipif(_lowbit_missing(), reason="mpq's CPU low-bit kernels did not build here")
