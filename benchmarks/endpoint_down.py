"""What a dead endpoint costs: connection attempts and time until the run stops sending.

Nothing listens at the endpoint's address. The engine gets ``--requests`` requests at
``--concurrency``; the script prints how many connection attempts it made and how long it
took until its circuit breaker stopped the run (``model.unreachable_after_s``), and checks
that no row would be stored. Without the breaker each request made ``max_retries + 1``
attempts, and each batch task was retried twice more.

    python benchmarks/endpoint_down.py --requests 1000 --concurrency 16 --unreachable-after 30
"""

from __future__ import annotations

import argparse
import socket
import time

from shardeval.engine import Engine
from shardeval.providers.base import ProviderRequest
from shardeval.spec import ModelSpec


def main() -> None:
    """Run the measurement and print one line."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--unreachable-after", type=float, default=30.0)
    parser.add_argument("--max-retries", type=int, default=6)
    args = parser.parse_args()
    with socket.socket() as sock:  # a free port: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = ModelSpec.model_validate(
        {
            "provider": "openai",
            "model": "m",
            "base_url": f"http://127.0.0.1:{port}/v1",
            "concurrency": args.concurrency,
            "max_retries": args.max_retries,
            "unreachable_after_s": args.unreachable_after,
        }
    )
    engine = Engine(model)
    started = time.monotonic()
    futures = [
        engine.submit(
            ProviderRequest(
                key=f"k{i}",
                item_id=str(i),
                messages=[{"role": "user", "content": "hi"}],
                item={},
                trial=0,
            )
        )
        for i in range(args.requests)
    ]
    outcomes = [future.result(timeout=600) for future in futures]
    elapsed = time.monotonic() - started
    engine.close()
    stored = sum(o.is_final for o in outcomes)
    without = args.requests * (args.max_retries + 1)
    print(
        f"{args.requests} requests, concurrency {args.concurrency}, unreachable_after_s "
        f"{args.unreachable_after:g}: {engine.requests_sent} connection attempts "
        f"({engine.requests_sent / args.concurrency:.1f} per slot; {without:,} without the "
        f"breaker, before task retries), stopped after {elapsed:.1f} s, {stored} rows stored"
    )


if __name__ == "__main__":
    main()
