"""Alerts through a real ``prefect server``: the event, the artifact, the Automation's POST.

A loopback HTTP receiver stands in for Slack: a ``CustomWebhookNotificationBlock`` points at
it, ``shardeval alerts install --block`` wires the Automation, and a flow that publishes a
regression must make the server's automation service POST a message naming eval and metric.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.conftest import ROOT, cli_env

pytestmark = pytest.mark.slow

DEADLINE_S = 180.0


class Receiver:
    """Records the bodies of POSTs to 127.0.0.1:<port>."""

    def __init__(self) -> None:
        self.bodies: list[str] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                bodies.append(self.rfile.read(length).decode("utf-8", "replace"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    found = Receiver()
    try:
        yield found
    finally:
        found.server.shutdown()


def api(prefect_api: str, path: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        f"{prefect_api}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def save_webhook_block(prefect_api: str, url: str, name: str) -> None:
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: prefect_api}):
        CustomWebhookNotificationBlock(
            name="shardeval-test", url=url, json_data={"text": "{{subject}}\n{{body}}"}
        ).save(name, overwrite=True)


def test_regression_event_and_notification(prefect_api: str, run_cli, receiver: Receiver) -> None:
    save_webhook_block(prefect_api, receiver.url, "shardeval-hook")

    missing = run_cli("alerts", "install", "--block", "no-such-hook")
    assert missing.returncode == 2
    assert "no-such-hook" in missing.stderr and "custom-webhook/shardeval-hook" in missing.stderr
    created = run_cli("alerts", "install", "--block", "shardeval-hook", "--name", "sd-test")
    assert created.returncode == 0, created.stderr
    assert "created" in created.stdout
    slug = "custom-webhook/shardeval-hook"
    again = run_cli("alerts", "install", "--block", slug, "--name", "sd-test")
    assert again.returncode == 0 and "updated" in again.stdout, again.stderr
    automations = api(prefect_api, "/automations/filter", {})
    assert [a["name"] for a in automations].count("sd-test") == 1

    flow = subprocess.run(
        [sys.executable, "-m", "tests.helpers.alert_flow", "night-1", "night-2"],
        cwd=ROOT,
        env=cli_env(prefect_api),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert flow.returncode == 0, flow.stdout + flow.stderr
    published = json.loads(flow.stdout.strip().splitlines()[-1])
    assert published["event"] == "shardeval.regression.detected"

    event_filter = {
        "filter": {
            "event": {"name": ["shardeval.regression.detected"]},
            "resource": {"id": ["shardeval.run.night-2"]},
        },
        "limit": 10,
    }
    deadline = time.monotonic() + DEADLINE_S
    events: list[dict[str, Any]] = []
    while not events:
        assert time.monotonic() < deadline, "the regression event never reached the server"
        events = api(prefect_api, "/events/filter", event_filter)["events"]
        time.sleep(1)
    payload = events[0]["payload"]
    assert payload["eval"] == "arith-nightly" and payload["metric"] == "exact_match"
    assert payload["broken"] == 30 and payload["fixed"] == 2
    assert payload["delta"] == pytest.approx(-0.28) and payload["base"] == "night-1"
    assert events[0]["resource"]["prefect.resource.name"] == "night-2"

    artifacts = api(
        prefect_api, "/artifacts/filter", {"artifacts": {"key": {"any_": [published_key()]}}}
    )
    assert artifacts and "regression" in artifacts[0]["data"] and "q000" in artifacts[0]["data"]

    while not any("arith-nightly" in b for b in receiver.bodies):
        assert time.monotonic() < deadline, f"no notification arrived; got {receiver.bodies}"
        time.sleep(1)
    message = next(b for b in receiver.bodies if "arith-nightly" in b)
    text = json.loads(message)["text"]
    assert "exact_match" in text and "night-2" in text and "test-model" in text
    assert "-0.28" in text and "night-1" in text  # the template was rendered from the payload
    print(text)  # shown with -s: what a Slack channel would read


def published_key() -> str:
    from shardeval.alerts import artifact_key

    return artifact_key("arith-nightly")
