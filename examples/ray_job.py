"""Submit an mpq search to an existing Ray cluster through Ray's job API, follow its log, and say where the run went.

    python examples/ray_job.py --address http://127.0.0.1:8265 --out /shared/runs/digits -- \
        --model digits-cnn --budget size=0.3 --device cpu

Equivalent to ``ray job submit --address ... --working-dir . -- mpq search --out ... <search arguments>``. The
search's driver runs on the head node, so ``--out`` is a path there (or on storage every node shares); its profile
cache is the head node's ``~/.cache/mpq/profiles.sqlite`` unless ``MPQ_CACHE_DIR`` points at a shared one. The job
API has whatever protection the cluster was started with: keep the dashboard port on 127.0.0.1 (reach it through an
SSH tunnel) or behind your own access control, and use Ray's token authentication (``RAY_AUTH_MODE=token``).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

log = logging.getLogger("mpq.examples.ray_job")


def submit_search(address: str, out: str, search_args: list[str], working_dir: str | None = None,
                  env: dict[str, str] | None = None, timeout_s: float = 3600.0) -> int:
    """Submit ``mpq search --out OUT SEARCH_ARGS`` as a Ray job; stream its log; return 0 when it succeeded."""
    import shlex

    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(address)
    runtime_env: dict = {"env_vars": dict(env or {})}
    if working_dir:
        runtime_env["working_dir"] = working_dir
    entrypoint = "mpq search --out " + shlex.quote(out) + " " + " ".join(map(shlex.quote, search_args))
    job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
    log.info("submitted %s as job %s", entrypoint, job_id)
    deadline, shown = time.monotonic() + timeout_s, 0
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[shown:])
        shown = len(logs)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            log.error("job %s took longer than %g s: stopped", job_id, timeout_s)
            return 1
        time.sleep(1.0)
    log.info("job %s %s; run directory on the head node: %s", job_id, status.value, out)
    return 0 if status == JobStatus.SUCCEEDED else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--address", required=True, help="the cluster's job API, e.g. http://127.0.0.1:8265")
    p.add_argument("--out", required=True, help="run directory, a path on the head node")
    p.add_argument("--working-dir", default=None, help="uploaded to the job (e.g. . for your model's code)")
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("search_args", nargs=argparse.REMAINDER, help="after --: arguments of mpq search")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    rest = args.search_args[1:] if args.search_args[:1] == ["--"] else args.search_args
    return submit_search(args.address, args.out, rest, args.working_dir, timeout_s=args.timeout)


if __name__ == "__main__":
    sys.exit(main())
