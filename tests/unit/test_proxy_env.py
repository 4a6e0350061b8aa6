"""Which proxy the environment sets for an endpoint (shardeval.providers.http.proxy_for)."""

from __future__ import annotations

import pytest

from shardeval.errors import SpecError
from shardeval.providers.http import proxy_for, proxy_label

PROXY = "http://alice:s3cr%40t@proxy.corp:3128"


@pytest.fixture(autouse=True)
def environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "http_proxy", "https_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTPS_PROXY", PROXY)
    monkeypatch.setenv("HTTP_PROXY", "proxy.corp:8080")  # no scheme: http:// (as curl reads it)
    monkeypatch.setenv("NO_PROXY", "internal.example,.svc")


def test_the_proxy_for_the_endpoints_scheme_with_its_login_apart() -> None:
    https = proxy_for("https://api.openai.com/v1")
    assert https is not None and str(https.url) == "http://proxy.corp:3128"
    assert https.tunnel and https.request_headers == https.login
    assert https.login == {"Proxy-Authorization": "Basic YWxpY2U6czNjckB0"}  # alice:s3cr@t
    plain = proxy_for("http://gpu.lan:8000/v1")
    assert plain is not None and str(plain.url) == "http://proxy.corp:8080"
    assert not plain.tunnel and plain.login is None and plain.request_headers is None


@pytest.mark.parametrize(
    "endpoint",
    [
        "http://127.0.0.1:8000/v1",
        "http://127.0.0.2:8000/v1",
        "http://localhost:11434/v1",
        "http://[::1]:8000/v1",
        "https://internal.example/v1",
        "https://vllm.models.svc/v1",
    ],
)
def test_loopback_and_no_proxy_hosts_are_reached_directly(endpoint: str) -> None:
    assert proxy_for(endpoint) is None


def test_a_proxy_of_another_kind_is_a_clear_error_without_its_login(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://bob:hunter2@socks.corp:1080")
    with pytest.raises(SpecError) as raised:
        proxy_for("https://api.openai.com/v1")
    said = str(raised.value) + (raised.value.hint or "")
    assert "HTTPS_PROXY: socks5://socks.corp:1080 is not an http:// or https:// proxy" in said
    assert "hunter2" not in said and "bob" not in said


def test_the_label_never_shows_credentials() -> None:
    proxy = proxy_for("https://api.openai.com/v1")
    assert proxy is not None and proxy_label(proxy.url) == "http://proxy.corp:3128"
