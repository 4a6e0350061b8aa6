"""Kill-and-resume benchmark: how much work does a SIGKILL waste?

Runs ``shardeval run`` as a subprocess against the project's test server (in its own
process), SIGKILLs it ``--kills`` times at random moments once it has made progress, reruns
it each time, and lets the last attempt finish. It prints:

* requests sent per unique item (1.00 would be a run that was never killed);
* for every kill, the waste split into
  (a) requests in flight at the kill: the server saw them but never answered (the client
      was gone); a provider bills these, and nothing can save them;
  (b) completed results lost: the server answered 200, but the answer was not stored when
      the process died (on an object store: still in a flush buffer), so the rerun paid for it
      again. On local disk every answer is journaled as it arrives, so (b) should be 0.

(b) is derived per prompt: the server counts 200 answers per prompt, and after each kill the
benchmark reads what the run stored (committed batches and parts) and maps every stored item
key to the prompt it was sent with.

    python benchmarks/crash.py                   # 10 kills, 2,000 items, concurrency 16
    python benchmarks/crash.py --prefect-api http://127.0.0.1:4200/api

Without ``--prefect-api`` (or ``PREFECT_API_URL``) it starts a ``prefect server`` of its own
for the duration (30-60 s on a small machine), so each CLI start does not have to start
Prefect's temporary server.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import compile_sources  # noqa: E402
from shardeval.journal import is_journal, read_journal, with_journals  # noqa: E402
from shardeval.session import RunSession  # noqa: E402
from shardeval.storage import RunStore  # noqa: E402
from shardeval.testing.server import ServerConfig, TestServer, prompt_key  # noqa: E402
from tests.helpers.prefect_server import start_prefect_server, stop_prefect_server  # noqa: E402
from tests.helpers.specs import arith_items, write_spec  # noqa: E402


@contextmanager
def prefect_server(home: Path) -> Iterator[str]:
    """A ``prefect server`` for the benchmark's lifetime; yields its API URL."""
    process, url = start_prefect_server(home)
    try:
        yield url
    finally:
        stop_prefect_server(process)


def prompt_keys_by_item(spec_path: Path) -> tuple[RunStore, dict[str, str]]:
    """The run's store, and item key → the server's prompt key for every request."""
    session = RunSession.prepare(str(spec_path))
    plan = session.plan
    mapping = {}
    for batch in plan.batches:
        for request in plan.requests(batch):
            mapping[request.key] = prompt_key(request.messages)
    return session.store, mapping


def stored_keys(store: RunStore) -> set[str]:
    """Item keys with a final row in committed batches, flushed parts or journals."""
    paths = [store.batch_path(k) for k in store.list_batches()]
    paths += [p for ps in with_journals(store, store.list_parts()).values() for p in ps]
    keys: set[str] = set()
    for path in paths:
        columns = ["item_key", "status"]
        table = (
            read_journal(path, columns)
            if is_journal(path)
            else pq.read_table(path, columns=columns)
        )
        if table is None:
            continue
        for key, status in zip(
            table.column("item_key").to_pylist(), table.column("status").to_pylist(), strict=True
        ):
            if status in ("ok", "error"):
                keys.add(key)
    return keys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--latency-min", type=float, default=0.02)
    parser.add_argument("--latency-max", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--prefect-api", default=os.environ.get("PREFECT_API_URL"))
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    args = parser.parse_args()
    compile_sources()

    work = Path(tempfile.mkdtemp(prefix="shardeval-crash-bench-"))
    try:
        if args.prefect_api:
            return run(args, work, args.prefect_api)
        home = work / "prefect-server"
        home.mkdir()
        print("starting a prefect server for the benchmark...", flush=True)
        with prefect_server(home) as url:
            return run(args, work, url)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")


def run(args: argparse.Namespace, work: Path, prefect_api: str) -> int:
    rng = random.Random(args.seed)
    config = ServerConfig(latency_min=args.latency_min, latency_max=args.latency_max)
    server = TestServer.start_subprocess(config)
    try:
        spec_path = write_spec(
            work,
            base_url=server.url,
            items=arith_items(args.items),
            name="crash-bench",
            batch_size=args.batch_size,
            model={"concurrency": args.concurrency, "max_retries": 1, "timeout_s": 10},
        )
        store, prompt_of = prompt_keys_by_item(spec_path)
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PREFECT_API_URL": prefect_api,
            "PREFECT_HOME": str(work / "prefect-client"),
        }
        command = [sys.executable, "-m", "shardeval", "run", str(spec_path), "--quiet"]
        kills: list[dict[str, Any]] = []
        previous_stats = server.stats()
        stored: set[str] = set()
        started = time.monotonic()
        while len(kills) < args.kills:
            remaining = args.items - len(stored)
            left = args.kills - len(kills)
            # A random moment in this attempt's sending phase, leaving work for later kills.
            low = max(5, remaining // (3 * (left + 1)))
            target = min(rng.randint(low, max(low + 1, remaining // (left + 1))), remaining - 1)
            process = subprocess.Popen(
                command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            base = previous_stats["completions"]
            finished = False
            while True:
                if process.poll() is not None:
                    finished = True
                    break
                at_kill = server.stats()
                if at_kill["completions"] - base >= target:
                    break
                time.sleep(0.005)
            if finished:
                print(f"attempt finished before its kill (exit {process.returncode})")
                break
            process.send_signal(signal.SIGKILL)
            process.wait()
            time.sleep(0.3)  # let the server finish or cancel what was in flight
            stats = server.stats()
            after = stored_keys(store)
            sent = stats["requests"] - previous_stats["requests"]
            newly_stored = {prompt_of[k] for k in after - stored}
            # (b): answered with 200 before the kill, yet not stored after it.
            answered = Counter(at_kill["prompt_completions"]) - Counter(
                previous_stats["prompt_completions"]
            )
            lost = sum(n - (p in newly_stored) for p, n in answered.items())
            # (a): everything else that was sent and not stored was in flight at the kill
            # (the server may still have answered it, to a client that was gone).
            in_flight = sent - len(newly_stored) - lost
            kills.append(
                {
                    "sent": sent,
                    "stored": len(newly_stored),
                    "in_flight": in_flight,
                    "server_in_flight": at_kill["in_flight"],
                    "lost": lost,
                }
            )
            stored, previous_stats = after, stats
        final = subprocess.run(command, env=env, capture_output=True, text=True)
        wall = time.monotonic() - started
        if final.returncode != 0:
            print(final.stdout[-2000:], final.stderr[-2000:])
            return 1
        stats = server.stats()
        results = pq.read_table(store.results_path, columns=["item_key", "status"])
        assert results.num_rows == args.items, results.num_rows
        print_report(args, kills, stats, wall)
        return 0
    finally:
        server.stop()


def print_report(
    args: argparse.Namespace, kills: list[dict[str, Any]], stats: dict[str, Any], wall: float
) -> None:
    n = args.items
    print(
        f"\n{len(kills)} kills · {n:,} items · concurrency {args.concurrency} · batch size "
        f"{args.batch_size} · latency {args.latency_min * 1000:g}-{args.latency_max * 1000:g} ms"
    )
    print(f"{'kill':>4} {'sent':>6} {'stored':>7} {'(a) in flight':>14} {'(b) lost':>9}")
    for i, kill in enumerate(kills, start=1):
        print(
            f"{i:>4} {kill['sent']:>6} {kill['stored']:>7} {kill['in_flight']:>14} "
            f"{kill['lost']:>9}"
        )
    in_flight = sum(k["in_flight"] for k in kills)
    lost = sum(k["lost"] for k in kills)
    completions = stats["completions"]
    print(f"requests sent: {stats['requests']:,} for {n:,} unique items "
          f"= {stats['requests'] / n:.3f} per item")  # fmt: skip
    print(f"answers (200) received: {completions:,} = {completions / n:.3f} per item")
    k = max(len(kills), 1)
    max_a = max((x["in_flight"] for x in kills), default=0)
    max_b = max((x["lost"] for x in kills), default=0)
    print(
        f"waste per kill: (a) in flight at the kill {in_flight / k:.1f} (max {max_a}) · "
        f"(b) completed but lost {lost / k:.1f} (max {max_b})"
    )
    print(f"wall time including {len(kills) + 1} CLI starts: {wall:.0f}s")


if __name__ == "__main__":
    raise SystemExit(main())
