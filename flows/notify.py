r"""Failure notifications: a Prefect automation that calls a webhook when a compress run fails.

The flow already ends a run that fails for a reason this tool knows in a Failed state whose
message is the CLI's one line and its fix. `create_failure_webhook` makes the server carry that
message to an operator: a `Webhook` block holding the URL, and an automation whose trigger is
the failure event of a `compress-checkpoint` flow run and whose action POSTs a JSON body:

    {"text": "compress-checkpoint run llama-w4a16 failed: /data/llama: does not exist\n  fix: ...",
     "flow_run_id": "...", "flow_run_name": "llama-w4a16", "state": "Failed",
     "message": "/data/llama: does not exist\n  fix: ...",
     "url": "https://prefect.example.org/runs/flow-run/..." (null without PREFECT_UI_URL)}

`text` is what a Slack (or Mattermost, Teams workflow) incoming webhook shows; the other keys are
for anything that parses the body. The server's triggers and actions services do the work, so
nothing runs in the flow and a run that dies (Crashed) is reported as well.
"""

from __future__ import annotations

from uuid import UUID

__all__ = ["DEFAULT_NAME", "FAILURE_EVENTS", "FLOW_NAME", "PAYLOAD", "create_failure_webhook"]

FLOW_NAME = "compress-checkpoint"  # `flows.compress.compress_checkpoint`'s name (a test pins it)
DEFAULT_NAME = "compress-checkpoint-failed"
# A state's event is named after the state: TimedOut is a Failed-type state with its own name,
# Crashed a run the infrastructure lost (killed worker, out of memory).
FAILURE_EVENTS = frozenset(
    {"prefect.flow-run.Failed", "prefect.flow-run.TimedOut", "prefect.flow-run.Crashed"}
)
# Rendered by the server with Jinja (`flow_run` is read from the API, its state taken from the
# triggering event). `tojson` keeps the body valid JSON whatever a path or message holds; the id
# is a UUID, which stdlib json cannot encode, so it is quoted instead.
PAYLOAD = (
    "{"
    '"text": {{ ("' + FLOW_NAME + ' run " ~ flow_run.name ~ " "'
    ' ~ flow_run.state.name|lower ~ ": " ~ flow_run.state.message)|tojson }}, '
    '"flow_run_id": "{{ flow_run.id }}", '
    '"flow_run_name": {{ flow_run.name|tojson }}, '
    '"state": {{ flow_run.state.name|tojson }}, '
    '"message": {{ flow_run.state.message|tojson }}, '
    '"url": {{ flow_run|ui_url|tojson }}'
    "}"
)


def create_failure_webhook(
    url: str, name: str = DEFAULT_NAME, headers: dict[str, str] | None = None
) -> UUID:
    """Create or replace the automation `name` that POSTs `PAYLOAD` to `url` whenever a
    `compress-checkpoint` flow run fails, times out or crashes; returns the automation's id.

    Idempotent: the `Webhook` block `name` is overwritten and the automation of that name
    updated in place (extra ones of the same name, left by hand, are deleted), so running it
    again with another URL moves the notifications instead of duplicating them. `name` must be
    a valid block name (lowercase letters, digits and dashes). `headers` are sent with each call
    (e.g. an `Authorization` header); the block stores them and the URL as secrets.

    Example (against the server in PREFECT_API_URL)::

        create_failure_webhook("https://hooks.slack.com/services/T000/B000/XXXX")
    """
    from prefect.blocks.webhook import Webhook
    from prefect.client.orchestration import get_client
    from prefect.events.actions import CallWebhook
    from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

    block = Webhook(
        method="POST",
        url=url,  # pydantic keeps it (and the headers) as secrets
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    block_id: UUID = block.save(name, overwrite=True)  # type: ignore[assignment]
    automation = AutomationCore(
        name=name,
        description=f"POST the failed state's message of a {FLOW_NAME} run to a webhook.",
        trigger=EventTrigger(
            expect=set(FAILURE_EVENTS),
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={"prefect.resource.role": "flow", "prefect.resource.name": FLOW_NAME},
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[CallWebhook(block_document_id=block_id, payload=PAYLOAD)],
    )
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(name)
        if not existing:
            return client.create_automation(automation)
        keep, *extra = existing
        client.update_automation(keep.id, automation)
        for duplicate in extra:
            client.delete_automation(duplicate.id)
        return keep.id
