"""The fully cached rerun: ``shardeval run`` of a spec whose run is complete, end to end.

Builds a complete run of ``--items`` items through the python provider (the library alone,
no Prefect), then times, interleaved round by round in this one run:

* ``record``: the command as a user types it again (answered from the answer record,
  shardeval/answer_record.py: no dataset read, no pyarrow);
* ``exact``: the same command through the exact path (a fresh ``SHARDEVAL_HOME`` each time,
  so no record: the dataset is read, hashed and planned, then metrics.json is found current).

Prints one JSON line per mode (median and range of the whole command's wall time) and the
load average, then the target's ratio (record median / 0.6 s).

    python benchmarks/cached_rerun.py [--items 2000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import compile_sources  # noqa: E402
from tests.helpers.specs import arith_items, write_spec  # noqa: E402

TARGET_S = 0.6


def timed(args: list[str], env: dict[str, str]) -> float:
    started = time.monotonic()
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    wall = time.monotonic() - started
    if result.returncode != 0 or "no model call was made" not in result.stdout:
        raise RuntimeError(f"rerun failed ({result.returncode}): {result.stderr[-2000:]}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    compile_sources()
    work = Path(tempfile.mkdtemp(prefix="shardeval-cached-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SHARDEVAL_HOME": str(work / "home")}
    spec = write_spec(work, items=arith_items(args.items, seed=7), name="cached", batch_size=100)
    library_run = [sys.executable, str(ROOT / "benchmarks" / "scale.py"), "--baseline"]
    subprocess.run([*library_run, str(spec), str(work / "runs")], env=env, check=True)
    time.sleep(2.5)  # older than the answer record's racy window (RACY_S)
    base = [sys.executable, "-m", "shardeval", "run", str(spec), "-o", str(work / "runs")]
    timed(base, env)  # the exact path answers and writes the record
    walls: dict[str, list[float]] = {"record": [], "exact": []}
    loads = [os.getloadavg()[0]]
    for round_number in range(args.rounds):
        walls["record"].append(timed(base, env))
        fresh_home = {**env, "SHARDEVAL_HOME": str(work / f"home-{round_number}")}
        walls["exact"].append(timed(base, fresh_home))
        loads.append(os.getloadavg()[0])
    print(f"{args.items:,} items, {os.cpu_count()} CPUs, {args.rounds} rounds", flush=True)
    for mode, values in walls.items():
        figures = {
            "mode": mode,
            "median_s": round(statistics.median(values), 3),
            "min_s": round(min(values), 3),
            "max_s": round(max(values), 3),
        }
        print(json.dumps(figures), flush=True)
    record = statistics.median(walls["record"])
    print(
        json.dumps(
            {
                "record_over_target": round(record / TARGET_S, 2),
                "exact_over_record": round(statistics.median(walls["exact"]) / record, 2),
                "load_average": [round(min(loads), 2), round(max(loads), 2)],
            }
        )
    )


if __name__ == "__main__":
    main()
