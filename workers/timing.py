"""Timing: warm-up, repeats of enough calls to be measurable, median and spread, in the target's deployment mode.

A layer workload is timed the way it runs inside the model (:func:`time_workload`): its weights are as cold as the
rest of the model leaves them (calls rotate over copies of the module whose bytes add up to what the model touches
between two calls of the layer, up to twice the last-level cache; see :func:`rotation_copies`), its input is warm
(the previous layer just wrote it) and it runs on the threads the model runs on. The mode is the target's
(:class:`mpq.target.Target`): ``eager`` times back-to-back calls as the host issues them (on a GPU that is
whichever is slower, the launches or the kernels), ``graph`` replays CUDA graphs (:func:`time_cuda_graph`), and
``compile`` runs what ``torch.compile`` made of the module or model.

Several models compared with each other are timed in interleaved rounds (:func:`time_models`), so that the slow
phases of a shared machine fall on all of them alike rather than on whichever ran during one.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

log = logging.getLogger(__name__)

MODES = ("eager", "graph", "compile")
MAX_COPIES = 64  # weight copies per workload: memory stays bounded for tiny layers of huge models


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


def time_cuda_graph(calls: Sequence[Callable[[], Any]], warmup: int = 3, repeats: int = 15) -> TimingStats:
    """Per-call GPU time of ``calls`` (copies of one workload, rotated over so that their weights are as cold as
    inside the model) replayed from one CUDA graph: :func:`mpq.workers.cuda_timing.time_rotating`, each replay
    running the copies in turn for as many rounds as make it last 2 ms, so that neither launch gaps nor a replay's
    fixed cost (~5 us on an H100) nor L2 hits flatter the time. A sample is one replay (``inner`` its calls)."""
    from mpq.workers.cuda_timing import time_rotating

    calls = list(calls)
    t = time_rotating(lambda i: calls[i % len(calls)], 0, copies=len(calls), replays=max(repeats, 1),
                      warmup=warmup)
    return TimingStats.from_samples(list(t.samples), t.calls)


def time_calls(calls: Sequence[Callable[[], Any]], warmup: int = 3, repeats: int = 15, min_sample_ms: float = 1.0,
               device: str = "cpu", mode: str = "eager") -> TimingStats:
    """Per-call time of ``calls`` (interchangeable copies of one workload), each call going to the next copy.

    ``eager`` and ``compile``: each of ``repeats`` samples times back-to-back calls lasting ``min_sample_ms`` on the
    host clock (synchronised at the end of the sample on a GPU); ``graph``: :func:`time_cuda_graph`."""
    if mode not in MODES:
        raise ValueError(f"timing mode {mode!r} not supported: use one of {', '.join(MODES)}")
    if mode == "graph":
        if not device.startswith("cuda"):
            raise ValueError(f"CUDA-graph timing needs a CUDA device, not {device!r}")
        return time_cuda_graph(calls, warmup, repeats)
    rotation = itertools.cycle(calls)

    def fn() -> Any:
        return next(rotation)()

    with torch.inference_mode():
        inner = _calls_per_sample(fn, max(warmup, 1) * len(calls), min_sample_ms, device)
        return TimingStats.from_samples(_samples(fn, repeats, inner, device), inner)


def time_callable(fn: Callable[[], Any], warmup: int = 3, repeats: int = 15, min_sample_ms: float = 1.0,
                  device: str = "cpu", mode: str = "eager") -> TimingStats:
    """Per-call time of ``fn`` (see :func:`time_calls`)."""
    return time_calls([fn], warmup, repeats, min_sample_ms, device, mode)


@functools.lru_cache(maxsize=None)
def last_level_cache_bytes() -> int:
    """Size of the CPU's last-level data cache, from sysfs (32 MiB where it cannot be read)."""
    level, size = 0, 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            lvl, kind = int((d / "level").read_text()), (d / "type").read_text().strip()
            text = (d / "size").read_text().strip().upper()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not text:
            continue
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1], 1)
        try:
            n = int(text.rstrip("KMG")) * unit
        except ValueError:
            continue
        if lvl > level:
            level, size = lvl, n
    return size or 32 * 2**20


def device_cache_bytes(device: str) -> int:
    """The cache that a layer's weights must overflow to be cold: the CPU's last level, or the GPU's L2."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return getattr(props, "L2_cache_size", 0) or 50 * 2**20
    return last_level_cache_bytes()


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what one call reads besides its input)."""
    return sum(t.numel() * t.element_size() for t in itertools.chain(module.parameters(), module.buffers()))


def rotation_copies(weight_bytes: int, context_bytes: int, cache_bytes: int) -> int:
    """How many copies of a layer to rotate over so that its weights are as cold as inside the model.

    ``context_bytes`` is what the model reads between two calls of the layer (its other weights): at least the cache
    means the layer's weights were evicted, so the copies add up to twice the cache; less means they stay in the
    last level but not nearer, so the copies add up to ``context_bytes``. 0 (no context) times one copy."""
    if weight_bytes <= 0 or context_bytes <= 0:
        return 1
    working = 2 * cache_bytes if context_bytes >= cache_bytes else context_bytes
    return int(min(MAX_COPIES, max(1, math.ceil(working / weight_bytes))))


def time_workload(module: torch.nn.Module, x: Any, device: str = "cpu", mode: str = "eager",
                  context_bytes: int = 0, warmup: int = 3, repeats: int = 15, min_sample_ms: float = 1.0
                  ) -> tuple[TimingStats, int]:
    """Per-call time of ``module(x)`` as it runs inside its model (cold weights by :func:`rotation_copies`, warm
    input, this thread's intra-op threads, the target's ``mode``); returns the stats and the copies rotated over.
    ``compile`` compiles one copy (each copy would be another compilation), so its weights are as warm as a loop of
    one layer leaves them."""
    copies = 1 if mode == "compile" else rotation_copies(module_bytes(module), context_bytes,
                                                         device_cache_bytes(device))
    modules = [module] + [copy.deepcopy(module) for _ in range(copies - 1)]
    if mode == "compile":
        modules = [torch.compile(module)]
    calls = [functools.partial(m, x) for m in modules]
    return time_calls(calls, warmup, repeats, min_sample_ms, device, mode), copies


def model_caller(model: torch.nn.Module, inputs: Any, mode: str = "eager", name: str = "model") -> Callable[[], Any]:
    """One forward pass of ``model`` on ``inputs`` the way the mode runs it: a Python call (``eager``), a replay of
    the whole forward captured as a CUDA graph (``graph``), or the ``torch.compile``d model (``compile``)."""
    from mpq.layers import call_model

    if mode == "eager":
        return lambda: call_model(model, inputs)
    if mode == "compile":
        compiled = torch.compile(model)
        return lambda: call_model(compiled, inputs)
    if mode != "graph":
        raise ValueError(f"timing mode {mode!r} not supported: use one of {', '.join(MODES)}")
    with torch.inference_mode():
        replay = as_cuda_graph(lambda: call_model(model, inputs))
    if replay is None:
        raise ValueError(f"{name}: its forward pass cannot be captured as a CUDA graph (it synchronises or runs "
                         f"on the CPU), so it cannot be deployed in graph mode; use the eager target 'cuda'")
    return replay


def time_models(models: Mapping[str, torch.nn.Module], inputs: Any, warmup: int = 3, repeats: int = 15,
                rounds: int = 5, min_sample_ms: float = 1.0, threads: int | None = None,
                device: str = "cpu", mode: str = "eager") -> dict[str, TimingStats]:
    """End-to-end forward latency of each model on ``inputs`` in the deployment ``mode``, in ``rounds``
    interleaved rounds of samples."""
    per_round = max(1, math.ceil(repeats / rounds))
    with num_threads(threads), torch.inference_mode():
        for m in models.values():
            m.eval()
        fns = {name: model_caller(m, inputs, mode, name) for name, m in models.items()}
        inner = {name: _calls_per_sample(fn, warmup, min_sample_ms, device) for name, fn in fns.items()}
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                samples[name] += _samples(fn, per_round, inner[name], device)
    return {name: TimingStats.from_samples(s, inner[name]) for name, s in samples.items()}


def time_model(model: torch.nn.Module, inputs: Any, warmup: int = 3, repeats: int = 15, min_sample_ms: float = 1.0,
               threads: int | None = None, device: str = "cpu", mode: str = "eager") -> TimingStats:
    """End-to-end forward latency of one model on ``inputs`` with ``threads`` intra-op threads."""
    return time_models({"model": model}, inputs, warmup, repeats, 1, min_sample_ms, threads, device, mode)["model"]


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
                       device: str = "cpu", mode: str = "eager") -> TimingStats:
    """Latency of everything in the forward pass except the named layers (each replaced by its recorded output),
    in the deployment ``mode``: the fixed part of an additive latency model."""
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
    return time_model(stub, inputs, warmup, repeats, min_sample_ms, threads, device, mode)


def time_layers_in_model(model: torch.nn.Module, names: list[str], inputs: Any, repeats: int = 20,
                         warmup: int = 3, threads: int | None = None, device: str = "cpu", mode: str = "eager"
                         ) -> dict[str, float]:
    """Median time of each named submodule inside whole forward passes (hooks around each call): what the layers
    cost in place, next to the profile table's isolated measurements. Eager only: inside a CUDA graph or a compiled
    model a layer has no boundary to time, so other modes give NaN for every layer."""
    from mpq.layers import call_model

    if mode != "eager":
        return {n: float("nan") for n in names}

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
