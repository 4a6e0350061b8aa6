"""What the benchmarks share: one timed ``shardeval run`` against the bundled test server.

The phases come from the test server's own timestamps (first request, latest answer), read
once after the run. Polling its counters during the run, as earlier versions did, cost the
server and this process CPU in proportion to how long the run took, on the same two cores.
"""

from __future__ import annotations

import argparse
import compileall
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shardeval.testing.server import TestServer

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("shardeval", "tasks", "flows", "tests/helpers")


def compile_sources() -> None:
    """Write the ``.pyc`` files of the project's packages, as installing a wheel does.

    An editable install run under ``PYTHONDONTWRITEBYTECODE=1`` (this machine's environment)
    has none, so every ``shardeval`` command a benchmark times would first compile its own
    imports: a start-up cost that no installed copy pays. Up-to-date files are left alone.
    """
    for package in SOURCES:
        compileall.compile_dir(ROOT / package, quiet=1)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The project's 2,000-item eval (issue #2): 100 ms answers, concurrency 64, batches of 100."""
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=100)


def timed_run(
    spec: Path, server: TestServer, env: dict[str, str], *extra_args: str
) -> dict[str, Any]:
    """Run ``shardeval run SPEC --quiet [extra_args]`` once; wall time and its phases.

    Resets the server's counters first. Returns ``wall_s``, ``to_first_request_s``,
    ``request_phase_s`` (first request to last answer), ``after_last_answer_s`` (NaN when
    no request was made) and ``requests`` (what the server saw).
    """
    server.reset()
    started = time.time()
    result = subprocess.run(
        [sys.executable, "-m", "shardeval", "run", str(spec), "--quiet", *extra_args],
        env=env,
        capture_output=True,
        text=True,
    )
    ended = time.time()
    if result.returncode != 0:
        raise RuntimeError(f"run failed ({result.returncode}): {result.stderr[-3000:]}")
    stats = server.stats()
    first, last = stats["first_request_at"], stats["last_completion_at"]
    nan = float("nan")
    return {
        "wall_s": ended - started,
        "to_first_request_s": first - started if first else nan,
        "request_phase_s": last - first if first and last else nan,
        "after_last_answer_s": ended - last if last else nan,
        "requests": stats["requests"],
    }


def process_tree_cpu_s(pid: int | None) -> float | None:
    """CPU seconds (user + system) ``pid`` and its live descendants have spent (Linux).

    For the servers a benchmark starts beside the client (the test server, a Prefect
    server): their CPU is taken from the same cores as the client's. None without ``/proc``.
    """
    if pid is None or not os.path.isdir("/proc"):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}  # pid -> (parent, cpu seconds)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
    tree, total = {pid}, 0.0
    for candidate in sorted(stats):  # children have larger pids, except after a wrap
        if candidate in tree or stats[candidate][0] in tree:
            tree.add(candidate)
    for member in tree:
        total += stats.get(member, (0, 0.0))[1]
    return total
