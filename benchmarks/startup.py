"""Start-up in the default mode: shardeval's local Prefect server against a standing server.

The 2,000-item eval (100 ms answers, concurrency 64, batches of 100; ideal N x latency /
concurrency = 3.125 s) end to end, with no ``PREFECT_API_URL`` (the default: shardeval's local
Prefect server, already started by an earlier run, as on any machine that has run shardeval
before) and against a standing ``prefect server`` given by ``PREFECT_API_URL`` (started here
with the local server's settings), interleaved round by round in this one run; optionally
Prefect's ephemeral mode (``SHARDEVAL_LOCAL_SERVER=0``, what the default was before). Prints
per mode the median of ``--rounds`` runs of the whole command and of the time to the first
model request (from the test server's own timestamps), and the ratios the targets are about:
default mode / standing server (target <= 1.25) and default mode / ideal (target <= 2.5).
The very first run, which starts the local server, is timed too, and reported apart.

    python benchmarks/startup.py [--rounds 3] [--no-ephemeral] [--items 2000] [--latency 0.1]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_eval_arguments, compile_sources, timed_run  # noqa: E402
from shardeval.local_server import stop_local_server  # noqa: E402
from shardeval.testing.server import ServerConfig, TestServer  # noqa: E402
from tests.helpers.prefect_server import start_prefect_server, stop_prefect_server  # noqa: E402
from tests.helpers.specs import arith_items, write_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_eval_arguments(parser)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-ephemeral", action="store_true", help="skip Prefect's own mode")
    args = parser.parse_args()
    compile_sources()

    ideal = args.items * args.latency / args.concurrency
    work = Path(tempfile.mkdtemp(prefix="shardeval-startup-"))
    home = work / "shardeval-home"
    server = TestServer.start_subprocess(ServerConfig(latency_min=args.latency, wrong_every=10))
    # The standing server runs as the local server does: the modes differ in start-up only.
    prefect_process, api = start_prefect_server(
        work / "standing-prefect-home", shardeval_settings=True
    )
    base = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    base.update(PYTHONPATH=str(ROOT), SHARDEVAL_HOME=str(home))
    modes: dict[str, dict[str, str]] = {
        "standing server": {**base, "PREFECT_API_URL": api},
        "default (local server)": dict(base),
    }
    if not args.no_ephemeral:
        modes["ephemeral (SHARDEVAL_LOCAL_SERVER=0)"] = {**base, "SHARDEVAL_LOCAL_SERVER": "0"}
    print(
        f"{args.items} items, latency {args.latency * 1000:.0f} ms, concurrency "
        f"{args.concurrency}, batch size {args.batch_size}: ideal = {ideal:.3f} s"
    )
    counter = 0

    def one_run(label: str) -> dict[str, Any]:
        nonlocal counter
        counter += 1
        spec = write_spec(
            work / f"run-{counter:02d}",
            base_url=server.url,
            items=arith_items(args.items, seed=counter),  # a new run, no cache to hit
            name="bench",
            batch_size=args.batch_size,
            model={"concurrency": args.concurrency, "max_retries": 2},
        )
        env = dict(modes[label])
        env["PREFECT_HOME"] = str(work / f"client-home-{counter:02d}")
        return timed_run(spec, server, env)

    try:
        first = one_run("default (local server)")
        print(
            json.dumps(
                {
                    "mode": "default, first run ever (starts the local server)",
                    "wall_s": round(first["wall_s"], 2),
                    "first_request_s": round(first["to_first_request_s"], 2),
                }
            )
        )
        timings: dict[str, list[dict[str, Any]]] = {label: [] for label in modes}
        for _ in range(args.rounds):
            for label in modes:
                timings[label].append(one_run(label))
        medians = {
            label: {
                "wall_s": statistics.median(r["wall_s"] for r in runs),
                "first_request_s": statistics.median(r["to_first_request_s"] for r in runs),
                "request_phase_s": statistics.median(r["request_phase_s"] for r in runs),
            }
            for label, runs in timings.items()
        }
        for label, figures in medians.items():
            walls = sorted(round(r["wall_s"], 2) for r in timings[label])
            print(
                json.dumps(
                    {
                        "mode": label,
                        "wall_s_median": round(figures["wall_s"], 2),
                        "wall_s_all": walls,
                        "wall_vs_ideal": round(figures["wall_s"] / ideal, 2),
                        "first_request_s_median": round(figures["first_request_s"], 2),
                        "request_phase_vs_ideal": round(figures["request_phase_s"] / ideal, 3),
                    }
                )
            )
        default, standing = medians["default (local server)"], medians["standing server"]
        print(
            json.dumps(
                {
                    "default_vs_standing_wall": round(default["wall_s"] / standing["wall_s"], 3),
                    "default_vs_ideal_wall": round(default["wall_s"] / ideal, 2),
                    "default_first_request_s": round(default["first_request_s"], 2),
                }
            )
        )
    finally:
        server.stop()
        stop_local_server(home)
        stop_prefect_server(prefect_process)


if __name__ == "__main__":
    main()
