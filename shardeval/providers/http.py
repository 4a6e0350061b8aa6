"""The HTTP session a model endpoint is called through: its headers, key and proxy.

The provider (every request of a run) and the preflight check (the first request a run
makes) build their sessions here, so that they reach the endpoint the same way: a check
that went through a proxy the run then ignored would pass and the run would fail.

**Proxies** come from the environment, as curl and the openai SDK take them: ``HTTPS_PROXY``
/ ``HTTP_PROXY`` (either case) for the endpoint's scheme, unless ``NO_PROXY`` names its host.
A loopback endpoint (``localhost``, ``127.0.0.1``, ``::1``: a vLLM or Ollama on this machine)
is never proxied, because a proxy elsewhere cannot reach this machine's loopback, and a shell
that exports a company proxy for pip should not break a local model. The proxy is chosen
once per session. aiohttp's own ``trust_env`` would look it up on every request and read
``~/.netrc`` in a worker thread each time.

Credentials in the proxy's URL (``http://user:secret@proxy:3128``) go in the
``Proxy-Authorization`` header. Like the API key, they stay in this process's session: no
message, log or file carries them (:func:`proxy_label` is what may be shown).
"""

from __future__ import annotations

import os
import urllib.parse
import urllib.request
from dataclasses import dataclass

import aiohttp
from yarl import URL

from shardeval import __version__
from shardeval.errors import EndpointError, SpecError
from shardeval.loopback import is_loopback
from shardeval.spec import ModelSpec

USER_AGENT = f"shardeval/{__version__}"


@dataclass(frozen=True)
class Proxy:
    """The proxy a session goes through (``url`` without credentials) and its login header."""

    url: URL
    login: dict[str, str] | None
    """``Proxy-Authorization``, from the credentials in the proxy's URL (None: none given)."""
    tunnel: bool
    """The endpoint is https://: the session opens a tunnel (CONNECT) through the proxy."""

    @property
    def request_headers(self) -> dict[str, str] | None:
        """What to pass as ``proxy_headers=`` with each request.

        aiohttp sends a request's ``proxy_headers`` only on a tunnel's CONNECT; to an
        http:// endpoint the request itself goes to the proxy, so the login rides in the
        session's headers instead (:func:`endpoint_session`), never inside a tunnel, where
        the endpoint would see it.
        """
        return self.login if self.tunnel else None


def endpoint_session(
    model: ModelSpec,
    *,
    timeout: aiohttp.ClientTimeout,
    proxy: Proxy | None,
    connector: aiohttp.BaseConnector | None = None,
) -> aiohttp.ClientSession:
    """A session for ``model``'s endpoint: JSON, the key, ``proxy`` (see :func:`proxy_for`)."""
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    key = os.environ.get(model.api_key_env) if model.api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    if proxy and proxy.login and not proxy.tunnel:
        headers |= proxy.login
    # The key lives only in this header dict, in this process: never logged or stored.
    return aiohttp.ClientSession(
        headers=headers,
        timeout=timeout,
        connector=connector,
        proxy=proxy.url if proxy else None,
    )


def proxy_for(url: str) -> Proxy | None:
    """The proxy the environment sets for ``url``, or None (none set, bypassed, loopback)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname
    if not host or is_loopback(host) or urllib.request.proxy_bypass(host):
        return None
    setting = urllib.request.getproxies_environment().get(parts.scheme)
    if not setting:
        return None
    proxy = URL(setting if "://" in setting else f"http://{setting}")
    if proxy.scheme not in ("http", "https") or not proxy.host:
        variable = f"{parts.scheme.upper()}_PROXY"
        raise SpecError(
            f"{variable}: {proxy_label(proxy)} is not an http:// or https:// proxy, the kinds "
            f"shardeval can reach {host} through",
            hint=f"set {variable} to http://host:port, or add {host} to NO_PROXY",
        )
    login = None
    if proxy.user:
        credentials = aiohttp.encode_basic_auth(proxy.user, proxy.password or "")
        login = {"Proxy-Authorization": credentials}
    return Proxy(proxy.with_user(None), login, tunnel=parts.scheme == "https")


def proxy_label(proxy: URL) -> str:
    """The proxy as it may be shown: scheme, host and port, never its credentials."""
    shown = proxy.with_user(None).with_path("").with_query(None).with_fragment(None)
    return str(shown)


def proxy_login_error(url: str, field: str) -> EndpointError:
    """The proxy for ``url`` asked for a login (HTTP 407): a setting to fix, never a row."""
    proxy = proxy_for(url)
    via = proxy_label(proxy.url) if proxy else "a proxy"
    given = "rejected the login in its URL" if proxy and proxy.login else "asked for a login"
    return EndpointError(
        f"{field}.base_url: the proxy {via} between here and {url} {given} (HTTP 407)",
        hint="set HTTPS_PROXY / HTTP_PROXY to http://user:password@host:port (read from the "
        "environment, never written anywhere), or add the endpoint's host to NO_PROXY",
    )
