"""Profiling at 7B scale: the Llama-7B-shaped model (32 blocks, meta device) goes through discovery, its (layer,
option) pairs are deduplicated into unique workloads, and those are measured with 1 and then 2 profilers.

    python bench/profile_scale.py                       # CPU: a 3-node cluster on this machine (2 profiling nodes)
    python bench/profile_scale.py --device cuda --gpus 2  # a GPU host: one profiler actor per GPU, 1 then 2

Writes ``bench/results/profile_scale_<device>.json``: layers, pairs, unique workloads and tasks, wall time and
workloads per second for each profiler count, rows per node, and how the two tables agree (same keys; ratio of
medians). On CPU the two profiling nodes are single-CPU Ray nodes on the same 2-core machine: they share memory
bandwidth, so the speed-up is a lower bound of what two machines give.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, write_result  # noqa: E402

log = logging.getLogger("bench.profile_scale")


def scale_workloads(blocks: int, tokens: int, device: str):
    from mpq.layers import discover_layers
    from mpq.models.shaped import llama7b_task
    from mpq.space import build_search_space
    from mpq.workers import workloads_for

    task = llama7b_task(blocks, tokens)
    inventory = discover_layers(task.model, task.calib[0][0])
    space = build_search_space(inventory, device)
    workloads, by_pair = workloads_for(inventory, space)
    unique = list({w.key: w for w in workloads}.values())
    return {"layers": len(inventory), "pairs": len(by_pair), "unique_workloads": len(unique)}, unique


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--gpus", type=int, default=2, help="with --device cuda: the most profilers to try")
    p.add_argument("--blocks", type=int, default=32)
    p.add_argument("--tokens", type=int, default=16, help="tokens per forward (the workloads' m)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--chunk-size", type=int, default=2)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    import ray

    from mpq.workers import profile_workloads
    from mpq.workers.cluster import Target, ensure_ray, start_local_cluster

    counts, unique = scale_workloads(args.blocks, args.tokens, args.device)
    log.info("%s", counts)
    cluster = None
    if args.device == "cpu":
        cluster = start_local_cluster([{Target.parse("cpu").resource: 1}] * 2, head_cpus=0)
        profilers = [1, 2]
    else:
        ensure_ray()
        profilers = list(range(1, min(args.gpus, int(ray.cluster_resources().get("GPU", 0))) + 1))
    runs, tables = [], {}
    try:
        for n in profilers:
            t0 = time.perf_counter()
            table = profile_workloads(unique, args.device, backend="ray", cache=False, threads=1,
                                      repeats=args.repeats, chunk_size=args.chunk_size, workers=n, progress=True)
            wall = time.perf_counter() - t0
            tables[n] = table.frame.set_index("key")["median_ms"]
            runs.append({"profilers": n, "wall_s": wall, "workloads_per_s": len(unique) / wall,
                         "tasks": table.stats["tasks"], "measured_per_node": table.stats["measured_per_node"],
                         "sum_of_medians_ms": float(tables[n].sum())})
            log.info("%d profilers: %.1f s (%.2f workloads/s), per node %s", n, wall, len(unique) / wall,
                     table.stats["measured_per_node"])
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    base, most = tables[profilers[0]], tables[profilers[-1]]
    ratio = (most.loc[base.index] / base)
    result = {**environment(args.device, 1), **counts, "tokens": args.tokens, "repeats": args.repeats,
              "chunk_size": args.chunk_size, "runs": runs,
              "speedup": runs[0]["wall_s"] / runs[-1]["wall_s"],
              "tables_same_keys": set(base.index) == set(most.index),
              "median_ratio": {"geomean": float(np.exp(np.log(ratio).mean())), "min": float(ratio.min()),
                               "max": float(ratio.max())}}
    path = write_result(f"profile_scale_{args.device}", result)
    log.info("speed-up %d -> %d profilers: %.2fx; wrote %s", profilers[0], profilers[-1], result["speedup"], path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
