"""What the crash tests share: the CLI started in the background, its output, its progress.

The CLI runs as a subprocess (``python -m shardeval run``) against the session's Prefect server,
so a test can SIGKILL or signal it like a user or an OOM killer would.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shardeval.testing.server import TestServer
from tests.conftest import cli_env
from tests.helpers.specs import write_spec
from tests.helpers.waiting import wait_until

BATCH_SIZE = 50
CONCURRENCY = 16


def crash_spec(directory: Path, server: TestServer, **overrides: Any) -> Path:
    """The crash tests' spec: batches of ``BATCH_SIZE``, ``CONCURRENCY`` requests in flight."""
    return write_spec(
        directory,
        base_url=server.url,
        batch_size=BATCH_SIZE,
        model={"concurrency": CONCURRENCY},
        **overrides,
    )


def start_run(
    spec: Path,
    prefect_api: str,
    logs: Path,
    *args: str,
    new_session: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """``shardeval run SPEC`` in the background, its output in files (a pipe could fill up).

    ``new_session``: the run leads a process group of its own, so a test can signal the
    whole group (``os.killpg``) the way a terminal's Ctrl-C or ``timeout`` does.
    """
    logs.mkdir(parents=True, exist_ok=True)
    n = len(list(logs.glob("*.out")))
    with open(logs / f"{n:02d}.out", "wb") as out, open(logs / f"{n:02d}.err", "wb") as err:
        return subprocess.Popen(
            [sys.executable, "-m", "shardeval", "run", str(spec), "--quiet", *args],
            env=cli_env(prefect_api, **(env or {})),
            stdout=out,
            stderr=err,
            start_new_session=new_session,
        )


def stderr_of(logs: Path) -> str:
    """What the latest attempt printed on stderr, as printed."""
    return sorted(logs.glob("*.err"))[-1].read_text()


def answered_twice(server: TestServer) -> int:
    """How many prompts the server answered more than once (paid twice)."""
    return sum(1 for n in server.stats()["prompt_completions"].values() if n > 1)


def output_of(logs: Path) -> str:
    """Everything the latest attempt printed, whitespace collapsed (the console wraps lines)."""
    last = sorted(logs.glob("*.out"))[-1]
    return " ".join((last.read_text() + last.with_suffix(".err").read_text()).split())


def wait_for_answers(
    server: TestServer, process: subprocess.Popen[bytes], target: int, timeout: float = 120
) -> bool:
    """Wait until the server answered ``target`` more requests; False if the run ended first."""
    base = server.stats()["completions"]
    deadline = time.monotonic() + timeout
    while process.poll() is None:
        if server.stats()["completions"] - base >= target:
            return True
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no progress within {timeout}s")
        time.sleep(0.005)
    return False


def stall(server: TestServer, process: subprocess.Popen[bytes], latency_s: float = 30.0) -> None:
    """Make the server hang on new requests; return once one of those hanging is in flight.

    The latency is drawn when a request arrives, so requests already in flight keep their old,
    short one. Returns when every request that arrived before the change has been answered and
    one that arrived after it is in flight. (A request that arrived while the change was being
    made may still be on its short way.)
    """
    before = server.stats()["requests"]
    server.configure(latency_min=latency_s, latency_max=latency_s)
    after = server.stats()["requests"]

    def stalled() -> bool:
        stats = server.stats()
        return stats["requests"] - stats["in_flight"] >= before and stats["requests"] > after

    wait_until(
        stalled,
        timeout=60,
        what="the server answering what came before the stall",
        every=0.01,
        process=process,
    )
