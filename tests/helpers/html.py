"""Checks on report pages: external references, and opening them in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

LINK_HREF = re.compile(r"""<a\s[^>]*href\s*=\s*("[^"]*"|'[^']*')""", re.IGNORECASE)
URL = re.compile(r"https?://", re.IGNORECASE)


def external_references(page: str) -> list[str]:
    """Every ``http(s)://`` in the page outside the href of an ``<a>`` link (with context)."""
    without_links = LINK_HREF.sub("<a href=''", page)
    return [
        without_links[max(0, m.start() - 60) : m.end() + 60] for m in URL.finditer(without_links)
    ]


def chromium() -> str | None:
    """The Chromium binary, if installed."""
    return shutil.which("chromium") or shutil.which("chromium-browser")


def open_offline(
    page: Path, screenshot: Path, profile: Path, *, size: str = "1280,2400"
) -> subprocess.CompletedProcess[str]:
    """Open ``page`` in headless Chromium with the network cut; save a screenshot.

    Console messages go to stderr (``--enable-logging=stderr --v=0``): the caller looks
    for uncaught errors there.
    """
    binary = chromium()
    assert binary is not None
    return subprocess.run(
        [
            binary,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
            "--proxy-server=127.0.0.1:9",
            "--host-resolver-rules=MAP * ~NOTFOUND",
            "--enable-logging=stderr",
            "--v=0",
            f"--window-size={size}",
            f"--screenshot={screenshot}",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def console_problems(stderr: str) -> list[str]:
    """Lines of Chromium's log with a console message or an uncaught error.

    Chromium logs them as ``INFO:CONSOLE:<line>] "message", source: <url>``; a report logs
    nothing on purpose, so any such line is a problem.
    """
    return [line for line in stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
