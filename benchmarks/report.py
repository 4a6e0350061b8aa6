"""What report.html costs: page size and build time per run size, against writing results.parquet.

    PYTHONPATH=. python benchmarks/report.py [--rows 1000 10000] [--response-chars 20 5000]

Prints, for each size, the page's size and build time, and that time as a ratio of writing
the same rows to results.parquet (which finalizing does anyway), plus what importing
matplotlib costs in a fresh process (paid once, only when a page is built).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

from shardeval.report import build_run_report
from tests.unit.test_report import metrics_json, results_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[1000, 10_000])
    parser.add_argument("--response-chars", type=int, nargs="+", default=[20, 5000])
    args = parser.parse_args()
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import matplotlib.figure"], check=True)
    print(f"import matplotlib.figure in a fresh process: {time.perf_counter() - started:.2f} s")
    build_run_report(results_table(10), metrics_json(10), None)  # warm: imports, font cache
    print(f"{'rows':>7} {'chars':>6} {'page MB':>8} {'build s':>8} {'parquet s':>9} {'ratio':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for rows in args.rows:
            for chars in args.response_chars:
                table = results_table(rows, long_text=chars)
                t0 = time.perf_counter()
                page = build_run_report(table, metrics_json(rows), None)
                build = time.perf_counter() - t0
                t0 = time.perf_counter()
                pq.write_table(table, Path(tmp) / "results.parquet", compression="zstd")
                write = time.perf_counter() - t0
                size = len(page.encode()) / 1e6
                print(
                    f"{rows:>7,} {chars:>6,} {size:>8.2f} {build:>8.2f} {write:>9.3f} "
                    f"{build / write:>6.0f}x"
                )


if __name__ == "__main__":
    main()
