"""Output on S3 against output on local disk: wall time and S3 requests per item.

Runs the project's 2,000-item eval (the throughput benchmark's: test server latency 100 ms,
concurrency 64, batches of 100) with ``shardeval run`` as a subprocess, alternately with
``--output`` on local disk and on a local S3 server, ``--rounds`` times each, and prints the
median wall times, their ratio (target <= 1.15; also as the ratio of the fastest rounds and
the median of per-round ratios, which are steadier on a shared machine) and the S3 requests
per item (target: well under 1). ``--latency 0.02`` is a harder variant: the same storage
work in a fifth of the request time. ``--s3-latency S`` puts a proxy in front of the store
that holds every request S seconds (a loopback store answers in ~1 ms, a cloud bucket in tens
of milliseconds).
The requests are counted by the server: SeaweedFS's Prometheus counters, or moto's request
log (``--backend moto``).
A fully stored rerun (answered from storage) is counted too.

Both modes read the dataset from local disk and use one standing Prefect server, so the
difference is the output store alone.

    python benchmarks/s3.py [--items 2000] [--latency 0.1] [--concurrency 64]
                            [--batch-size 100] [--rounds 7] [--backend seaweedfs|moto]
                            [--flush-items N] [--s3-latency S] [--prefect-api URL]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import add_eval_arguments, compile_sources, timed_run  # noqa: E402
from shardeval.testing.server import ServerConfig, TestServer  # noqa: E402
from tests.helpers.prefect_server import start_prefect_server, stop_prefect_server  # noqa: E402
from tests.helpers.specs import arith_items, write_spec  # noqa: E402
from tests.s3.latency_proxy import LatencyProxy  # noqa: E402
from tests.s3.servers import (  # noqa: E402
    MotoBackend,
    S3Backend,
    SeaweedBackend,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_eval_arguments(parser)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--flush-items", type=int, default=None, help="the spec's flush_every_items (default 16)"
    )
    parser.add_argument("--backend", choices=["seaweedfs", "moto"], default="seaweedfs")
    parser.add_argument(
        "--s3-latency", type=float, default=0.0, help="seconds added to every S3 request"
    )
    parser.add_argument("--prefect-api", help="use this running Prefect server")
    args = parser.parse_args()
    compile_sources()

    work = Path(tempfile.mkdtemp(prefix="shardeval-bench-s3-"))
    server = TestServer.start_subprocess(ServerConfig(latency_min=args.latency, wrong_every=10))
    backend: S3Backend = (
        SeaweedBackend(work / "seaweedfs") if args.backend == "seaweedfs" else MotoBackend()
    )
    backend.start()
    bucket = backend.make_bucket("bench")
    store_port = int(backend.endpoint.rsplit(":", 1)[1])
    proxy = LatencyProxy(store_port, args.s3_latency).start() if args.s3_latency else None
    prefect_process = None
    api = args.prefect_api or os.environ.get("PREFECT_API_URL")
    if not api:
        prefect_process, api = start_prefect_server(work / "prefect-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    # The default retries (not the tests' low ones): this measures the normal configuration.
    env.update(backend.env())
    if proxy is not None:
        env["AWS_ENDPOINT_URL"] = proxy.endpoint
    env.pop("SHARDEVAL_STORAGE_RETRIES")
    env.pop("SHARDEVAL_STORAGE_TIMEOUT_S")
    env.update(PYTHONPATH=str(ROOT), PREFECT_API_URL=api, PREFECT_HOME=str(work / "client"))
    ideal = args.items * args.latency / args.concurrency
    print(
        f"{args.items} items, latency {args.latency * 1000:.0f} ms, concurrency "
        f"{args.concurrency}, batch size {args.batch_size}, {args.rounds} rounds, "
        f"S3 = {args.backend} on 127.0.0.1"
        + (f" behind a {args.s3_latency * 1000:.0f} ms proxy" if proxy else "")
        + f"; ideal request phase {ideal:.2f} s"
    )
    figures: dict[str, list[dict[str, float]]] = {"local": [], "s3": []}
    s3_requests: list[Counter[str]] = []
    rerun_requests: Counter[str] = Counter()
    try:
        for round_number in range(args.rounds):
            order = ["local", "s3"] if round_number % 2 == 0 else ["s3", "local"]
            for mode in order:
                spec_dir = work / f"{mode}-{round_number}"
                spec = write_spec(
                    spec_dir,
                    base_url=server.url,
                    items=arith_items(args.items),
                    name="bench",
                    batch_size=args.batch_size,
                    model={"concurrency": args.concurrency, "max_retries": 2},
                    **({"flush_every_items": args.flush_items} if args.flush_items else {}),
                )
                output = (
                    str(spec_dir / "runs") if mode == "local" else f"s3://{bucket}/r{round_number}"
                )
                before = backend.request_counts()
                figures[mode].append(timed_run(spec, server, env, "--output", output))
                if mode == "s3":
                    s3_requests.append(backend.request_counts() - before)
                    if round_number == 0:
                        before = backend.request_counts()
                        timed_run(spec, server, env, "--output", output)
                        rerun_requests = backend.request_counts() - before
                print(f"  round {round_number + 1} {mode}: {figures[mode][-1]['wall_s']:.2f} s")
    finally:
        server.stop()
        if proxy is not None:
            proxy.stop()
        backend.close()
        if prefect_process is not None:
            stop_prefect_server(prefect_process)

    def median(mode: str, key: str) -> float:
        return statistics.median(f[key] for f in figures[mode])

    per_round = [sum(c.values()) for c in s3_requests]
    kinds: Counter[str] = Counter()
    for counts in s3_requests:
        kinds.update(counts)
    result: dict[str, Any] = {
        "backend": args.backend,
        "local_wall_s": round(median("local", "wall_s"), 2),
        "s3_wall_s": round(median("s3", "wall_s"), 2),
        "wall_ratio": round(median("s3", "wall_s") / median("local", "wall_s"), 3),
        # This machine is shared: the fastest round of each mode, and the median of the
        # per-round ratios (each pair ran back to back), are steadier than a ratio of medians.
        "wall_ratio_of_fastest": round(
            min(f["wall_s"] for f in figures["s3"]) / min(f["wall_s"] for f in figures["local"]),
            3,
        ),
        "wall_ratio_median_of_rounds": round(
            statistics.median(
                s3["wall_s"] / local["wall_s"]
                for s3, local in zip(figures["s3"], figures["local"], strict=True)
            ),
            3,
        ),
        "local_request_phase_s": round(median("local", "request_phase_s"), 2),
        "s3_request_phase_s": round(median("s3", "request_phase_s"), 2),
        "local_to_first_request_s": round(median("local", "to_first_request_s"), 2),
        "s3_to_first_request_s": round(median("s3", "to_first_request_s"), 2),
        "local_after_last_answer_s": round(median("local", "after_last_answer_s"), 2),
        "s3_after_last_answer_s": round(median("s3", "after_last_answer_s"), 2),
        "request_phase_ratio": round(
            median("s3", "request_phase_s") / median("local", "request_phase_s"), 3
        ),
        "s3_requests_per_run": per_round,
        "s3_requests_per_item": round(statistics.median(per_round) / args.items, 3),
        "s3_requests_by_kind_per_run": {
            k: round(v / len(s3_requests), 1) for k, v in sorted(kinds.items())
        },
        "model_requests_per_run": [int(f["requests"]) for f in figures["s3"]],
        "rerun_s3_requests": dict(rerun_requests),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
