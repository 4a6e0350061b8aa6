"""A run behind a company proxy, through the real CLI: the proxy from the environment.

The spec names ``model.internal``, a host that resolves nowhere: only the proxy (a real one,
on 127.0.0.1, in front of the real test server) can reach it. ``NO_PROXY`` keeps Prefect's
own client (httpx, which reads the same variables) off the proxy, as it would be on a
machine with a company proxy and a local Prefect server.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from yarl import URL

from shardeval.testing.server import TestServer
from tests.conftest import cli_env
from tests.helpers.forward_proxy import ForwardProxy, TlsFront, TunnelProxy
from tests.helpers.specs import write_spec
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow
SECRET = "pr0xy-s3cret"
N_ITEMS = 12


def internal_url(server: TestServer) -> str:
    """The test server's address under a host name only the proxy can reach."""
    return str(URL(server.url).with_host("model.internal"))


def run(spec: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "shardeval", "run", str(spec), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    result.stderr = " ".join(result.stderr.split())  # the console wraps long lines
    return result


def proxy_env(prefect_api: str, proxy: ForwardProxy, password: str) -> dict[str, str]:
    address = URL(proxy.url).with_user("alice").with_password(password)
    return cli_env(prefect_api, HTTP_PROXY=str(address), NO_PROXY="127.0.0.1,localhost")


def files_holding(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_a_run_goes_through_the_proxy_the_environment_sets(
    tmp_path: Path, prefect_api: str, llm_server: TestServer
) -> None:
    with ForwardProxy(llm_server.url, login=("alice", SECRET)) as proxy:
        spec = write_spec(tmp_path, base_url=internal_url(llm_server), n_items=N_ITEMS)
        result = run(spec, proxy_env(prefect_api, proxy, SECRET))
        assert result.returncode == 0, result.stderr
        preflight, *completions = proxy.requests  # the preflight's listing, then the items
        assert preflight.startswith("GET http://model.internal:") and preflight.endswith("/models")
        assert len(completions) == N_ITEMS
        assert all(r.startswith("POST http://model.internal:") for r in completions)
        assert set(proxy.logins) == {proxy.expected}  # the login went with every request
    said = result.stdout + result.stderr
    assert "rows: 12 · ok 12" in said, said
    # The password is in the environment only: not on the console, not in the run's files.
    assert SECRET not in said
    assert files_holding(tmp_path, SECRET) == []


def test_a_wrong_proxy_login_stops_the_run_before_any_item(
    tmp_path: Path, prefect_api: str, llm_server: TestServer
) -> None:
    with ForwardProxy(llm_server.url, login=("alice", SECRET)) as proxy:
        spec = write_spec(tmp_path, base_url=internal_url(llm_server), n_items=N_ITEMS)
        env = proxy_env(prefect_api, proxy, "wrong-password")
        result = run(spec, env)
        assert result.returncode == 2, result.stderr
        assert f"the proxy {proxy.url} between here and" in result.stderr
        assert "rejected the login in its URL (HTTP 407)" in result.stderr
        assert "wrong-password" not in result.stderr + result.stdout
        assert not (tmp_path / "runs").exists()  # the preflight stopped it: no run started

        # Without the preflight, the run's first 407 stops it the same way: exit 2, and no
        # item is stored as an error (the login is the setting to fix, not the items).
        proxy.requests.clear()
        result = run(spec, env, "--no-preflight")
        assert result.returncode == 2, result.stderr
        assert "rejected the login in its URL (HTTP 407)" in result.stderr
        assert len(proxy.requests) <= 16  # at most what was in flight when the first 407 came
    assert not list(tmp_path.glob("runs/runs/*/batches/*.parquet"))
    assert files_holding(tmp_path, "wrong-password") == []


def test_no_proxy_bypasses_it(tmp_path: Path, prefect_api: str, llm_server: TestServer) -> None:
    with ForwardProxy(llm_server.url) as proxy:
        spec = write_spec(tmp_path, base_url=internal_url(llm_server), n_items=N_ITEMS)
        env = cli_env(
            prefect_api, HTTP_PROXY=proxy.url, NO_PROXY="127.0.0.1,localhost,model.internal"
        )
        result = run(spec, env)
        assert result.returncode == 2, result.stderr
        assert "cannot resolve the host name 'model.internal'" in result.stderr
        assert proxy.requests == []


def test_an_https_endpoint_is_reached_through_a_tunnel_that_keeps_the_login(
    tmp_path: Path, prefect_api: str, llm_server: TestServer
) -> None:
    # The login goes on the CONNECT only: inside the tunnel the endpoint (OpenAI, say) must
    # never see the proxy's password.
    with (
        TlsFront(llm_server.url, "model.internal", tmp_path) as front,
        TunnelProxy(front.port, login=("alice", SECRET)) as proxy,
    ):
        base_url = f"https://model.internal:{front.port}/v1"
        spec = write_spec(tmp_path / "eval", base_url=base_url, n_items=N_ITEMS)

        def env(password: str) -> dict[str, str]:
            address = URL(proxy.url).with_user("alice").with_password(password)
            return cli_env(
                prefect_api,
                HTTPS_PROXY=str(address),
                NO_PROXY="127.0.0.1,localhost",
                SSL_CERT_FILE=str(front.ca_file),  # the test CA: the endpoint's TLS is verified
            )

        result = run(spec, env(SECRET))
        assert result.returncode == 0, result.stderr
        assert set(proxy.connects) == {f"CONNECT model.internal:{front.port}"}
        assert set(proxy.logins) == {proxy.expected}
        assert len(front.headers) == N_ITEMS + 1  # the preflight's listing, then the items
        assert not [h for h in front.headers if "proxy-authorization" in map(str.lower, h)]
        assert SECRET not in result.stdout + result.stderr

        result = run(spec, env("wrong-password"), "--fresh")
        assert result.returncode == 2, result.stderr
        assert "rejected the login in its URL (HTTP 407)" in result.stderr
        assert len(front.headers) == N_ITEMS + 1  # nothing more reached the endpoint
    assert files_holding(tmp_path, SECRET) == []


def test_a_proxy_that_goes_away_mid_run_is_named_and_the_rerun_sends_only_the_rest(
    tmp_path: Path, prefect_api: str, llm_server: TestServer
) -> None:
    n_items = 240
    llm_server.configure(latency_min=0.05, latency_max=0.05)
    spec = write_spec(
        tmp_path,
        base_url=internal_url(llm_server),
        n_items=n_items,
        batch_size=20,
        model={"concurrency": 4, "unreachable_after_s": 2},
    )
    with ForwardProxy(llm_server.url) as proxy:
        env = cli_env(prefect_api, HTTP_PROXY=proxy.url, NO_PROXY="127.0.0.1,localhost")
        command = [sys.executable, "-m", "shardeval", "run", str(spec), "-q"]
        process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
        try:
            wait_until(
                lambda: llm_server.stats()["completions"] >= 40,
                timeout=240,
                what="40 answers through the proxy",
                process=process,
            )
        except BaseException:
            process.kill()
            raise
    # The proxy is gone: every connection to it is refused from here on.
    try:
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()  # a no-op once it has exited
    stderr = " ".join(stderr.split())
    assert process.returncode == 1, stderr
    assert (
        f"the endpoint at {internal_url(llm_server)} is unreachable through the proxy "
        f"{proxy.url}:" in stderr
    ), stderr
    assert f"check that the proxy {proxy.url} (from the environment) and the server" in stderr
    first = llm_server.stats()["completions"]
    assert first < n_items

    with ForwardProxy(llm_server.url) as again:
        env = cli_env(prefect_api, HTTP_PROXY=again.url, NO_PROXY="127.0.0.1,localhost")
        result = run(spec, env)
    assert result.returncode == 0, result.stderr
    assert f"rows: {n_items} · ok {n_items}" in result.stdout + result.stderr
    # Only the rows not stored yet went out again: at most the 4 in flight when the proxy
    # went away had reached the server without their answers getting back.
    assert n_items <= llm_server.stats()["completions"] <= n_items + 4
