"""Scale: 20,000 items through the python provider (no network), by batch size and task runner.

For each batch size (50, 200, 1000) and each task runner (threads; Dask with 2 worker
processes) it runs ``shardeval run`` in a subprocess against a standing Prefect server and
prints one JSON line:

* ``items_per_s``: items / the flow run's duration (Prefect's start and end timestamps), and
  ``wall_s``: the whole command, Python and Prefect start-up included;
* ``overhead_ms_per_task``: (flow run duration - the same work done by the library alone,
  without Prefect) / number of batch tasks: the wall-clock time Prefect adds per task
  (threads only: the Dask figure also holds the cluster's start-up);
* ``peak_rss_mib``: the command's process tree (Dask workers included), sampled every 0.1 s;
* ``cached_flow_s``: a rerun where every batch is Cached (metrics.json and results.parquet
  removed first, so the flow runs), ``cached_overhead_ms_per_task`` likewise against the
  library alone on the same complete run, and ``from_storage_s``: the command again on the
  complete run, answered from storage without starting Prefect.

It also measures the SERIALIZABLE isolation's cost: the batch size 50 run again without the
lock manager (``SHARDEVAL_BATCH_LOCKS=0``), and the lock manager's acquire/release alone.

    python benchmarks/scale.py [--items 20000] [--sizes 50,200,1000] [--prefect-api URL]
                               [--no-dask] [--no-lock-variant]

A million items: ``--items 1000000 --sizes 1000 --no-dask --no-lock-variant`` (~10 minutes).

Without ``--prefect-api`` it starts a Prefect server of its own (and stops it at the end).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import compile_sources  # noqa: E402
from tests.helpers.prefect_server import start_prefect_server, stop_prefect_server  # noqa: E402
from tests.helpers.specs import arith_items, write_spec  # noqa: E402

CONCURRENCY = 64


def peak_rss(pid: int, stop: threading.Event, out: list[float]) -> None:
    """Sample the RSS of ``pid`` and all its descendants until ``stop``; keep the maximum."""
    import psutil

    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    peak = 0
    while not stop.wait(0.1):
        try:
            procs = [root, *root.children(recursive=True)]
            total = 0
            for proc in procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            break
        peak = max(peak, total)
    out.append(peak / 2**20)


def run_cli(spec: Path, output: Path, env: dict[str, str], *extra: str) -> dict[str, Any]:
    """Run ``shardeval run``; return its wall time and peak RSS."""
    started = time.monotonic()
    process = subprocess.Popen(
        [sys.executable, "-m", "shardeval", "run", str(spec), "-o", str(output), "--quiet", *extra],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    stop = threading.Event()
    rss: list[float] = []
    sampler = threading.Thread(target=peak_rss, args=(process.pid, stop, rss), daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.monotonic() - started
    stop.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"run failed ({process.returncode}): {stderr[-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": rss[0] if rss else float("nan"), "stdout": stdout}


def last_flow_run_s(api: str) -> float:
    """Duration of the most recent flow run on the server (Prefect's own timestamps)."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.sorting import FlowRunSort

    with SyncPrefectClient(api) as client:
        (flow_run,) = client.read_flow_runs(sort=FlowRunSort.START_TIME_DESC, limit=1)
        assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
        return (flow_run.end_time - flow_run.start_time).total_seconds()


def baseline(spec: Path, output: Path, env: dict[str, str]) -> dict[str, Any]:
    """The same work through the library alone (no Prefect), in a fresh process.

    Then again on the complete run (every batch committed), as the cached rerun's baseline.
    """
    figures: dict[str, Any] = {}
    for key in ("duration_s", "cached_s"):
        result = subprocess.run(
            [sys.executable, __file__, "--baseline", str(spec), str(output)],
            env=env,
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"baseline failed: {result.stderr[-3000:]}")
        measured = json.loads(result.stdout.strip().splitlines()[-1])
        figures[key] = measured["duration_s"]
        figures.setdefault("peak_rss_mib", measured["peak_rss_mib"])
        uncomplete(output)
    return figures


def run_baseline(spec_path: str, output: str) -> None:
    """Validate, plan, run every batch in 8 threads, finalize: what the flow does, minus Prefect."""
    import concurrent.futures
    import resource

    from shardeval.engines import engine_for
    from shardeval.runner import run_batch
    from shardeval.session import RunSession

    started = time.monotonic()
    # The run session without Prefect: the same steps the evaluate flow composes as tasks.
    session = RunSession.prepare(spec_path, output=output)
    with session.attempt(), concurrent.futures.ThreadPoolExecutor(8) as pool:
        for stage in session.stages():
            run = stage.run
            engine = engine_for(run.run_id, run.model)
            futures = [
                pool.submit(run_batch, run.store(), work, engine, run.progress())
                for work, _ in stage.works
            ]
            for future in futures:
                future.result()
        session.finalize()
    duration = time.monotonic() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"duration_s": duration, "peak_rss_mib": peak}))


def uncomplete(output: Path) -> None:
    """Remove metrics.json and results.parquet so the next command runs the flow again."""
    for run_dir in (output / "runs").iterdir():
        (run_dir / "metrics.json").unlink()
        (run_dir / "results.parquet").unlink()


def measure(
    label: str,
    spec: Path,
    work: Path,
    env: dict[str, str],
    api: str,
    n_tasks: int,
    items: int,
    base: dict[str, Any] | None,
    *extra: str,
) -> dict[str, Any]:
    output = work / f"out-{label}-{uuid.uuid4().hex[:6]}"
    first = run_cli(spec, output, env, *extra)
    flow_s = last_flow_run_s(api)
    uncomplete(output)
    cached = run_cli(spec, output, env, *extra)
    cached_flow_s = last_flow_run_s(api)
    stored = run_cli(spec, output, env, *extra)
    figures: dict[str, Any] = {
        "run": label,
        "batch_tasks": n_tasks,
        "items_per_s": round(items / flow_s),
        "flow_s": round(flow_s, 2),
        "wall_s": round(first["wall_s"], 2),
        "peak_rss_mib": round(first["peak_rss_mib"]),
        "cached_flow_s": round(cached_flow_s, 2),
        "cached_wall_s": round(cached["wall_s"], 2),
        "from_storage_s": round(stored["wall_s"], 2),
    }
    if base is not None:
        figures["library_only_s"] = round(base["duration_s"], 2)
        figures["overhead_ms_per_task"] = round(1000 * (flow_s - base["duration_s"]) / n_tasks, 1)
        figures["cached_overhead_ms_per_task"] = round(
            1000 * (cached_flow_s - base["cached_s"]) / n_tasks, 1
        )
    assert "no model call" in cached["stdout"], cached["stdout"]
    shutil.rmtree(output, ignore_errors=True)
    return figures


def lock_micro(work: Path, cycles: int = 2000) -> float:
    """Microseconds per acquire + release of the batch lock manager (no contention)."""
    from tasks.locks import BatchLockManager

    manager = BatchLockManager(work / "locks")
    started = time.perf_counter()
    for i in range(cycles):
        key = f"shardeval-bench-{i}"
        manager.acquire_lock(key, "holder")
        manager.is_lock_holder(key, "holder")
        manager.release_lock(key, "holder")
    return 1e6 * (time.perf_counter() - started) / cycles


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--baseline":
        run_baseline(sys.argv[2], sys.argv[3])
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--sizes", default="50,200,1000")
    parser.add_argument("--prefect-api", help="use this running Prefect server")
    parser.add_argument("--no-dask", action="store_true")
    parser.add_argument(
        "--no-lock-variant", action="store_true", help="skip the run without the lock manager"
    )
    args = parser.parse_args()
    compile_sources()
    sizes = [int(s) for s in args.sizes.split(",")]

    work = Path(tempfile.mkdtemp(prefix="shardeval-scale-"))
    prefect_process = None
    api = args.prefect_api
    if api is None:
        prefect_process, api = start_prefect_server(work / "prefect-home")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api}
    env["PREFECT_HOME"] = str(work / "client-home")
    env["SHARDEVAL_DASK_WORKERS"] = "2"
    items = arith_items(args.items, seed=7)
    print(
        f"{args.items:,} items, python provider (shardeval.testing.models:arith), concurrency "
        f"{CONCURRENCY}, {os.cpu_count()} CPUs, Prefect API {api}",
        flush=True,
    )
    try:
        for size in sizes:
            spec = write_spec(
                work / f"spec-{size}",
                items=items,
                name="scale",
                batch_size=size,
                model={"concurrency": CONCURRENCY},
            )
            n_tasks = (args.items + size - 1) // size
            base = baseline(spec, work / f"baseline-{size}", env)
            shutil.rmtree(work / f"baseline-{size}", ignore_errors=True)
            print(
                json.dumps(
                    {
                        "run": f"library only, batch {size}",
                        **{k: round(v, 2) for k, v in base.items()},
                    }
                ),
                flush=True,
            )
            print(
                json.dumps(
                    measure(
                        f"threads, batch {size}", spec, work, env, api, n_tasks, args.items, base
                    )
                ),
                flush=True,
            )
            if size == min(sizes) and not args.no_lock_variant:
                no_locks = {**env, "SHARDEVAL_BATCH_LOCKS": "0"}
                print(
                    json.dumps(
                        measure(
                            f"threads, batch {size}, no lock manager",
                            spec,
                            work,
                            no_locks,
                            api,
                            n_tasks,
                            args.items,
                            base,
                        )
                    ),
                    flush=True,
                )
            if not args.no_dask:
                print(
                    json.dumps(
                        measure(
                            f"dask x2, batch {size}",
                            spec,
                            work,
                            env,
                            api,
                            n_tasks,
                            args.items,
                            base,
                            "--task-runner",
                            "dask",
                        )
                    ),
                    flush=True,
                )
        print(json.dumps({"lock_acquire_release_us": round(lock_micro(work), 1)}), flush=True)
    finally:
        if prefect_process is not None:
            stop_prefect_server(prefect_process)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
