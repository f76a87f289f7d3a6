"""The latency profiler: workload deduplication, in-process vs Ray, the profile cache."""

from __future__ import annotations

import math
import sqlite3

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from mpq.layers import discover_layers
from mpq.space import build_search_space
from mpq.workers import NoisePolicy, ProfileCache, device_fingerprint, profile_workloads, workloads_for
from mpq.workers.profiler import TABLE_COLUMNS, fingerprint_with_threads

FAST = dict(warmup=2, repeats=7, min_sample_ms=0.5, progress=False)


@pytest.fixture(scope="module")
def lm_workloads(lm_task):
    inv = discover_layers(lm_task.model, lm_task.calib[0][0])
    space = build_search_space(inv, "cpu", allowed=["w8a8", "w4a16g32"])
    return inv, space, *workloads_for(inv, space)


def test_workloads_deduplicate_identical_blocks(lm_workloads):
    inv, space, workloads, by_pair = lm_workloads
    # 17 linears x (float + 2 options); the two embeddings have no allowed option here: float only
    assert len(by_pair) == sum(len(space[n]) for n in space.layers) == 17 * 3 + 2
    # 4 blocks share shapes: qkv, proj, fc, out, plus the head -> 5 shapes x 3 options, plus tok and pos
    assert len(workloads) == 5 * 3 + 2
    assert by_pair[("blocks.0.fc", "w8a8")] == by_pair[("blocks.3.fc", "w8a8")]


def test_workload_builds_the_applied_module(lm_workloads):
    _, _, _, by_pair = lm_workloads
    module, x = by_pair[("blocks.1.attn.qkv", "w4a16g32")].build()
    assert type(module).__name__ == "Int4WeightOnlyGemm"
    assert x.shape == (16, 128, 128) and module(x).shape == (16, 128, 384)


@pytest.mark.ray
def test_ray_table_matches_inprocess(lm_workloads, ray_cluster, tmp_path):
    _, _, workloads, _ = lm_workloads
    local = profile_workloads(workloads, backend="inprocess", cache=False, threads=1, **FAST)
    remote = profile_workloads(workloads, backend="ray", cache=ProfileCache(tmp_path / "c.sqlite"), threads=1,
                               **FAST)
    assert list(local.frame.columns) == list(remote.frame.columns) == TABLE_COLUMNS
    assert dict(local.frame.dtypes) == dict(remote.frame.dtypes)
    assert set(local.frame["key"]) == set(remote.frame["key"])
    assert local.fingerprint_id == remote.fingerprint_id  # same machine, same threads: same device
    assert (remote.frame["source"] == "measured").all() and remote.measured == len(workloads)
    for t in (local, remote):  # every row carries the evidence it was measured under
        assert (t.frame["median_ms"] > 0).all() and (t.frame["ref_ms"] > 0).all()
        assert t.frame["other_cores"].notna().all() and t.frame["trusted"].isin([0, 1]).all()
    # How fast a busy machine ran says nothing about the profiler: medians are compared only where both sides
    # were measured on a quiet machine (a loaded one gives ratios from 0.2 to 7.5 between two runs).
    a = local.frame.set_index("key")
    b = remote.frame.set_index("key").loc[a.index]
    quiet = (a["trusted"] == 1) & (b["trusted"] == 1) & (a["kind"] != "embedding") & (a["median_ms"] > 0.05)
    if quiet.sum() >= 5:
        ratio = b.loc[quiet, "median_ms"] / a.loc[quiet, "median_ms"]
        assert 0.5 < float(np.exp(np.log(ratio).mean())) < 2.0, ratio.describe()
        assert spearmanr(a.loc[quiet, "median_ms"], b.loc[quiet, "median_ms"]).statistic > 0.8


@pytest.mark.ray
def test_threads_recorded_inside_ray_task(ray_cluster):
    fp = ray_cluster.get(ray_cluster.remote(num_cpus=1)(fingerprint_with_threads).remote("cpu", 1))
    assert fp["threads"] == 1
    fp2 = ray_cluster.get(ray_cluster.remote(num_cpus=2)(fingerprint_with_threads).remote("cpu", 2))
    assert fp2["threads"] == 2
    assert fp["name"] == device_fingerprint("cpu")["name"]


def test_cache_reuse_and_keys(lm_workloads, fresh_cache):
    _, _, workloads, _ = lm_workloads
    trust = dict(FAST, policy=NoisePolicy.accept_all())  # what the cache does, not what the noise does
    first = profile_workloads(workloads[:4], backend="inprocess", cache=fresh_cache, threads=1, **trust)
    assert first.measured == 4 and first.cache_hits == 0
    again = profile_workloads(workloads, backend="inprocess", cache=fresh_cache, threads=1, **trust)
    assert again.cache_hits == 4 and again.measured == len(workloads) - 4
    cached = again.frame.set_index("key")
    for r in first.frame.to_dict("records"):
        assert cached.loc[r["key"], "median_ms"] == r["median_ms"]
    # another thread count is another device fingerprint: nothing reused
    other = profile_workloads(workloads[:2], backend="inprocess", cache=fresh_cache, threads=2, **trust)
    assert other.cache_hits == 0 and other.fingerprint_id != first.fingerprint_id
    assert fresh_cache.count(first.fingerprint_id) == len(workloads)


def test_threads_restored(lm_workloads, fresh_cache):
    _, _, workloads, _ = lm_workloads
    before = torch.get_num_threads()
    profile_workloads(workloads[:1], backend="inprocess", cache=fresh_cache, threads=1, **FAST)
    assert torch.get_num_threads() == before


def test_corrupt_cache_is_rebuilt(tmp_path, caplog):
    path = tmp_path / "profiles.sqlite"
    path.write_bytes(b"this is not a database" * 100)
    cache = ProfileCache(path)
    assert cache.count() == 0
    assert any(p.name.startswith("profiles.sqlite.corrupt-") for p in tmp_path.iterdir())
    assert "corrupt" in caplog.text
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_measurements_are_positive(lm_workloads, fresh_cache):
    _, _, workloads, _ = lm_workloads
    t = profile_workloads(workloads[:3], backend="inprocess", cache=fresh_cache, threads=1, **FAST)
    assert (t.frame["median_ms"] > 0).all() and (t.frame["q1_ms"] <= t.frame["median_ms"]).all()
    assert (t.frame["median_ms"] <= t.frame["q3_ms"]).all()
    assert all(math.isfinite(v) for v in t.frame["std_ms"])


def test_workloads_run_in_the_models_float_dtype():
    """A bf16 model's float layers are timed in bf16 (an fp32 copy reads twice the bytes); fp32 keys stay as they
    were before the dtype was recorded, so existing caches keep their rows."""
    from mpq.workers.workloads import Workload

    for dtype, expect in ((torch.bfloat16, "bfloat16"), (torch.float32, "float32")):
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8)).to(dtype)
        inv = discover_layers(model, torch.randn(4, 64, dtype=dtype))
        _, by_pair = workloads_for(inv, build_search_space(inv, "cpu"))
        w = by_pair[("0", "float")]
        assert inv["0"].float_dtype == expect and w.dtype == expect
        assert ('"dtype"' in w.key) == (expect != "float32")
        assert Workload.from_key(w.key) == w
        module, x = w.build("cpu")
        assert module.weight.dtype == dtype and x.dtype == dtype and module(x).dtype == dtype
