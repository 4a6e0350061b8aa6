"""``shardeval run`` with its dataset and output on S3, against moto and SeaweedFS.

The CLI runs as a subprocess against the session's Prefect server, with the S3 server's
address and credentials in its environment only (``AWS_ENDPOINT_URL`` and friends). The model
is the project's test server, whose per-prompt counters say exactly what was sent.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from shardeval.overrides import resolve_spec
from shardeval.status import read_status
from shardeval.storage import RunStore
from shardeval.survey import survey
from shardeval.testing.answers import answer_arith
from shardeval.testing.server import TestServer, prompt_key
from shardeval.validation import validate
from tests.conftest import cli_env
from tests.helpers.specs import arith_items, write_spec
from tests.s3.fixtures import count_s3_calls
from tests.s3.servers import ACCESS_KEY, SECRET_KEY, S3Backend, SeaweedBackend

pytestmark = pytest.mark.slow

MAX_WORKERS = 8
"""Batches the evaluate flow runs at once (flows.evaluate.DEFAULT_MAX_WORKERS)."""


# ------------------------------------------------------------------------------ helpers
def s3_spec(
    directory: Path,
    backend: S3Backend,
    bucket: str,
    server: TestServer,
    *,
    n_items: int,
    name: str = "arith",
    **overrides: Any,
) -> Path:
    """A spec whose dataset is on S3 (read with storage_options) and whose output is S3."""
    spec = write_spec(
        directory,
        base_url=server.url,
        items=arith_items(n_items),
        name=name,
        output=f"s3://{bucket}/out",
        **overrides,
    )
    local_items = directory / "items.jsonl"
    backend.filesystem().put_file(str(local_items), f"{bucket}/data/items.jsonl")
    local_items.unlink()  # the run must read the S3 copy
    data = yaml.safe_load(spec.read_text())
    data["dataset"]["path"] = f"s3://{bucket}/data/items.jsonl"
    data["dataset"]["storage_options"] = {
        "key": ACCESS_KEY,
        "secret": SECRET_KEY,
        "endpoint_url": backend.endpoint,
    }
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


def run_root(backend: S3Backend, bucket: str) -> str:
    runs = backend.filesystem().ls(f"{bucket}/out/runs")
    assert len(runs) == 1, runs
    return str(runs[0])


def read_results(backend: S3Backend, root: str) -> pa.Table:
    # By path with the filesystem, never through a file object (pyarrow 26 aborts at exit).
    return pq.read_table(f"{root}/results.parquet", filesystem=backend.filesystem())


def assert_results_correct(results: pa.Table, n_items: int) -> None:
    """Every item once, in dataset order, answered as an uninterrupted run answers it."""
    items = arith_items(n_items)
    assert results.column("item_id").to_pylist() == [item["id"] for item in items]
    assert set(results.column("status").to_pylist()) == {"ok"}
    expected = [answer_arith(f"What is {item['a']} + {item['b']}?") for item in items]
    assert results.column("response").to_pylist() == expected


def prompts_by_key(spec: Path) -> dict[str, str]:
    """Item key → the test server's prompt key, for every request of the spec's plan."""
    plan = validate(resolve_spec(str(spec))).plan
    return {r.key: prompt_key(r.messages) for b in plan.batches for r in plan.requests(b)}


def stored_keys(backend: S3Backend, root: str) -> set[str]:
    """Item keys with a final row in committed batches or flushed parts (another client)."""
    fs = backend.filesystem()
    keys: set[str] = set()
    for path in fs.find(root):
        if "/batches/" in path or "/parts/" in path:
            with fs.open(path, "rb") as handle:
                table = pq.read_table(handle, columns=["item_key", "status"])
            statuses = table.column("status").to_pylist()
            for key, status in zip(table.column("item_key").to_pylist(), statuses, strict=True):
                if status in ("ok", "error"):
                    keys.add(key)
    return keys


def start_cli(prefect_api: str, backend: S3Backend, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "shardeval", "run", *args, "--quiet"],
        env=cli_env(prefect_api, **backend.env()),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(
    condition: Callable[[], bool], timeout: float, what: str, *, every: float = 0.02
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


def prefect_records(prefect_api: str) -> str:
    """Everything the Prefect server holds that a secret could leak into, as text."""
    texts = []
    for kind in ("flow_runs", "task_runs", "artifacts", "logs"):
        offset = 0
        while True:
            body = json.dumps({"limit": 200, "offset": offset}).encode()
            request = urllib.request.Request(
                f"{prefect_api}/{kind}/filter",
                data=body,
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                page = json.loads(response.read())
            texts.append(json.dumps(page))
            if len(page) < 200:
                break
            offset += 200
    return "\n".join(texts)


def bucket_text(backend: S3Backend, bucket: str) -> str:
    """Every object in the bucket as text (Parquet decoded: it is compressed)."""
    fs = backend.filesystem()
    texts = []
    for path in fs.find(bucket):
        data = fs.cat_file(path)
        if path.endswith(".parquet"):
            texts.append(str(pq.read_table(pa.BufferReader(data)).to_pydict()))
        else:
            texts.append(data.decode("utf-8", errors="replace"))
        texts.append(path)
    return "\n".join(texts)


# ------------------------------------------------------------------------------ tests
def test_eval_with_dataset_and_output_on_s3(
    tmp_path: Path,
    s3_backend: S3Backend,
    bucket: str,
    llm_server: TestServer,
    run_cli: Any,
    prefect_api: str,
) -> None:
    n_items = 120
    spec = s3_spec(tmp_path, s3_backend, bucket, llm_server, n_items=n_items, batch_size=20)

    first = run_cli("run", str(spec), "--quiet", **s3_backend.env())
    assert first.returncode == 0, first.stderr[-3000:]
    assert llm_server.stats()["requests"] == n_items
    root = run_root(s3_backend, bucket)
    fs = s3_backend.filesystem()
    assert fs.exists(f"{root}/metrics.json") and fs.exists(f"{root}/results.parquet")
    metrics = json.loads(fs.cat_file(f"{root}/metrics.json"))
    assert metrics["complete"] is True and metrics["n_rows"] == n_items
    assert_results_correct(read_results(s3_backend, root), n_items)
    assert not fs.exists(f"{root}/lock.json")

    llm_server.reset()
    again = run_cli("run", str(spec), "--quiet", **s3_backend.env())
    assert again.returncode == 0, again.stderr[-3000:]
    assert llm_server.stats()["requests"] == 0
    assert "no model call" in again.stdout + again.stderr

    # Credentials never land in the run's files, the CLI's output or Prefect's records.
    assert SECRET_KEY not in bucket_text(s3_backend, bucket)
    for result in (first, again):
        assert SECRET_KEY not in result.stdout + result.stderr
    assert SECRET_KEY not in prefect_records(prefect_api)
    spec_json = json.loads(fs.cat_file(f"{root}/spec.json"))
    assert "storage_options" not in spec_json["spec"]["dataset"]

    # Cost-aware reads of the finished run: a few LISTs and one GET per batch file, not per item.
    run_id = root.rsplit("/", 1)[1]
    store = RunStore(f"s3://{bucket}/out", run_id)
    validated = validate(resolve_spec(str(spec)))
    with count_s3_calls(store.fs) as calls:
        found = survey(store, validated.plan)
    assert found.committed == {b.key for b in validated.plan.batches}
    # batches/ and parts/ listed once each; plan.parquet, metrics.json and spec.json read once
    # (the last two say whether 401/403 rows of an older version must be re-sent, and the
    # previous limit); no HEADs, nothing per item.
    assert calls == {"ListObjectsV2": 2, "GetObject": 3}, calls
    with count_s3_calls(store.fs) as calls:
        status = read_status(f"s3://{bucket}/out", run_id)
    assert status.done == n_items and status.state == "complete"
    # Does the run exist (HEAD + LIST), then parts/, batches/ and quarantine/ (absent: 2).
    assert calls["ListObjectsV2"] <= 5, calls
    n_batches = len(validated.plan.batches)
    assert calls["GetObject"] <= n_batches + 4, calls
    assert sum(calls.values()) <= n_batches + 10 < n_items, calls


def test_kill_and_resume_on_s3(
    tmp_path: Path,
    s3_backend: S3Backend,
    bucket: str,
    llm_server: TestServer,
    prefect_api: str,
) -> None:
    n_items, flush_items, concurrency, kills = 360, 4, 8, 2
    llm_server.configure(latency_min=0.03, latency_max=0.03)
    spec = s3_spec(
        tmp_path,
        s3_backend,
        bucket,
        llm_server,
        n_items=n_items,
        batch_size=30,
        flush_every_items=flush_items,
        model={"concurrency": concurrency},
    )
    killed = 0
    history: list[str] = []
    for attempt in range(kills):
        process = start_cli(prefect_api, s3_backend, str(spec))
        target = (attempt + 1) * n_items // (kills + 1)

        def progressed(process: subprocess.Popen[str] = process, target: int = target) -> bool:
            return llm_server.stats()["completions"] >= target or process.poll() is not None

        try:
            wait_for(progressed, 120, f"{target} completions")
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                killed += 1
            process.communicate(timeout=30)
        time.sleep(0.3)  # answers to requests in flight at the kill still count
        stats = llm_server.stats()
        stored = len(stored_keys(s3_backend, run_root(s3_backend, bucket)))
        history.append(f"kill {attempt}: {stats['requests']} requests, {stored} stored")
    assert killed == kills

    final = start_cli(prefect_api, s3_backend, str(spec))
    _, err = final.communicate(timeout=240)
    assert final.returncode == 0, err[-3000:]
    root = run_root(s3_backend, bucket)
    assert_results_correct(read_results(s3_backend, root), n_items)
    # A kill wastes the requests in flight and the answers not yet stored: the run's flush
    # window, plus parts still on their way to the store (uploaded in the background).
    waste_per_kill = concurrency + MAX_WORKERS * 2 * flush_items
    requests = llm_server.stats()["requests"]
    assert requests <= n_items + killed * waste_per_kill, (requests, history)


def test_store_outage_stops_the_run_and_loses_nothing(
    tmp_path: Path,
    s3_backend: S3Backend,
    bucket: str,
    llm_server: TestServer,
    prefect_api: str,
) -> None:
    n_items = 400
    llm_server.configure(latency_min=0.03, latency_max=0.03)
    spec = s3_spec(
        tmp_path,
        s3_backend,
        bucket,
        llm_server,
        n_items=n_items,
        batch_size=40,
        flush_every_items=4,
        model={"concurrency": 8},
    )
    process = start_cli(prefect_api, s3_backend, str(spec))
    try:
        wait_for(lambda: llm_server.stats()["completions"] >= 120, 120, "120 completions")
        assert process.poll() is None, "the run finished before the outage"
        outage_started = time.monotonic()
        if isinstance(s3_backend, SeaweedBackend):
            s3_backend.signal(signal.SIGSTOP)  # a hung store: requests time out
        else:
            s3_backend.stop()  # a store that is gone: connections refused
        _, err = process.communicate(timeout=180)
        stopped_after = time.monotonic() - outage_started
    finally:
        if process.poll() is None:
            process.kill()
        if isinstance(s3_backend, SeaweedBackend):
            s3_backend.stop()  # kill -9 the frozen server; its data stays in -dir
        s3_backend.start()
    assert process.returncode == 1, err[-3000:]
    assert "storage failed" in err, err[-3000:]
    assert f"s3://{bucket}/out/runs/" in err
    assert stopped_after < 90
    print(f"the run stopped {stopped_after:.1f} s after the outage began")

    # Everything committed before the outage is still there, and none of it is sent again.
    root = run_root(s3_backend, bucket)
    kept = stored_keys(s3_backend, root)
    assert kept, "nothing was stored before the outage"
    prompt_of = prompts_by_key(spec)
    llm_server.reset()
    llm_server.configure(latency_min=0.005, latency_max=0.01)
    rerun = start_cli(prefect_api, s3_backend, str(spec))
    _, err = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, err[-3000:]
    sent = llm_server.stats()["prompts"]
    assert not [key for key in kept if sent.get(prompt_of[key])], "a stored item was sent again"
    assert llm_server.stats()["requests"] == n_items - len(kept)
    assert_results_correct(read_results(s3_backend, root), n_items)


def test_two_writers_on_one_run(
    tmp_path: Path,
    s3_backend: S3Backend,
    bucket: str,
    llm_server: TestServer,
    run_cli: Any,
    prefect_api: str,
) -> None:
    n_items = 60
    # The holder would take 30 s: it is still running when the second writer, however slow
    # to start, looks at the lease; then the model speeds up and the holder finishes.
    llm_server.configure(latency_min=1.0, latency_max=1.0)
    spec = s3_spec(
        tmp_path, s3_backend, bucket, llm_server, n_items=n_items, model={"concurrency": 2}
    )
    fs = s3_backend.filesystem()
    holder = start_cli(prefect_api, s3_backend, str(spec))
    try:
        wait_for(
            lambda: bool(fs.glob(f"{bucket}/out/runs/*/lock.json")) or holder.poll() is not None,
            120,
            "the holder's lease",
            every=0.25,  # each look is a LIST: do not load the store the holder is starting on
        )
        assert holder.poll() is None, holder.communicate()[1][-3000:]
        lease = json.loads(fs.cat_file(fs.glob(f"{bucket}/out/runs/*/lock.json")[0]))
        second = run_cli("run", str(spec), "--quiet", **s3_backend.env())
        assert second.returncode == 1, second.stderr[-3000:]
        assert "being written by another process" in second.stderr
        assert f"pid {lease['pid']}" in " ".join(second.stderr.split())  # console wraps lines
        assert holder.poll() is None, "the holder finished before the second writer checked"
    finally:
        llm_server.configure(latency_min=0.005, latency_max=0.01)
        _, err = holder.communicate(timeout=240)
    assert holder.returncode == 0, err[-3000:]
    root = run_root(s3_backend, bucket)
    assert_results_correct(read_results(s3_backend, root), n_items)
    assert llm_server.stats()["requests"] == n_items

    # A lease whose holder stopped renewing it (on some other machine) is taken over.
    stale = {
        "host": "a-machine-that-is-gone",
        "pid": 1,
        "since": "2020-01-01T00:00:00+00:00",
        "renewed_at": time.time() - 3600,
        "lease_s": 60,
        "token": "stale",
    }
    fs.pipe_file(f"{bucket}/out/runs/taken-over/lock.json", json.dumps(stale).encode())
    takeover = run_cli("run", str(spec), "--quiet", "--run-id", "taken-over", **s3_backend.env())
    assert takeover.returncode == 0, takeover.stderr[-3000:]
    assert not fs.exists(f"{bucket}/out/runs/taken-over/lock.json")
    assert fs.exists(f"{bucket}/out/runs/taken-over/metrics.json")


@pytest.mark.parametrize("s3_backend", ["seaweedfs"], indirect=True)  # plumbing, not the store
def test_output_to_a_prefect_s3_bucket_block(
    tmp_path: Path,
    s3_backend: S3Backend,
    bucket: str,
    llm_server: TestServer,
    prefect_api: str,
) -> None:
    """``--output block://s3-bucket/NAME``: bucket, folder and credentials come from the block."""
    prefect_aws = pytest.importorskip("prefect_aws")
    from prefect.settings import PREFECT_API_URL, temporary_settings

    block_name = f"results-{bucket}"
    credentials = prefect_aws.AwsCredentials(
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        region_name="us-east-1",
        aws_client_parameters={"endpoint_url": s3_backend.endpoint},
    )
    with temporary_settings({PREFECT_API_URL: prefect_api}):
        prefect_aws.S3Bucket(
            bucket_name=bucket, bucket_folder="nightly", credentials=credentials
        ).save(block_name, overwrite=True)

    n_items = 30
    spec = s3_spec(tmp_path, s3_backend, bucket, llm_server, n_items=n_items)
    # No AWS variables at all: the output store must get everything from the block.
    env = {k: v for k, v in cli_env(prefect_api).items() if not k.startswith("AWS_")}
    env.update(SHARDEVAL_STORAGE_RETRIES="1", SHARDEVAL_STORAGE_TIMEOUT_S="2")
    output = f"block://s3-bucket/{block_name}"
    result = subprocess.run(
        [sys.executable, "-m", "shardeval", "run", str(spec), "--quiet", "--output", output],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fs = s3_backend.filesystem()
    (root,) = fs.ls(f"{bucket}/nightly/runs")
    assert_results_correct(read_results(s3_backend, root), n_items)
    assert f"s3://{root}" in result.stdout
    assert SECRET_KEY not in result.stdout + result.stderr
    assert SECRET_KEY not in bucket_text(s3_backend, bucket)

    run_id = root.rsplit("/", 1)[1]
    status = subprocess.run(
        [sys.executable, "-m", "shardeval", "status", run_id, "--json", "--output", output],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert status.returncode == 0, status.stderr[-3000:]
    assert json.loads(status.stdout)["state"] == "complete"
