"""Throughput of `shardeval run` against the bundled test server, end to end.

2,000 items, 100 ms per request, concurrency 64: the ideal is N x latency / concurrency
= 3.125 s. Prints, for a standing Prefect server and for Prefect's ephemeral mode:
time to the first model request, the request phase (first request to last answer) and the
whole run, each as a ratio to the ideal, and a fully cached rerun as a fraction of the first
run. Every figure is measured in this one run.

    python benchmarks/throughput.py [--items 2000] [--latency 0.1] [--concurrency 64]
                                    [--prefect-api URL | --no-server]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_eval_arguments, compile_sources, timed_run  # noqa: E402
from shardeval.testing.server import ServerConfig, TestServer  # noqa: E402
from tests.helpers.prefect_server import start_prefect_server, stop_prefect_server  # noqa: E402
from tests.helpers.specs import arith_items, write_spec  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_eval_arguments(parser)
    parser.add_argument("--prefect-api", help="use this running Prefect server")
    parser.add_argument("--no-server", action="store_true", help="ephemeral mode only")
    args = parser.parse_args()
    compile_sources()

    ideal = args.items * args.latency / args.concurrency
    work = Path(tempfile.mkdtemp(prefix="shardeval-bench-"))
    server = TestServer.start_subprocess(ServerConfig(latency_min=args.latency, wrong_every=10))
    prefect_process = None
    modes: list[tuple[str, str | None]] = []
    if not args.no_server:
        api = args.prefect_api
        if api is None:
            prefect_process, api = start_prefect_server(work / "prefect-home")
        modes.append(("standing Prefect server", api))
    modes.append(("ephemeral Prefect", None))
    print(
        f"{args.items} items, latency {args.latency * 1000:.0f} ms, "
        f"concurrency {args.concurrency}, batch size {args.batch_size}: "
        f"ideal N*latency/concurrency = {ideal:.3f} s"
    )
    try:
        for label, api in modes:
            spec_dir = work / label.split()[0]
            spec = write_spec(
                spec_dir,
                base_url=server.url,
                items=arith_items(args.items, seed=hash(label) % 1000),
                name="bench",
                batch_size=args.batch_size,
                model={"concurrency": args.concurrency, "max_retries": 2},
            )
            env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
            env["PYTHONPATH"] = str(ROOT)
            env["PREFECT_HOME"] = str(spec_dir / "prefect-home")
            if api:
                env["PREFECT_API_URL"] = api
            else:  # Prefect's own temporary server, not shardeval's local one (startup.py)
                env["SHARDEVAL_LOCAL_SERVER"] = "0"
            first = timed_run(spec, server, env)
            cached = timed_run(spec, server, env)
            figures = {
                "mode": label,
                "first_request_s": round(first["to_first_request_s"], 2),
                "request_phase_s": round(first["request_phase_s"], 3),
                "request_phase_ratio": round(first["request_phase_s"] / ideal, 3),
                "wall_s": round(first["wall_s"], 2),
                "wall_ratio": round(first["wall_s"] / ideal, 2),
                "requests": first["requests"],
                "cached_rerun_s": round(cached["wall_s"], 2),
                "cached_rerun_fraction": round(cached["wall_s"] / first["wall_s"], 3),
                "cached_rerun_requests": cached["requests"],
            }
            print(json.dumps(figures))
    finally:
        server.stop()
        if prefect_process is not None:
            stop_prefect_server(prefect_process)


if __name__ == "__main__":
    main()
