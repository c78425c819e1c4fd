"""deployments/automations.yaml on a real Prefect API: a failed run of an `sftflow`-tagged
flow sends the notification (a custom-webhook block pointing at a local HTTP listener, the
way a Slack or Teams block would be used), and a run without the tag does not."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
import yaml

from sftflow.tasks.runtime.polling import Backoff, wait_until

pytestmark = pytest.mark.prefect
YAML = Path(__file__).parents[2] / "deployments" / "automations.yaml"


@pytest.fixture()
def listener():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/notify", received
    server.shutdown()
    thread.join(5)


def test_a_failed_sftflow_run_notifies_a_person(prefect_harness, listener):
    from prefect import flow, tags
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.events.schemas.automations import AutomationCore

    url, received = listener
    block = CustomWebhookNotificationBlock(
        name="sftflow-alerts", url=url, allow_private_urls=True,
        json_data={"subject": "{{subject}}", "body": "{{body}}"})
    block_id = block.save("sftflow-alerts-test", overwrite=True)
    (doc,) = yaml.safe_load(YAML.read_text())["automations"]
    doc["actions"][0]["block_document_id"] = str(block_id)
    with get_client(sync_client=True) as client:
        automation_id = client.create_automation(AutomationCore.model_validate(doc))
    try:
        @flow(name="sftflow-fails-on-purpose")
        def fails() -> None:
            raise RuntimeError("the bucket is gone")

        @flow(name="untagged-fails-on-purpose")
        def untagged() -> None:
            raise RuntimeError("not ours")

        untagged(return_state=True)
        with tags("sftflow"):
            state = fails(return_state=True)
        assert state.is_failed()
        got = wait_until(lambda: list(received), timeout_s=90, backoff=Backoff(0.5, 2.0))
        assert len(got) == 1, got
        assert got[0]["subject"].startswith("sftflow: sftflow-fails-on-purpose run ")
        assert got[0]["subject"].endswith(" Failed")
        assert "the bucket is gone" in got[0]["body"]
    finally:
        with get_client(sync_client=True) as client:
            client.delete_automation(automation_id)
