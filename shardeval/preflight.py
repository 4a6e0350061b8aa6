"""Before the first batch: prove that the endpoint answers, the key works and the model exists.

Without this, a typo in ``model.base_url`` costs minutes of retries per item before the run
gives up, and a missing key turns every item into a stored 401 row. One or two small requests
per endpoint settle it in about a second, and the message names the field to fix:

1. ``GET <base_url>/models`` (OpenAI, vLLM, Ollama, TGI, LiteLLM have it). Connection refused,
   DNS failure or no answer → ``model.base_url``; 401/403 → the variable ``model.api_key_env``
   names (set or unset, never its value); the model listed → done.
2. Otherwise (no ``/models``, or the model not in its list: Ollama lists ``llama3:latest`` and
   accepts ``llama3``) one chat completion with ``max_tokens: 1``. A 404 that mentions the
   model → ``model.model``; any other answer proves the endpoint, and the run's own error
   handling takes it from there (a 429 or 5xx now says nothing about the configuration).

The ``python`` provider makes no HTTP calls and needs no check. ``llm_judge`` metrics bring
their own model block, which is checked the same way (``metrics[0].model.base_url``).
Uses aiohttp (the provider's client) with short timeouts; imports no Prefect.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import aiohttp

from shardeval import finality
from shardeval.errors import EndpointError
from shardeval.providers.http import (
    Proxy,
    endpoint_session,
    proxy_for,
    proxy_label,
    proxy_login_error,
)
from shardeval.spec import EvalSpec, ModelSpec

CONNECT_TIMEOUT_S = 5.0
ANSWER_TIMEOUT_S = 20.0
"""A 1-token completion on a loaded server can take a while; a dead one fails at connect."""
AUTH_STATUSES = frozenset(finality.AUTH_STATUSES) - {407}  # 407: the proxy's, below


@dataclass(frozen=True)
class Endpoint:
    """One model block to check, and where it is in the spec (for messages)."""

    model: ModelSpec
    field: str
    """``model`` or ``metrics[2].model``."""

    @property
    def base_url(self) -> str:
        """The endpoint root the provider uses."""
        from shardeval.providers.openai import OPENAI_BASE_URL

        return (self.model.base_url or OPENAI_BASE_URL).rstrip("/")

    @functools.cached_property
    def proxy(self) -> Proxy | None:
        """The proxy the environment sets for the endpoint, as the run will use it."""
        return proxy_for(self.base_url)


def endpoints(spec: EvalSpec) -> list[Endpoint]:
    """The model blocks of a spec that make HTTP calls: the model, and llm_judge models."""
    found = [Endpoint(spec.model, "model")]
    for index, metric in enumerate(spec.metrics):
        judge = metric.params.get("model") if metric.type == "llm_judge" else None
        if isinstance(judge, dict):
            found.append(Endpoint(ModelSpec.model_validate(judge), f"metrics[{index}].model"))
    return [e for e in found if e.model.provider == "openai"]


def preflight(spec: EvalSpec, *, fields: set[str] | None = None) -> None:
    """Check every endpoint of ``spec`` (concurrently); raise on the first that cannot work.

    ``fields`` limits the check to those model blocks (``model``, ``metrics[2].model``): the
    run session leaves out endpoints it has nothing to send to, since a check can cost a
    one-token completion.

    Raises:
        EndpointError: (exit 2) naming ``<field>.base_url``, ``<field>.model`` or the
            variable of ``<field>.api_key_env``.
    """
    checks = [e for e in endpoints(spec) if fields is None or e.field in fields]
    if not checks:
        return
    asyncio.run(_check_all(checks))


async def _check_all(checks: list[Endpoint]) -> None:
    # Same endpoint and model twice (a judge on the model's own server): check it once.
    unique = {(c.base_url, c.model.model, c.model.api_key_env): c for c in checks}
    results = await asyncio.gather(
        *(check_endpoint(c) for c in unique.values()), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result


async def check_endpoint(endpoint: Endpoint) -> None:
    """Check one endpoint (see the module docstring)."""
    model = endpoint.model
    timeout = aiohttp.ClientTimeout(
        total=min(ANSWER_TIMEOUT_S, model.timeout_s), sock_connect=CONNECT_TIMEOUT_S
    )
    async with endpoint_session(model, timeout=timeout, proxy=endpoint.proxy) as session:
        listed = await _listed_models(session, endpoint)
        if listed is not None and model.model in listed:
            return
        await _probe_completion(session, endpoint, listed)


async def _listed_models(session: aiohttp.ClientSession, endpoint: Endpoint) -> list[str] | None:
    """The model ids ``GET /models`` lists, or None if it lists none (or is absent)."""
    status, text = await _request(session, endpoint, "GET", "/models")
    if status in AUTH_STATUSES:
        raise auth_error(endpoint.model, endpoint.field, status, _message(text))
    if status != 200:
        return None
    try:
        data = json.loads(text).get("data")
        ids = [str(entry["id"]) for entry in data if isinstance(entry, dict) and "id" in entry]
    except (ValueError, AttributeError, TypeError):
        return None
    return ids or None


async def _probe_completion(
    session: aiohttp.ClientSession, endpoint: Endpoint, listed: list[str] | None
) -> None:
    model = endpoint.model
    params = dict(model.params)
    params["max_completion_tokens" if "max_completion_tokens" in params else "max_tokens"] = 1
    body = {**params, "model": model.model, "messages": [{"role": "user", "content": "ping"}]}
    status, text = await _request(session, endpoint, "POST", "/chat/completions", body)
    if status in AUTH_STATUSES:
        raise auth_error(model, endpoint.field, status, _message(text))
    message = _message(text)
    if status == 404 and "model" in message.lower():
        hint = "set it to a model this endpoint serves"
        if listed:
            hint += f"; GET {endpoint.base_url}/models lists: {', '.join(listed[:10])}"
        raise EndpointError(
            f"{endpoint.field}.model: {model.model!r} is not served by {endpoint.base_url} "
            f"(HTTP 404: {message})",
            hint=hint,
        )
    if status == 404:
        raise EndpointError(
            f"{endpoint.field}.base_url: {endpoint.base_url}/chat/completions answered "
            f"HTTP 404 ({message})",
            hint="OpenAI-compatible servers usually serve under a path ending in /v1 "
            "(e.g. http://127.0.0.1:8000/v1)",
        )


async def _request(
    session: aiohttp.ClientSession,
    endpoint: Endpoint,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
) -> tuple[int, str]:
    url = endpoint.base_url + path
    try:
        login = endpoint.proxy.request_headers if endpoint.proxy else None
        async with session.request(method, url, json=body, proxy_headers=login) as response:
            if response.status == 407:  # from the proxy (an http:// endpoint's request)
                raise proxy_login_error(endpoint.base_url, endpoint.field)
            return response.status, await response.text()
    except aiohttp.ClientHttpProxyError as exc:  # the proxy refused the tunnel (https://)
        if exc.status == 407:
            raise proxy_login_error(endpoint.base_url, endpoint.field) from exc
        raise _through_proxy_error(endpoint, f"the proxy answered HTTP {exc.status}") from exc
    except aiohttp.ClientProxyConnectionError as exc:
        raise _through_proxy_error(endpoint, _reason(exc)) from exc
    except TimeoutError as exc:
        raise EndpointError(
            f"{endpoint.field}.base_url: {url} did not answer within {session.timeout.total:g} s",
            hint="check that the server is up and the address is right (or pass "
            "--no-preflight if it is only slow to answer)",
        ) from exc
    except aiohttp.ClientError as exc:
        raise unreachable_error(endpoint, _reason(exc)) from exc


def _reason(exc: aiohttp.ClientError) -> str:
    """``connection refused`` rather than aiohttp's whole sentence."""
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve the host name {exc.host!r}"
    if isinstance(exc, aiohttp.ClientConnectorError):
        if isinstance(exc.os_error, ConnectionRefusedError):
            return f"connection refused at {exc.host}:{exc.port}: nothing listens there"
        return f"{exc.os_error.strerror or exc.os_error} at {exc.host}:{exc.port}"
    return f"{type(exc).__name__}: {exc}"


def unreachable_error(endpoint: Endpoint, reason: str) -> EndpointError:
    """Nothing answers at the endpoint's address."""
    return EndpointError(
        f"{endpoint.field}.base_url: cannot connect to {endpoint.base_url} ({reason})",
        hint=f"check {endpoint.field}.base_url: is the server running, and are the host "
        "and port right?",
    )


def _through_proxy_error(endpoint: Endpoint, reason: str) -> EndpointError:
    """The proxy the environment sets for the endpoint failed, not the endpoint itself."""
    via = proxy_label(endpoint.proxy.url) if endpoint.proxy else "the proxy"
    return EndpointError(
        f"{endpoint.field}.base_url: cannot reach {endpoint.base_url} through the proxy {via} "
        f"({reason})",
        hint="the proxy comes from HTTPS_PROXY / HTTP_PROXY: check it, or add the endpoint's "
        "host to NO_PROXY",
    )


def auth_error(model: ModelSpec, field: str, status: int, message: str = "") -> EndpointError:
    """The endpoint rejected the key: name the variable, say whether it is set (not its value)."""
    answer = f"HTTP {status}" + (f": {message}" if message else "")
    env = model.api_key_env
    if env is None:
        return EndpointError(
            f"{field}.api_key_env: the endpoint rejected the request ({answer}) and the spec "
            "names no variable holding a key",
            hint=f"set {field}.api_key_env to the name of the environment variable that "
            "holds the key",
        )
    if not os.environ.get(env):
        return EndpointError(
            f"{field}.api_key_env: the endpoint rejected the request ({answer}); the "
            f"environment variable {env} is not set",
            hint=f"export {env}=... and run the same command again (the key is read from "
            "the environment and never written anywhere)",
        )
    return EndpointError(
        f"{field}.api_key_env: the endpoint rejected the key in {env} ({answer})",
        hint=f"check the value of {env} (and that it is valid for this endpoint and model)",
    )


def _message(text: str) -> str:
    from shardeval.providers.openai import error_message

    return error_message(text)
