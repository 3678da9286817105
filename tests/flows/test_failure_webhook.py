"""The failure webhook end to end: `compressor notify-failures` creates a Prefect automation on
the throwaway server (the session harness runs the server's triggers and actions services), a
compress run fails, and the server POSTs the failed state's message to a local HTTP receiver."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from compressor.config import RunConfig
from compressor.testing.generate import LlamaShape, generate_llama_checkpoint

pytestmark = pytest.mark.slow

NAME = "test-compress-checkpoint-failed"
# How long a broken automation may keep the test waiting before it fails: a failure bound, never
# a pace (the request is awaited as an event; a working setup answers within seconds).
WAIT_S = 300
SHAPE = LlamaShape(hidden_size=128, intermediate_size=256, num_hidden_layers=1, vocab_size=64)


@dataclass
class _Receiver:
    url: str
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    arrived: threading.Event = field(default_factory=threading.Event)


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    """A webhook endpoint on loopback: records (path, headers, body) of each POST, then sets
    `arrived`."""
    received: list[tuple[str, dict[str, str], bytes]] = []
    arrived = threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            received.append((self.path, dict(self.headers), body))
            self.send_response(204)
            self.end_headers()
            arrived.set()

        def log_message(self, format: str, *args: object) -> None:  # no stderr noise
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield _Receiver(f"http://127.0.0.1:{server.server_address[1]}", received, arrived)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def cleanup_automation(prefect_harness) -> Iterator[None]:
    """The session's server outlives this test: its automation and block go with it."""
    yield
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        for automation in client.read_automations_by_name(NAME):
            client.delete_automation(automation.id)
    Webhook.delete(NAME)


def test_the_flow_name_is_the_one_the_trigger_matches() -> None:
    from flows.compress import compress_checkpoint
    from flows.notify import FLOW_NAME

    assert compress_checkpoint.name == FLOW_NAME


def test_a_failed_run_posts_its_message_to_the_webhook(
    prefect_harness, cleanup_automation, receiver: _Receiver, tmp_path: Path
) -> None:
    """Created twice (the second time to another URL, through the CLI): one automation and
    one block remain, pointing at the second URL. A completed run posts nothing; the failed run
    posts its name, id and the one-line error with its fix, as JSON."""
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from typer.testing import CliRunner

    from compressor.cli import app
    from flows.compress import compress_checkpoint
    from flows.notify import create_failure_webhook

    first = create_failure_webhook(f"{receiver.url}/old", name=NAME)
    done = CliRunner().invoke(app, ["notify-failures", f"{receiver.url}/hook", "--name", NAME])
    assert done.exit_code == 0, done.output
    with get_client(sync_client=True) as client:
        automations = client.read_automations_by_name(NAME)
    assert [a.id for a in automations] == [first] and str(first) in done.output
    assert Webhook.load(NAME).url.get_secret_value() == f"{receiver.url}/hook"

    source = generate_llama_checkpoint(tmp_path / "step-1", SHAPE, shard_mb=0.05, seed=1)
    ok = RunConfig(source=str(source), destination=str(tmp_path / "ok"), workers=0)
    assert compress_checkpoint(config=ok, return_state=True).is_completed()

    missing = tmp_path / "no-such-checkpoint"
    config = RunConfig(source=str(missing), destination=str(tmp_path / "out"), workers=0)
    state = compress_checkpoint(config=config, return_state=True)
    assert state.is_failed()
    run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        run_name = client.read_flow_run(run_id).name

    assert receiver.arrived.wait(WAIT_S), f"no webhook call within {WAIT_S} s of the failure"
    (request,) = list(receiver.requests)  # the completed run, earlier, posted nothing
    path, headers, raw = request
    assert path == "/hook"
    assert headers.get("Content-Type") == "application/json"
    body = json.loads(raw)
    assert body["flow_run_id"] == str(run_id)
    assert body["flow_run_name"] == run_name == "no-such-checkpoint-w4a16"
    assert body["state"] == "Failed"
    assert body["message"] == state.message
    assert str(missing) in body["message"] and "fix: " in body["message"], body
    assert body["text"] == f"compress-checkpoint run {run_name} failed: {state.message}"
