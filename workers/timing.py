"""Timing: warm-up, repeats of enough calls to be measurable, median and spread.

Several models compared with each other are timed in interleaved rounds (:func:`time_models`), so that the slow
phases of a shared machine fall on all of them alike rather than on whichever ran during one. On a CUDA device a
workload is timed with CUDA events around each call, L2 flushed before each sample and, where it can be captured,
from a CUDA graph (:func:`time_cuda_callable`); whole models are timed as the host sees them (eager launches).
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TimingStats:
    median_ms: float
    q1_ms: float
    q3_ms: float
    mean_ms: float
    std_ms: float
    repeats: int
    inner: int  # calls per timed sample

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_samples(cls, samples: list[float], inner: int) -> TimingStats:
        q = statistics.quantiles(samples, n=4) if len(samples) >= 2 else [samples[0]] * 3
        return cls(statistics.median(samples), q[0], q[2], statistics.fmean(samples), statistics.pstdev(samples),
                   len(samples), inner)


@contextmanager
def num_threads(threads: int | None):
    """Run with ``threads`` intra-op threads, restoring the caller's setting after."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _calls_per_sample(fn: Callable[[], Any], warmup: int, min_sample_ms: float, device: str) -> int:
    """Warm up, then how many calls one sample needs to last ``min_sample_ms``."""
    for _ in range(max(warmup, 1)):
        fn()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return max(1, math.ceil(min_sample_ms / 1e3 / max(time.perf_counter() - t0, 1e-7)))


def _samples(fn: Callable[[], Any], repeats: int, inner: int, device: str) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter_ns()
        for _ in range(inner):
            fn()
        _sync(device)
        out.append((time.perf_counter_ns() - t0) / inner / 1e6)
    return out


def _l2_flush_buffer() -> torch.Tensor:
    """A buffer twice the GPU's L2 size, for :func:`evict_l2`."""
    l2 = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0) or 50 * 2**20
    return torch.zeros(2 * l2, dtype=torch.uint8, device="cuda")


def evict_l2(scratch: torch.Tensor) -> None:
    """Evict every operand of the previous sample by reading ``scratch`` (at least twice L2's size). Reading, not
    writing: a written buffer leaves L2 full of dirty lines, and the timed call would pay for writing them back to
    memory (seen once on the H100: a bf16 GEMV of 90 MB ran about 20% slower after a written flush than a read one)."""
    scratch.view(torch.int32).max()


def as_cuda_graph(fn: Callable[[], Any]) -> Callable[[], Any] | None:
    """``fn`` captured in a CUDA graph (its replay launches every kernel at once, so a sample times the GPU, not
    Python's launch overhead), or None where ``fn`` cannot be captured (it synchronizes, or runs on the CPU)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    try:
        with torch.cuda.stream(side):  # warm-up on a side stream, as graph capture asks
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:
        log.debug("CUDA graph capture failed (%s); timing eager calls", e)
        _end_failed_capture()
        return None
    return graph.replay


def _end_failed_capture() -> None:
    """A capture that failed leaves torch's CUDA generator marked as capturing (the next random draw would raise
    "Offset increment outside graph capture"); a trivial capture that succeeds ends that state."""
    torch.cuda.synchronize()
    graph, x = torch.cuda.CUDAGraph(), torch.zeros(1, device="cuda")
    with torch.cuda.graph(graph):
        x.add_(1)


def time_cuda_callable(fn: Callable[[], Any], warmup: int = 3, repeats: int = 15, flush_l2: bool = True,
                       graph: bool = True) -> TimingStats:
    """Per-call GPU time of ``fn`` from CUDA events around each call, after warm-up; with ``flush_l2``, L2 is
    evicted before every sample by :func:`evict_l2` (weights are cold, as in a model whose other layers ran in
    between); with ``graph``, calls replay a CUDA graph of ``fn`` when it can be captured."""
    with torch.inference_mode():
        call = (as_cuda_graph(fn) if graph else None) or fn
        for _ in range(max(warmup, 1)):
            call()
        scratch = _l2_flush_buffer() if flush_l2 else None
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            if scratch is not None:
                evict_l2(scratch)
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        return TimingStats.from_samples([start.elapsed_time(end) for start, end in events], 1)


def time_callable(fn: Callable[[], Any], warmup: int = 3, repeats: int = 15, min_sample_ms: float = 1.0,
                  device: str = "cpu") -> TimingStats:
    """Per-call time of ``fn``: each of ``repeats`` samples times enough calls to last ``min_sample_ms`` (on a CUDA
    device: :func:`time_cuda_callable`, one call per sample)."""
    if device.startswith("cuda"):
        return time_cuda_callable(fn, warmup, repeats)
    with torch.inference_mode():
        inner = _calls_per_sample(fn, warmup, min_sample_ms, device)
        return TimingStats.from_samples(_samples(fn, repeats, inner, device), inner)


def time_models(models: Mapping[str, torch.nn.Module], inputs: Any, warmup: int = 3, repeats: int = 15,
                rounds: int = 5, min_sample_ms: float = 1.0, threads: int | None = None,
                device: str = "cpu") -> dict[str, TimingStats]:
    """End-to-end forward latency of each model on ``inputs``, in ``rounds`` interleaved rounds of samples."""
    from mpq.layers import call_model

    fns = {name: (lambda m=m: call_model(m, inputs)) for name, m in models.items()}
    per_round = max(1, math.ceil(repeats / rounds))
    with num_threads(threads), torch.inference_mode():
        for m in models.values():
            m.eval()
        inner = {name: _calls_per_sample(fn, warmup, min_sample_ms, device) for name, fn in fns.items()}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name] += _samples(fn, per_round, inner[name], device)
    return {name: TimingStats.from_samples(s, inner[name]) for name, s in samples.items()}


def time_model(model: torch.nn.Module, inputs: Any, warmup: int = 3, repeats: int = 15, min_sample_ms: float = 1.0,
               threads: int | None = None, device: str = "cpu") -> TimingStats:
    """End-to-end forward latency of one model on ``inputs`` with ``threads`` intra-op threads."""
    return time_models({"model": model}, inputs, warmup, repeats, 1, min_sample_ms, threads, device)["model"]


class _RecordedOutput(torch.nn.Module):
    """Stands in for a layer: returns what the layer returned on the same input, without computing or allocating
    (the layer's own timing already pays for its output; an in-place op downstream only changes values)."""

    def __init__(self, outputs: list[torch.Tensor], weight: torch.Tensor | None = None):
        super().__init__()
        self.outputs = outputs
        self.call = 0
        # model code may read the layer's weight dtype/device (HF ViT casts its input to it): keep an empty one
        self.weight_like = None if weight is None else torch.empty(0, dtype=weight.dtype, device=weight.device)

    @property
    def weight(self) -> torch.Tensor | None:
        return self.weight_like

    def forward(self, *args, **kwargs):
        out = self.outputs[self.call % len(self.outputs)]
        self.call += 1
        return out


def time_rest_of_model(model: torch.nn.Module, layer_names: list[str], inputs: Any, warmup: int = 3,
                       repeats: int = 15, min_sample_ms: float = 1.0, threads: int | None = None,
                       device: str = "cpu") -> TimingStats:
    """Latency of everything in the forward pass except the named layers (each replaced by its recorded output):
    the fixed part of an additive latency model."""
    import copy

    from mpq.layers import call_model, set_submodule

    stub = copy.deepcopy(model).eval()
    recorded: dict[str, list[torch.Tensor]] = {n: [] for n in layer_names}
    handles = [stub.get_submodule(n).register_forward_hook(
        lambda mod, args, out, n=n: recorded[n].append(out.detach())) for n in layer_names]
    with torch.inference_mode():
        call_model(stub, inputs)
    for h in handles:
        h.remove()
    for n in layer_names:
        set_submodule(stub, n, _RecordedOutput(recorded[n], getattr(stub.get_submodule(n), "weight", None)))
    return time_model(stub, inputs, warmup, repeats, min_sample_ms, threads, device)


def time_layers_in_model(model: torch.nn.Module, names: list[str], inputs: Any, repeats: int = 20,
                         warmup: int = 3, threads: int | None = None, device: str = "cpu") -> dict[str, float]:
    """Median time of each named submodule inside whole forward passes (hooks around each call): what the layers
    cost in place, next to the profile table's isolated measurements."""
    from mpq.layers import call_model

    starts: dict[str, float] = {}
    samples: dict[str, list[float]] = {n: [] for n in names}
    current: dict[str, float] = {}

    def pre(name):
        def fn(mod, args):
            _sync(device)
            starts[name] = time.perf_counter()
        return fn

    def post(name):
        def fn(mod, args, out):
            _sync(device)
            current[name] = current.get(name, 0.0) + time.perf_counter() - starts[name]
        return fn

    modules = dict(model.named_modules())
    handles = [h for n in names for h in (modules[n].register_forward_pre_hook(pre(n)),
                                          modules[n].register_forward_hook(post(n)))]
    try:
        with num_threads(threads), torch.inference_mode():
            model.eval()
            for i in range(warmup + repeats):
                current.clear()
                call_model(model, inputs)
                if i >= warmup:
                    for n in names:
                        samples[n].append(current.get(n, 0.0) * 1e3)
    finally:
        for h in handles:
            h.remove()
    return {n: statistics.median(s) for n, s in samples.items()}
