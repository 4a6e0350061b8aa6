"""A fast endpoint: shardeval's request phase against a bare aiohttp loop, side by side.

The test server answers in 1 ms, so the client's CPU per request sets the pace. For each
concurrency (64 and 256 by default) and each repeat, it runs, interleaved, in one process each:

* a bare aiohttp loop (one session, a semaphore, the same bodies shardeval sends), and
* ``shardeval run`` (20,000 items, batch 500) against a standing Prefect server (one the
  script starts, with the settings shardeval's local server runs with unless
  ``--prefect-settings defaults``; or ``--prefect-api URL``),

and times both request phases from the server's own timestamps (first request to last
answer, :mod:`shardeval.testing.server_stats`). It prints one JSON line per run and one
summary per concurrency: the median ratio shardeval / bare of the time per request (1.0 = as
fast as the bare client; per request, because shardeval sends the dataset's few repeated
prompts once). ``ideal_ratio`` is shardeval's request phase over N x latency / concurrency,
N the requests it sent: with
``--latency 0.1 --items 6000 --batch-size 200 --concurrency 64`` that is issue 12's second
target (<= 1.15).
The machine's load average is printed with every figure: the ratios, not the absolute
times, are what compares across loads. On a loaded machine the request phases swing with
the load (the bare client too), so each line also gives the CPU each process spent per
request at the margin (its CPU time minus that of the same command over one item, divided
by the items): ``cpu_ratio`` = shardeval's / the bare client's, a figure the load moves
much less. ``*_run_cpu_ms_per_request`` adds the processes beside the client (the test server,
and the Prefect server when the script started it), and ``two_core_floor_ratio`` is the ratio
those CPU costs alone allow on this machine's cores (each run's time per request is at least
its client's CPU, bound by one GIL, and at least all its processes' CPU over the cores): a
ratio at its floor can only improve by spending less CPU, not by scheduling it better.

    python benchmarks/fast.py [--items 20000] [--latency 0.001] [--concurrency 64,256]
                              [--batch-size 500] [--repeats 2] [--prefect-api URL]
                              [--prefect-settings shardeval|defaults]
                              [--also CHECKOUT]

``--also CHECKOUT`` runs ``shardeval`` from another checkout too (``PYTHONPATH=CHECKOUT``),
interleaved with the others: a before/after in one run. Start the script from outside both
checkouts (``cd /tmp``): ``python -m`` puts the working directory first on ``sys.path``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import compile_sources, process_tree_cpu_s, timed_run  # noqa: E402
from shardeval.testing.server import ServerConfig, TestServer  # noqa: E402
from tests.helpers.prefect_server import start_prefect_server, stop_prefect_server  # noqa: E402
from tests.helpers.specs import arith_items, write_spec  # noqa: E402

SYSTEM = "Answer with the number only."


async def _bare(url: str, items_path: Path, concurrency: int) -> None:
    """POST every item's chat completion, ``concurrency`` at a time, with one aiohttp session."""
    import aiohttp

    items = [json.loads(line) for line in items_path.read_text().splitlines() if line]
    semaphore = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(item: dict[str, Any]) -> None:
            body = {
                "temperature": 0,
                "model": "test-model",
                "messages": [
                    {"role": "system", "content": SYSTEM},
                    {"role": "user", "content": f"What is {item['a']} + {item['b']}?"},
                ],
            }
            async with semaphore, session.post(url + "/chat/completions", json=body) as response:
                json.loads(await response.text())

        await asyncio.gather(*(one(item) for item in items))


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 3) for name, value in figures.items()}


def children_cpu_s() -> float:
    """CPU seconds (user + system) of this script's finished subprocesses so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Neighbours:
    """The processes beside the client on the same cores: the test server, a Prefect server.

    Their CPU per request, with the client's, bounds a request phase from below on a machine
    of ``os.cpu_count()`` cores (see ``two_core_floor_ratio`` in :func:`main`).
    """

    def __init__(self, server: TestServer, prefect: subprocess.Popen[bytes] | None) -> None:
        self.pids = {"test_server": server.pid, "prefect_server": prefect.pid if prefect else None}

    def cpu_s(self) -> dict[str, float | None]:
        return {name: process_tree_cpu_s(pid) for name, pid in self.pids.items()}


def _spent(before: dict[str, float | None], after: dict[str, float | None]) -> dict[str, float]:
    return {
        name: end - start
        for name, end in after.items()
        if end is not None and (start := before[name]) is not None
    }


def bare_run(
    server: TestServer, items_path: Path, concurrency: int, neighbours: Neighbours
) -> dict[str, Any]:
    """The bare client in a subprocess of its own (like the CLI); its request phase and CPU."""
    server.reset()
    started, cpu, around = time.time(), children_cpu_s(), neighbours.cpu_s()
    subprocess.run(
        [sys.executable, __file__, "--bare", server.url, str(items_path), str(concurrency)],
        check=True,
    )
    stats = server.stats()
    first, last = stats["first_request_at"], stats["last_completion_at"]
    return {
        "wall_s": time.time() - started,
        "cpu_s": children_cpu_s() - cpu,
        "neighbours_cpu_s": _spent(around, neighbours.cpu_s()),
        "request_phase_s": last - first,
        "requests": stats["requests"],
    }


def cpu_of_run(
    spec: Path, server: TestServer, env: dict[str, str], neighbours: Neighbours, *extra_args: str
) -> dict[str, Any]:
    """:func:`timed_run` plus the CPU seconds the ``shardeval run`` process and its neighbours
    spent."""
    cpu, around = children_cpu_s(), neighbours.cpu_s()
    result = timed_run(spec, server, env, *extra_args)
    return {
        **result,
        "cpu_s": children_cpu_s() - cpu,
        "neighbours_cpu_s": _spent(around, neighbours.cpu_s()),
    }


def per_request_ms(run: dict[str, Any], fixed: dict[str, Any]) -> dict[str, float]:
    """CPU per request at the margin (the run's minus the one-item run's), by process."""
    spent = {"client": run["cpu_s"] - fixed["cpu_s"]}
    for name, seconds in run["neighbours_cpu_s"].items():
        spent[name] = seconds - fixed["neighbours_cpu_s"].get(name, 0.0)
    requests = max(1, run["requests"] - fixed["requests"])
    return {name: 1000 * seconds / requests for name, seconds in spent.items()}


def seconds_per_request(run: dict[str, Any]) -> float:
    """The request phase over the requests the server saw.

    The datasets repeat a few prompts (``arith_items`` draws its sums at random), which
    shardeval sends once (identical requests, issue 12) and the bare client sends every time:
    ~1% fewer requests. Ratios compare time per request, so that saving does not count.
    """
    return float(run["request_phase_s"]) / max(1, int(run["requests"]))


def floor_ms(cpu_ms: dict[str, float], cores: int) -> float:
    """The shortest time per request these CPU costs allow: one process's own CPU (the client
    is bound by one GIL), or all of them spread over every core."""
    return max(cpu_ms["client"], sum(cpu_ms.values()) / cores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=20_000)
    parser.add_argument("--latency", type=float, default=0.001)
    parser.add_argument("--concurrency", default="64,256")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prefect-api", default=os.environ.get("PREFECT_API_URL"))
    parser.add_argument(
        "--prefect-settings",
        choices=("shardeval", "defaults"),
        default="shardeval",
        help="the standing Prefect server the script starts (without --prefect-api): with the "
        "settings shardeval's local server runs with (task runs recorded in batches), or "
        "with Prefect's defaults",
    )
    parser.add_argument(
        "--also",
        metavar="CHECKOUT",
        help="also run shardeval from this checkout (e.g. a worktree of the previous version), "
        "interleaved, and print its ratio too",
    )
    parser.add_argument("--bare", nargs=3, metavar=("URL", "ITEMS", "C"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        url, items, concurrency = args.bare
        asyncio.run(_bare(url, Path(items), int(concurrency)))
        return
    compile_sources()

    work = Path(tempfile.mkdtemp(prefix="shardeval-fast-"))
    server = TestServer.start_subprocess(ServerConfig(latency_min=args.latency))
    prefect_process = None
    api = args.prefect_api
    if api is None:
        prefect_process, api = start_prefect_server(
            work / "prefect-home", shardeval_settings=args.prefect_settings == "shardeval"
        )
    neighbours = Neighbours(server, prefect_process)
    print(
        f"{args.items} items, latency {args.latency * 1000:g} ms, batch size {args.batch_size}, "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, Prefect server: "
        + (args.prefect_api or f"started here, {args.prefect_settings} settings")
    )
    try:
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            # The fixed CPU of each command (start-up, Prefect, finalizing): one item.
            one = work / f"c{concurrency}-one"
            one_spec = write_spec(
                one,
                base_url=server.url,
                items=arith_items(1, seed=1),
                name="fast-one",
                batch_size=args.batch_size,
                model={"concurrency": concurrency, "max_retries": 2},
            )
            one_env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api}
            one_env["PREFECT_HOME"] = str(one / "prefect-home")
            bare_fixed = bare_run(server, one / "items.jsonl", concurrency, neighbours)
            ours_fixed = cpu_of_run(one_spec, server, one_env, neighbours)
            also_env = {**one_env, "PYTHONPATH": args.also or ""}
            also_fixed = 0.0
            if args.also:
                also_fixed = cpu_of_run(one_spec, server, also_env, neighbours, "--fresh")["cpu_s"]
            ratios = []
            for repeat in range(args.repeats):
                directory = work / f"c{concurrency}-{repeat}"
                spec = write_spec(
                    directory,
                    base_url=server.url,
                    items=arith_items(args.items, seed=concurrency * 10 + repeat),
                    name="fast",
                    batch_size=args.batch_size,
                    model={"concurrency": concurrency, "max_retries": 2},
                )
                env = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_API_URL": api}
                env["PREFECT_HOME"] = str(directory / "prefect-home")
                bare = bare_run(server, directory / "items.jsonl", concurrency, neighbours)
                ours = cpu_of_run(spec, server, env, neighbours)
                ratio = seconds_per_request(ours) / seconds_per_request(bare)
                bare_ms = per_request_ms(bare, bare_fixed)
                ours_ms = per_request_ms(ours, ours_fixed)
                bare_cpu_ms, ours_cpu_ms = bare_ms["client"], ours_ms["client"]
                cores = os.cpu_count() or 1
                ratios.append(ratio)
                other: dict[str, Any] = {}
                if args.also:
                    cpu = children_cpu_s()
                    theirs = timed_run(spec, server, {**env, "PYTHONPATH": args.also}, "--fresh")
                    also_cpu_ms = (
                        1000 * (children_cpu_s() - cpu - also_fixed) / max(1, theirs["requests"])
                    )
                    other = {
                        "also_cpu_ms_per_request": round(also_cpu_ms, 3),
                        "also_cpu_ratio": round(also_cpu_ms / bare_cpu_ms, 2),
                        "also_req_per_s": round(1 / seconds_per_request(theirs)),
                        "also_ratio": round(
                            seconds_per_request(theirs) / seconds_per_request(bare), 2
                        ),
                    }
                print(
                    json.dumps(
                        {
                            "concurrency": concurrency,
                            "repeat": repeat,
                            "bare_req_per_s": round(1 / seconds_per_request(bare)),
                            "shardeval_req_per_s": round(1 / seconds_per_request(ours)),
                            "bare_requests": bare["requests"],
                            "shardeval_requests": ours["requests"],
                            "ratio": round(ratio, 2),
                            "bare_cpu_ms_per_request": round(bare_cpu_ms, 3),
                            "shardeval_cpu_ms_per_request": round(ours_cpu_ms, 3),
                            "cpu_ratio": round(ours_cpu_ms / bare_cpu_ms, 2),
                            "bare_run_cpu_ms_per_request": _rounded(bare_ms),
                            "shardeval_run_cpu_ms_per_request": _rounded(ours_ms),
                            "two_core_floor_ratio": round(
                                floor_ms(ours_ms, cores) / floor_ms(bare_ms, cores), 2
                            ),
                            "ideal_ratio": round(
                                ours["request_phase_s"]
                                / (ours["requests"] * args.latency / concurrency),
                                2,
                            ),
                            "load_average": round(os.getloadavg()[0], 1),
                            **other,
                        }
                    ),
                    flush=True,
                )
            print(
                json.dumps(
                    {
                        "concurrency": concurrency,
                        "median_ratio": round(statistics.median(ratios), 2),
                        "target": 1.5,
                    }
                ),
                flush=True,
            )
    finally:
        server.stop()
        if prefect_process is not None:
            stop_prefect_server(prefect_process)


if __name__ == "__main__":
    main()
