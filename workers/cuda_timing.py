"""GPU kernel timing that neither launch gaps nor L2 hits flatter, and the device ceilings to read it against.

:func:`time_rotating` times a kernel the way a model runs it at decode: back-to-back calls replayed from one CUDA
graph, each call on the next of several copies of its weights, so many that together they exceed the L2 several
times over (every call streams its weights from device memory, as a layer does whose neighbours ran in between) and
no launch gap sits between calls. The per-call time is a replay's time over its calls; medians and quartiles are
over several replays. :func:`time_flushed` is the older method (one call per sample after reading a buffer twice
the L2's size) for comparison. :func:`measure_ceilings` measures, in the same process, what the device does at best:
a large device-to-device copy, the bf16 GEMV read rate, bf16 and INT8 GEMMs at 8192^3.

Only torch here: the kernels under test come in as callables.
"""

from __future__ import annotations

import logging
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GraphTiming:
    """Per-call GPU time of one kernel: median and quartiles over ``replays`` replays of ``calls`` back-to-back
    calls cycling through ``copies`` weight copies (``graph`` False: not capturable, timed as eager back-to-back
    calls between two events, launch gaps included)."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    calls: int
    copies: int
    replays: int
    graph: bool
    samples: tuple[float, ...] = ()  # per-call ms of each replay

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def l2_bytes(device: int | None = None) -> int:
    """The GPU's L2 size in bytes (50 MB where the driver does not say)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)


def copies_for(bytes_per_copy: int, l2_factor: float = 4.0, max_copies: int = 64) -> int:
    """How many weight copies of ``bytes_per_copy`` bytes together exceed ``l2_factor`` times the L2 (at least 2,
    at most ``max_copies``; past that each copy alone is far beyond the L2 fraction any call could reuse)."""
    return max(2, min(max_copies, math.ceil(l2_factor * l2_bytes() / max(bytes_per_copy, 1))))


def _events(n: int) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
    return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]


def _quartiles(samples: list[float]) -> tuple[float, float, float]:
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4)
    return statistics.median(samples), q[0], q[2]


def _capture(calls: list[Callable[[], Any]], rounds: int) -> torch.cuda.CUDAGraph | None:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):  # capture wants the calls warmed up off the default stream
            for call in calls:
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(rounds):
                for call in calls:
                    call()
        return graph
    except RuntimeError as e:  # a call that synchronizes or runs on the host
        log.debug("CUDA graph capture failed (%s); timing eager back-to-back calls", e)
        torch.cuda.synchronize()
        # a failed capture leaves torch's CUDA generator marked as capturing; a trivial capture ends that state
        probe, x = torch.cuda.CUDAGraph(), torch.zeros(1, device="cuda")
        with torch.cuda.graph(probe):
            x.add_(1)
        return None


def time_rotating(make_call: Callable[[int], Callable[[], Any]], bytes_per_copy: int, *, copies: int | None = None,
                  replays: int = 7, min_replay_ms: float = 2.0, warmup: int = 2, l2_factor: float = 4.0,
                  max_copies: int = 64) -> GraphTiming:
    """Per-call time of a kernel over rotating weight copies.

    ``make_call(i)`` returns a no-argument callable that runs the kernel on the ``i``-th copy of its weights (the
    factory makes the copy; ``bytes_per_copy`` is what one copy holds, which sets how many copies are made:
    :func:`copies_for`, unless ``copies`` is given). One CUDA graph replays the copies in turn, as many rounds as
    make a replay last at least ``min_replay_ms``; the result is per call, over ``replays`` replays."""
    n = copies or copies_for(bytes_per_copy, l2_factor, max_copies)
    with torch.inference_mode():
        calls = [make_call(i) for i in range(n)]
        for _ in range(max(warmup, 1)):
            for call in calls:
                call()
        start, end = _events(1)[0]
        start.record()
        for call in calls:
            call()
        end.record()
        torch.cuda.synchronize()
        rounds = max(1, math.ceil(min_replay_ms / max(start.elapsed_time(end), 1e-3)))
        graph = _capture(calls, rounds)
        run = graph.replay if graph is not None else (lambda: [call() for _ in range(rounds) for call in calls])
        run()  # the first replay uploads the graph
        events = _events(replays)
        for s, e in events:
            s.record()
            run()
            e.record()
        torch.cuda.synchronize()
        per_call = [s.elapsed_time(e) / (rounds * n) for s, e in events]
        captured = graph is not None  # (the graph, its memory pool and the copies go when this returns)
    med, q1, q3 = _quartiles(per_call)
    return GraphTiming(med, q1, q3, rounds * n, n, replays, captured, tuple(per_call))


def time_flushed(fn: Callable[[], Any], repeats: int = 20, warmup: int = 3) -> float:
    """Median ms of one eager call of ``fn`` after evicting the L2 by reading a buffer twice its size (reading,
    not writing: written lines would be written back during the timed call)."""
    scratch = torch.empty(2 * l2_bytes() // 4, dtype=torch.int32, device="cuda").fill_(1)
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            scratch.max()
            s, e = _events(1)[0]
            s.record()
            fn()
            e.record()
            e.synchronize()
            samples.append(s.elapsed_time(e))
    return statistics.median(samples)


def _median_event_ms(fn: Callable[[], Any], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    events = _events(repeats)
    for s, e in events:
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def _copy_tbs(mb: int, g: torch.Generator) -> float:
    src = torch.randint(0, 255, (mb * 2**20,), dtype=torch.uint8, device="cuda", generator=g)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _median_event_ms(lambda: dst.copy_(src), repeats=10) / 1e9


def _gemm_rate(n: int, g: torch.Generator, int8: bool) -> float:
    if int8:
        a = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda", generator=g)
        b = torch.randint(-127, 128, (n, n), dtype=torch.int8, device="cuda", generator=g).t()
        return 2 * n**3 / _median_event_ms(lambda: torch._int_mm(a, b), repeats=10) / 1e9
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16, generator=g)
    return 2 * n**3 / _median_event_ms(lambda: a @ b, repeats=10) / 1e9


def measure_ceilings(copy_mb: int = 2048, gemv_n: int = 8192, gemm_n: int = 8192, seed: int = 0) -> dict[str, float]:
    """What this GPU does at best, measured now on random data: ``copy_tbs`` (a device-to-device copy of
    ``copy_mb`` MB, bytes read plus written over time), ``gemv_bf16_tbs`` (cuBLAS bf16 GEMV on ``gemv_n``^2 weights
    over rotating copies: weight bytes read over time), ``gemm_bf16_tflops`` and ``gemm_int8_tops``
    (``torch.matmul`` in bf16 and ``torch._int_mm`` at ``gemm_n``^3)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    with torch.inference_mode():
        out = {"copy_tbs": _copy_tbs(copy_mb, g)}
        x = torch.randn(1, gemv_n, device="cuda", dtype=torch.bfloat16, generator=g)
        w = torch.randn(gemv_n, gemv_n, device="cuda", dtype=torch.bfloat16, generator=g)
        t = time_rotating(lambda i: (lambda wi=w.clone() if i else w: x @ wi.t()), w.numel() * 2)
        out["gemv_bf16_tbs"] = w.numel() * 2 / t.median_ms / 1e9
        out["gemm_bf16_tflops"] = _gemm_rate(gemm_n, g, int8=False)
        out["gemm_int8_tops"] = _gemm_rate(gemm_n, g, int8=True)
    out.update(copy_mb=copy_mb, gemv_n=gemv_n, gemm_n=gemm_n, l2_mb=l2_bytes() / 2**20)
    return out


__all__ = ["GraphTiming", "copies_for", "l2_bytes", "measure_ceilings", "time_flushed", "time_rotating"]
