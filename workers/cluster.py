"""Profiling on a Ray cluster: device targets, one long-lived profiler actor per device slot, and a scheduler that
keeps finished work when a worker or a node dies.

A *target* names a kind of device: ``cpu`` and ``cuda``, or a labelled kind such as ``cuda:h100`` or ``cpu:graviton``.
Nodes say which kinds they offer with a Ray custom resource, ``mpq_device_<kind>`` (``ray start --resources
'{"mpq_device_cuda_h100": 8}'``: one unit per GPU; ``'{"mpq_device_cpu": 1}'``: one CPU profiler per node at a
time, since Ray neither pins nor isolates CPUs and two measurements on one node would slow each other down). Each
profiler actor takes one unit, so it runs only on a node of its kind and never shares a GPU or a CPU node with
another measurement. A cluster whose nodes declare no such resource is still served for the plain targets ``cpu``
and ``cuda`` by Ray's own CPU and GPU counts, with a warning; a labelled target needs its resource.

Actors live for the whole profiling run (a GPU actor pays CUDA start-up once, not per task). The scheduler hands
each ready actor one chunk of workloads at a time and streams results back as they finish, so each is written to
the database before the next arrives. An actor that dies (its process killed, its node removed) gives its chunk
back to the queue and is replaced when its device kind has a free slot; when no node of the kind is left, the run
stops with :class:`DeviceUnavailableError` naming the device, and everything finished is already stored.

Also here: :func:`run_on_target` runs one function on a node of a target (a search's whole-model timings for a
labelled kind), :func:`map_with_shared` fans items out over actors that each hold one copy of a model (frontier
evaluations), :func:`ensure_ray` connects or starts a local cluster bound to 127.0.0.1, and
:func:`start_local_cluster` starts a multi-node one on this machine for trying and testing all of the above.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections import Counter, deque
from typing import Any, Callable

import torch

from mpq.errors import ConfigError, MpqError
from mpq.target import RESOURCE_PREFIX, Target

log = logging.getLogger(__name__)

# Ray binds every port to the loopback address only when it believes it runs a single-machine (Windows/macOS)
# session; this switch is how a cluster that mpq starts itself stays unreachable from the network.
_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class DeviceUnavailableError(MpqError, RuntimeError):
    """No node of the Ray cluster offers the requested kind of device (any more)."""


class WorkerLostError(MpqError, RuntimeError):
    """Ray workers kept dying: more restarts than allowed."""


class WorkerTimeoutError(MpqError, TimeoutError):
    """A Ray worker did not return a result within the allowed time."""


def ensure_ray(address: str | None = None, **init_options: Any):
    """Connect to ``address`` (or ``RAY_ADDRESS``); with neither, start a private local cluster for this process
    that binds only to 127.0.0.1, runs no dashboard and declares this machine's CPU (and GPUs) as mpq device
    resources (``init_options``, e.g. ``num_cpus``, go to ``ray.init``).

    A cluster that someone started on this machine with ``ray start`` is not joined unless named: Ray would attach
    to it by default, and then cannot declare mpq's resources ("When connecting to an existing cluster, resources
    must not be provided"); its nodes would also run mpq's measurements next to their own work. mpq starts its own
    and says how to use the other one (``address='auto'`` or its host:port)."""
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not address:
        _bind_to_localhost()
    try:
        import ray
    except ImportError as e:  # pragma: no cover - ray is a core dependency
        raise ConfigError("Ray is not installed: pip install ray, or profile with backend='inprocess'") from e
    if ray.is_initialized():
        return ray
    if address:
        _check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise DeviceUnavailableError(f"could not reach the Ray cluster at {address!r}: {e}") from e
        return ray
    resources = {Target.parse("cpu").resource: 1}
    if torch.cuda.is_available():
        resources[Target.parse("cuda").resource] = torch.cuda.device_count()
    existing = _existing_local_cluster()
    if existing:
        log.info("a Ray cluster already runs on this machine (%s); mpq starts a private one for this process (to "
                 "profile on that cluster instead, pass address='auto' or --address %s)", existing, existing)
    ray.init(**{"address": "local", "include_dashboard": False, "log_to_driver": False,
                "logging_level": logging.WARNING, "resources": resources, **init_options})
    return ray


def _existing_local_cluster() -> str | None:
    """The address of the cluster ``ray start`` last started on this machine, if its file is there."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # pragma: no cover - older Ray
        return None
    path = get_ray_address_file(None)
    try:
        with open(path) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail fast, naming the address, when nothing listens there (ray.init would retry for minutes)."""
    import socket

    if address.startswith(("http://", "https://")):
        raise DeviceUnavailableError(f"{address!r} is a job-API (dashboard) address; a search connects to the "
                                     f"cluster's GCS address, host:6379, or runs inside `ray job submit`")
    if address == "auto":
        return
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise DeviceUnavailableError(f"Ray address {address!r}: expected host:port (or 'auto')")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise DeviceUnavailableError(f"no Ray cluster answers at {address!r} ({e}): start one (ray start --head) "
                                     f"or leave address/RAY_ADDRESS unset to start a local one") from None


def _bind_to_localhost() -> None:
    """Make the Ray processes this process starts listen on 127.0.0.1 only."""
    os.environ[_LOCAL_ONLY_ENV] = "0"  # read by the Ray processes started from here, and by ray on import
    from ray._private import ray_constants  # ray may be imported already: set the flag it read then, too

    ray_constants.ENABLE_RAY_CLUSTER = False


def start_local_cluster(nodes: list[dict[str, float]], head_cpus: int = 1, object_store_mb: int = 80):
    """A multi-node Ray cluster on this machine, every node on 127.0.0.1, and this process connected to it: one
    single-CPU node per entry of ``nodes`` (its custom resources, e.g. ``{"mpq_device_cpu_a": 1}``), to try (and
    test) the cluster behaviour without a cluster. Returns the ``ray.cluster_utils.Cluster``; ``.shutdown()`` it."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        raise RuntimeError("start_local_cluster: this process is already connected to Ray (ray.shutdown() first)")
    _bind_to_localhost()
    store = object_store_mb * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, "object_store_memory": store,
                                                            "include_dashboard": False})
    cluster.worker_nodes_started = [cluster.add_node(num_cpus=1, resources=dict(r), object_store_memory=store)
                                    for r in nodes]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level=logging.WARNING)
    return cluster


def available_targets(ray) -> dict[str, float]:
    """The device kinds the cluster's live nodes declare, with their total slots."""
    return {k[len(RESOURCE_PREFIX):]: v for k, v in ray.cluster_resources().items() if k.startswith(RESOURCE_PREFIX)}


def _placement(target: Target, threads: int, ray) -> tuple[dict[str, Any], int]:
    """Ray options for one profiler actor of ``target`` and how many such actors the cluster can hold."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    offering = [n for n in nodes if n["Resources"].get(target.resource, 0) >= 1]
    if offering:
        options: dict[str, Any] = {"resources": {target.resource: 1}}
        slots = int(sum(n["Resources"][target.resource] for n in offering))
    elif target.label:
        raise DeviceUnavailableError(
            f"no node of the Ray cluster offers device {target.name!r} (a node declares it with the custom resource "
            f"{target.resource!r}); the cluster offers {sorted(available_targets(ray)) or 'no mpq device resources'}")
    elif target.device == "cuda":
        options, offering = {}, [n for n in nodes if n["Resources"].get("GPU", 0) >= 1]
        slots = int(sum(n["Resources"]["GPU"] for n in offering))
    else:
        options, offering = {}, [n for n in nodes if n["Resources"].get("CPU", 0) >= threads]
        slots = len(offering)
        log.warning("no node declares %r: CPU profilers are placed by CPU count alone, and two may share a node "
                    "(declare the resource with ray start --resources '{\"%s\": 1}')", target.resource,
                    target.resource)
    if not offering:
        raise DeviceUnavailableError(f"no node of the Ray cluster offers device {target.name!r}")
    if target.device == "cuda":
        options.update(num_gpus=1, num_cpus=1)
    else:
        largest = max(n["Resources"].get("CPU", 0) for n in offering)
        if threads > largest:
            raise ConfigError(f"profiling with {threads} threads needs a node of {target.name!r} with {threads} "
                              f"CPUs; the largest has {largest:g}")
        # Ray sets OMP_NUM_THREADS from num_cpus; both are set here on purpose (info() reports what the actor got).
        options.update(num_cpus=threads, runtime_env={"env_vars": {"OMP_NUM_THREADS": str(threads),
                                                                   "MKL_NUM_THREADS": str(threads)}})
    return options, slots


def _slot_resource(target: Target, options: dict[str, Any]) -> str:
    """The resource that ``_placement``'s options place by: the kind's own, else Ray's GPUs or CPUs."""
    return target.resource if "resources" in options else "GPU" if target.device == "cuda" else "CPU"


class ProfilerWorker:
    """One device slot's profiler: set up once (threads, CUDA context), then measures chunk after chunk."""

    def __init__(self, device: str, threads: int, mode: str = "eager"):
        self.device, self.threads, self.mode = device, threads, mode
        torch.set_num_threads(threads)
        if device == "cuda":
            torch.zeros(1, device="cuda")  # create the context now, not inside the first measurement

    def info(self) -> dict[str, Any]:
        from mpq.workers.profiler import fingerprint_with_threads

        return {"node": _node_name(), "pid": os.getpid(), "torch_threads": torch.get_num_threads(),
                "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
                "fingerprint": fingerprint_with_threads(self.device, self.threads, self.mode)}

    def conditions(self, policy: Any = None) -> dict[str, Any]:
        from mpq.workers.profiler import conditions_with_threads

        return conditions_with_threads(self.device, self.threads, policy)

    def measure(self, workloads: list, **settings: Any) -> dict[str, Any]:
        from mpq.workers.profiler import measure_workloads

        settings = {**settings, "mode": settings.get("mode", self.mode)}
        result = measure_workloads(workloads, self.device, self.threads, measured_by=_node_name(), **settings)
        return {**result, "node": _node_name()}


def _node_name() -> str:
    from mpq.workers.fingerprint import host

    try:
        import ray

        return f"{host()}/{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:  # outside a Ray worker
        return host()


class ProfilerPool:
    """Profiler actors for one target; ``run`` schedules chunks over them and survives dying actors and nodes."""

    def __init__(self, target: Target | str, threads: int, address: str | None = None, workers: int | None = None,
                 poll_s: float = 1.0, policy: Any = None, max_restarts: int | None = None):
        self.target = Target.parse(target)
        self.threads = threads
        self.policy = policy
        self.ray = ensure_ray(address)
        self.options, slots = _placement(self.target, threads, self.ray)
        self.max_actors = max(1, min(slots, workers or slots))
        # a chunk that kills every actor it lands on (a crashing kernel) must end, not loop
        self.max_restarts = 3 + 2 * self.max_actors if max_restarts is None else max_restarts
        self.poll_s = poll_s
        self._cls = self.ray.remote(**self.options)(ProfilerWorker)
        self.ready: dict[Any, dict] = {}  # actor -> its info()
        self.starting: dict[Any, Any] = {}  # info ref -> actor
        self.per_node: Counter = Counter()
        self.restarts = 0
        self._id, self._spawned = uuid.uuid4().hex[:6], 0
        self._spawn()  # one to read the fingerprint; run() starts as many more as the work can use

    def __enter__(self) -> ProfilerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for actor in [*self.ready, *self.starting.values()]:
            self.ray.kill(actor)
        self.ready.clear()
        self.starting.clear()

    def _spawn(self) -> None:
        # named, so an operator (or a test) can find the profilers with ray.util.list_named_actors()
        self._spawned += 1
        actor = self._cls.options(name=f"mpq-profiler-{self.target.slug}-{self._id}-{self._spawned}").remote(
            self.target.device, self.threads, self.target.mode)
        self.starting[actor.info.remote()] = actor

    def _slots_now(self) -> int:
        """Units of the resource the actors are placed by, on the nodes alive now."""
        return int(self.ray.cluster_resources().get(_slot_resource(self.target, self.options), 0))

    def _check_device(self, unfinished: int) -> None:
        if self._slots_now() < 1:
            raise DeviceUnavailableError(
                f"no node of the Ray cluster offers device {self.target.name!r} any more ({self.target.resource}); "
                f"{unfinished} workloads were not measured; every finished measurement is in the profile cache")

    def _started(self, ref) -> Any:
        """The actor whose start-up ``ref`` reported, once ready (None if it died starting)."""
        actor = self.starting.pop(ref)
        try:
            self.ready[actor] = self.ray.get(ref)
            return actor
        except self.ray.exceptions.RayActorError:
            self._lost(actor)
            return None

    def _lost(self, actor, chunk: list | None = None) -> None:
        """Drop a dead actor and start another in its place if there is room (at most ``max_restarts`` times)."""
        self.ready.pop(actor, None)
        self.restarts += 1
        if self.restarts > self.max_restarts:
            what = "" if not chunk else (f"; the last one was measuring {len(chunk)} workloads, the first "
                                         f"{getattr(chunk[0], 'kind', '?')} {getattr(chunk[0], 'option', '')} "
                                         f"weight {getattr(chunk[0], 'weight_shape', '?')}")
            raise WorkerLostError(
                f"{self.restarts} {self.target.spec} profilers died (at most {self.max_restarts} restarts are "
                f"allowed){what}; every finished measurement is in the profile cache")
        self._refill()

    def _refill(self) -> None:
        """Start an actor if the device kind has a slot that none of ours holds or waits for."""
        if len(self.ready) + len(self.starting) < min(self.max_actors, self._slots_now()):
            self._spawn()

    def fingerprint(self, timeout_s: float = 600.0) -> dict[str, Any]:
        """The device fingerprint of the first actor to come up."""
        deadline = time.monotonic() + timeout_s
        while not self.ready:
            if not self.starting:
                self._check_device(0)
                self._spawn()
            done, _ = self.ray.wait(list(self.starting), num_returns=1, timeout=self.poll_s)
            if done:
                self._started(done[0])
            else:
                self._check_device(0)
            if time.monotonic() > deadline:
                raise DeviceUnavailableError(f"no profiler for {self.target.name!r} started in {timeout_s:g} s")
        return next(iter(self.ready.values()))["fingerprint"]

    def conditions(self) -> dict[str, Any]:
        """The reference workload's speed and the load on the first ready actor's node now."""
        self.fingerprint()
        actor = next(iter(self.ready))
        return self.ray.get(actor.conditions.remote(self.policy))

    def run(self, chunks: list[list], settings: dict[str, Any], collect: Callable[[dict], None]) -> None:
        """Measure every chunk on some actor; ``collect`` gets each result as it arrives."""
        from mpq.workers.profiler import WorkloadError

        ray = self.ray
        while len(self.ready) + len(self.starting) < min(self.max_actors, len(chunks)):
            self._spawn()
        queue, running, idle = deque(chunks), {}, list(self.ready)
        try:
            while queue or running:
                while queue and idle:
                    actor, chunk = idle.pop(), queue.popleft()
                    running[actor.measure.remote(chunk, **settings)] = (actor, chunk)
                waiting = [*running, *self.starting]
                done, _ = ray.wait(waiting, num_returns=1, timeout=self.poll_s) if waiting else ([], [])
                if not done:
                    if not running:
                        self._check_device(sum(map(len, queue)))
                        if not self.starting:
                            self._refill()
                    continue
                ref = done[0]
                if ref in self.starting:
                    actor = self._started(ref)
                    if actor is not None:
                        idle.append(actor)
                    continue
                actor, chunk = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    node = self.ready.get(actor, {}).get("node", "?")
                    log.warning("the %s profiler on %s died (%s); its %d workloads go back to the queue",
                                self.target.name, node, type(e).__name__, len(chunk))
                    queue.appendleft(chunk)
                    self._lost(actor, chunk)
                    if not self.ready and not self.starting:
                        self._check_device(sum(map(len, queue)))
                    continue
                except ray.exceptions.RayTaskError as e:
                    for other in running:
                        ray.cancel(other)
                    cause = getattr(e, "cause", None)
                    raise WorkloadError(str(cause) if isinstance(cause, WorkloadError) else
                                        f"a profiling task failed: {e}") from None
                self.per_node[result["node"]] += len(result["rows"])
                collect(result)
                idle.append(actor)
        finally:
            for ref in running:
                ray.cancel(ref)


def runs_remotely(target: Target | str, backend: str) -> bool:
    """Whether a search's whole-model measurements for ``target`` go to a node of that kind: for a labelled kind on
    Ray (the driver's own machine need not be one), and for ``cuda`` when this machine has no GPU."""
    target = Target.parse(target)
    return backend == "ray" and (target.label is not None or (target.device == "cuda" and
                                                              not torch.cuda.is_available()))


def run_on_target(fn: Callable[..., Any], /, *args: Any, target: Target | str, backend: str, cpus: int,
                  address: str | None = None, **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` on a node of ``target`` (one Ray task placed like a profiler holding ``cpus`` CPUs,
    its arguments shipped through the object store), or here when :func:`runs_remotely` says no."""
    target = Target.parse(target)
    if not runs_remotely(target, backend):
        return fn(*args, **kwargs)
    ray = ensure_ray(address)
    options, _ = _placement(target, cpus, ray)
    log.info("running %s on a %s node", getattr(fn, "__name__", fn), target.name)
    ref = ray.remote(max_retries=3, **options)(fn).remote(*args, **kwargs)
    while True:
        done, _ = ray.wait([ref], timeout=2.0)
        if done:
            return ray.get(ref)
        if ray.cluster_resources().get(_slot_resource(target, options), 0) < 1:
            ray.cancel(ref, force=True)
            raise DeviceUnavailableError(f"no node of the Ray cluster offers device {target.name!r} any more")


class _Holder:
    """An actor's state (``setup(shared)``, or ``shared`` itself), and the function applied to each item with it."""

    def __init__(self, fn: Callable[[Any, Any], Any], shared: Any, setup: Callable[[Any], Any] | None = None):
        self.fn, self.state = fn, shared if setup is None else setup(shared)

    def call(self, item: Any) -> Any:
        return self.fn(self.state, item)

    def ready(self) -> bool:
        return True


class SharedActorPool:
    """Ray actors (one CPU each) that each hold one copy of ``shared``, put in the object store once (a model, its
    data, an evaluator), kept up across :meth:`map` calls: a search that measures a few configs at a time (the
    ``ilp+refine`` generations) ships the model once, not once per generation. An actor's state is
    ``setup(shared)``, built once per actor, or ``shared`` itself. Actors start on the first map that needs them
    (at most ``workers``: default, the CPUs Ray has free) and are killed by :meth:`close` (or the ``with`` block).

    An actor that dies gives its item back to the queue and is replaced, at most ``max_restarts`` times over the
    pool's life (default: twice the number of actors, at least 3): then :class:`WorkerLostError` names the item it
    was on. An item that takes longer than ``item_timeout_s`` (counted once its actor is up; None waits for ever)
    ends the map with :class:`WorkerTimeoutError` naming it, as does an actor not up within ``startup_timeout_s``.
    An exception raised by ``fn`` propagates."""

    def __init__(self, fn: Callable[[Any, Any], Any], shared: Any, workers: int | None = None,
                 address: str | None = None, setup: Callable[[Any], Any] | None = None,
                 max_restarts: int | None = None, item_timeout_s: float | None = 3600.0,
                 startup_timeout_s: float = 600.0):
        self.ray = ensure_ray(address)
        self.size = max(1, workers or int(self.ray.available_resources().get("CPU", 1)))
        self.limit = max(3, 2 * self.size) if max_restarts is None else max_restarts
        self.fn, self.setup, self.shared_ref = fn, setup, self.ray.put(shared)
        self.cls = self.ray.remote(num_cpus=1)(_Holder)
        self.name = getattr(fn, "__name__", repr(fn))
        self.item_timeout_s, self.startup_timeout_s = item_timeout_s, startup_timeout_s
        self.idle: list = []
        self._starting: list = []  # killed by close() even if their setup never finished
        self.restarts = 0

    def __enter__(self) -> SharedActorPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for actor in [*self._starting, *self.idle]:
            self.ray.kill(actor)
        self._starting, self.idle = [], []

    def _started(self, count: int) -> list:
        """``count`` new actors, once each is up (its ``setup`` done), so that item time is the item's own."""
        ray = self.ray
        new = [self.cls.remote(self.fn, self.shared_ref, self.setup) for _ in range(count)]
        self._starting.extend(new)
        pending = {a.ready.remote(): a for a in new}
        deadline = time.monotonic() + self.startup_timeout_s
        while pending:
            done, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
            for ref in done:
                pending.pop(ref)
                ray.get(ref)  # a setup that raised propagates its error
            if pending and time.monotonic() > deadline:
                raise WorkerTimeoutError(f"map_with_shared({self.name}): {len(pending)} Ray workers did not start "
                                         f"within {self.startup_timeout_s:g} s")
        for a in new:
            self._starting.remove(a)
        return new

    def map(self, items: list, on_result: Callable[[int, Any], None] | None = None) -> list:
        """``[fn(state, item) for item in items]`` on the pool's actors; ``on_result(i, value)`` hears of each
        result as it arrives (the results that arrived went there whatever error ends the map)."""
        if not items:
            return []
        ray, name = self.ray, self.name
        missing = min(self.size, len(items)) - len(self.idle)
        if missing > 0:
            self.idle.extend(self._started(missing))
        queue, running, results = deque(range(len(items))), {}, {}
        try:
            while queue or running:
                while queue and self.idle:
                    actor, i = self.idle.pop(), queue.popleft()
                    running[actor.call.remote(items[i])] = (actor, i, time.monotonic())
                done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                if not done:
                    if self.item_timeout_s is not None:
                        for _, i, since in running.values():
                            if time.monotonic() - since > self.item_timeout_s:
                                raise WorkerTimeoutError(
                                    f"map_with_shared({name}): item {i} ran for more than {self.item_timeout_s:g} s "
                                    f"on a Ray worker without returning; {len(results)} of {len(items)} items had "
                                    f"finished")
                    continue
                actor, i, _ = running.pop(done[0])
                try:
                    results[i] = ray.get(done[0])
                except ray.exceptions.RayActorError as e:
                    self.restarts += 1
                    if self.restarts > self.limit:
                        raise WorkerLostError(
                            f"map_with_shared({name}): {self.restarts} Ray workers died (at most {self.limit} "
                            f"restarts are allowed), the last one on item {i} ({type(e).__name__}); "
                            f"{len(results)} of {len(items)} items had finished") from None
                    log.warning("a Ray worker died on item %d (%d of %d restarts); the item goes back to the queue",
                                i, self.restarts, self.limit)
                    ray.kill(actor)
                    queue.appendleft(i)
                    actor = self._started(1)[0]
                except ray.exceptions.RayTaskError as e:
                    self.idle.append(actor)  # the item failed, not the actor: close() or the next map has it
                    raise (e.cause if isinstance(getattr(e, "cause", None), Exception) else e) from None
                else:
                    if on_result is not None:
                        on_result(i, results[i])
                self.idle.append(actor)
        except BaseException:
            for actor, _, _ in running.values():  # busy on an item nobody will read: not reusable
                ray.kill(actor)
            raise
        return [results[i] for i in range(len(items))]


def map_with_shared(fn: Callable[[Any, Any], Any], shared: Any, items: list, workers: int | None = None,
                    address: str | None = None, setup: Callable[[Any], Any] | None = None,
                    on_result: Callable[[int, Any], None] | None = None, max_restarts: int | None = None,
                    item_timeout_s: float | None = 3600.0, startup_timeout_s: float = 600.0) -> list:
    """``[fn(state, item) for item in items]`` on Ray actors that each hold one copy of ``shared``, started for this
    call and killed after it: one :meth:`SharedActorPool.map` (whose docstring says how failures are handled), with
    at most ``len(items)`` actors."""
    if not items:
        return []
    ray = ensure_ray(address)
    workers = min(workers or int(ray.available_resources().get("CPU", 1)), len(items))
    with SharedActorPool(fn, shared, workers, address, setup, max_restarts, item_timeout_s,
                         startup_timeout_s) as pool:
        return pool.map(items, on_result)
