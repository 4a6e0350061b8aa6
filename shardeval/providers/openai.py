"""Any OpenAI-compatible chat-completions endpoint (OpenAI, vLLM, Ollama, TGI, LiteLLM).

Built on raw aiohttp rather than the openai SDK: on a 2-core machine the client's CPU per
request, not the network, sets the pace. Measured at concurrency 64 against a local server
(docs/performance.md): aiohttp ~0.4 ms CPU per request, the openai SDK 2.3-4 ms, httpx 0.28
up to 16 ms. The request body is the documented ``/chat/completions`` schema, so nothing is
lost by not using the SDK.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from typing import Any

import aiohttp
import orjson

from shardeval.errors import (
    ConnectionFailedError,
    PermanentProviderError,
    SpecError,
    TransientProviderError,
)
from shardeval.outcome import storable
from shardeval.providers.base import Completion, ProviderRequest
from shardeval.providers.http import endpoint_session, proxy_for, proxy_label
from shardeval.spec import ModelSpec

OPENAI_BASE_URL = "https://api.openai.com/v1"
# 408 request timeout, 409 conflict (some gateways), 425 too early, 429 rate limit: all pass.
TRANSIENT_4XX = frozenset({408, 409, 425, 429})


class OpenAIProvider:
    """Chat completions over one shared aiohttp session."""

    def __init__(self, model: ModelSpec) -> None:
        self.check(model)
        self._model = model
        self._url = (model.base_url or OPENAI_BASE_URL).rstrip("/") + "/chat/completions"
        proxy = proxy_for(self._url)
        self._proxy_headers = proxy.request_headers if proxy else None
        self.proxy_label = proxy_label(proxy.url) if proxy else None
        """The proxy between here and the endpoint, as messages may show it (no login)."""
        self._session = endpoint_session(
            model,
            timeout=aiohttp.ClientTimeout(total=model.timeout_s),
            proxy=proxy,
            connector=aiohttp.TCPConnector(limit=model.concurrency, ttl_dns_cache=300),
        )
        self._body_base: dict[str, Any] = {**model.params, "model": model.model}

    @staticmethod
    def check(model: ModelSpec) -> None:
        """Fail before any call when the spec cannot work (no model name, missing key)."""
        if not model.model:
            raise SpecError("model.model: required for the openai provider (e.g. gpt-4o-mini)")
        needs_key = model.base_url is None or "api.openai.com" in (model.base_url or "")
        if needs_key and model.api_key_env and not os.environ.get(model.api_key_env):
            raise SpecError(
                f"model.api_key_env: the environment variable {model.api_key_env} is not set",
                hint=f"export {model.api_key_env}=... (the key is read from the environment "
                "and never written anywhere)",
            )

    async def complete(self, request: ProviderRequest) -> Completion:
        """POST one chat completion; classify failures as transient or permanent."""
        # orjson and bytes both ways: aiohttp's ``json=`` and ``text()`` (the stdlib encoder,
        # a charset lookup) are a good part of the client's CPU per request.
        body = _encode({**self._body_base, "messages": request.messages})
        try:
            async with self._session.post(
                self._url, data=body, proxy_headers=self._proxy_headers
            ) as response:
                status = response.status
                data = await response.read()
                if status == 200:
                    return _parse_completion(data)
                text = data.decode("utf-8", errors="replace")
                raise _http_error(status, text, response.headers.get("Retry-After"))
        except TimeoutError as exc:
            raise TransientProviderError(f"timed out after {self._model.timeout_s:g}s") from exc
        except aiohttp.ClientHttpProxyError as exc:  # the proxy refused an https:// tunnel
            if exc.status == 407:  # its login: stops the run like a 401 (engine.AUTH_STATUSES)
                raise PermanentProviderError("HTTP 407: proxy login", status=407) from exc
            raise ConnectionFailedError(f"the proxy answered HTTP {exc.status}") from exc
        except aiohttp.ClientConnectionError as exc:
            # Refused, DNS, reset, disconnected: nothing answered (the circuit breaker counts
            # these; an HTTP error status is an answer).
            raise ConnectionFailedError(f"connection error: {type(exc).__name__}: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise TransientProviderError(f"connection error: {type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the session and its connections."""
        await self._session.close()


def _encode(body: dict[str, Any]) -> bytes:
    """The request body as JSON bytes (the stdlib for what orjson refuses: ints past 64 bits)."""
    try:
        return orjson.dumps(body)
    except TypeError:
        return json.dumps(body).encode()


def _decode(body: bytes) -> Any:
    r"""JSON from bytes; the stdlib for what orjson refuses.

    That is the escape of a lone surrogate (``"\ud83d"``, half an emoji cut by a token
    limit): valid JSON, but not a string UTF-8 can store, so it becomes U+FFFD here
    (:func:`~shardeval.outcome.storable`), since any field of the answer may hold it.
    """
    try:
        return orjson.loads(body)
    except ValueError:
        data = json.dumps(json.loads(body), ensure_ascii=False)
        return json.loads(storable(data))


def _parse_completion(body: bytes) -> Completion:
    try:
        data = _decode(body)
        choice = data["choices"][0]
        content = choice["message"].get("content") or ""
    except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        # A proxy answering 200 with an HTML page is a passing fault, not the model's answer.
        text = body[:200].decode("utf-8", errors="replace")
        raise TransientProviderError(f"malformed response: {text!r}") from exc
    usage = data.get("usage")
    if not isinstance(usage, dict):
        usage = {}
    return Completion(  # counts and reason as sent: Outcome.answered makes them storable
        text=content if isinstance(content, str) else _text_of(content),
        prompt_tokens=usage.get("prompt_tokens"),
        completion_tokens=usage.get("completion_tokens"),
        finish_reason=choice.get("finish_reason"),
    )


def _text_of(content: Any) -> str:
    """Message content that is not a string: a list of parts (``{"type": "text", ...}``)."""
    if isinstance(content, list):
        return "".join(
            str(part.get("text") or "") if isinstance(part, dict) else str(part) for part in content
        )
    return str(content)


def _http_error(status: int, text: str, retry_after: str | None) -> Exception:
    message = error_message(text)
    description = f"HTTP {status}: {message}"
    if status in TRANSIENT_4XX or status >= 500:
        return TransientProviderError(
            description, status=status, retry_after=parse_retry_after(retry_after)
        )
    return PermanentProviderError(description, status=status)


def error_message(text: str) -> str:
    """The ``error.message`` of an OpenAI-style error body (or the start of the text)."""
    try:
        data = json.loads(text)
        error = data.get("error", data) if isinstance(data, dict) else data
        if isinstance(error, dict):
            return str(error.get("message") or error)[:500]
        return str(error)[:500]
    except ValueError:
        return text[:500] or "(empty body)"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
