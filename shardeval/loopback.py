"""Whether a host is this machine: never reached through a proxy.

A proxy elsewhere cannot reach this machine's loopback, so an endpoint (a local vLLM or
Ollama) or a Prefect API there is always reached directly, whatever ``HTTP_PROXY`` says.
Kept apart from :mod:`shardeval.providers.http` so that the local server's code can ask
without importing aiohttp.
"""

from __future__ import annotations

import ipaddress


def is_loopback(host: str) -> bool:
    """Whether ``host`` is this machine (``localhost``, 127.0.0.0/8, ``::1``)."""
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
