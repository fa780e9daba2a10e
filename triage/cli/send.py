"""`triage send`: post one ticket to a running API's generic webhook, signed as a helpdesk
would sign it. `triage run` prints one to paste."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import httpx
import typer

from triage.cli.common import EXIT_USAGE, console, fail, guarded

app = typer.Typer()


def post_generic(client: httpx.Client, payload: dict[str, Any], secret: str) -> httpx.Response:
    """POST a generic-source ticket, signed per Standard Webhooks with `secret`."""
    from triage.ingest.signing import sign

    body = json.dumps(payload).encode()
    msg_id, ts = f"msg_{uuid.uuid4().hex}", int(time.time())
    return client.post(
        "/webhooks/generic",
        content=body,
        headers={
            "content-type": "application/json",
            "webhook-id": msg_id,
            "webhook-timestamp": str(ts),
            "webhook-signature": sign(secret, msg_id, ts, body),
        },
    )


@app.command()
@guarded
def send(
    body: str = typer.Option(..., help="The customer's message."),
    subject: str = typer.Option("", help="The ticket's subject."),
    email: str = typer.Option("you@example.com", help="The requester's address."),
    external_id: str = typer.Option(
        None, help="The helpdesk's id for the ticket. Default: a fresh one."
    ),
    url: str = typer.Option("http://127.0.0.1:8000", help="The API's base URL."),
) -> None:
    """Post one ticket to the API's generic webhook, signed with TRIAGE_WEBHOOK_SECRET_GENERIC.

    Example: triage send --url http://127.0.0.1:8000 --subject 'Refund' --body 'Charged twice'
    """
    from triage.config import Settings

    secret = Settings().webhook_secret("generic")
    if not secret:
        fail("TRIAGE_WEBHOOK_SECRET_GENERIC is not set: the API would refuse it", EXIT_USAGE)
    payload = {
        "external_id": external_id or f"cli-{uuid.uuid4().hex[:12]}",
        "subject": subject,
        "body": body,
        "requester": {"email": email},
        "channel": "cli",
    }
    try:
        with httpx.Client(base_url=url, timeout=10) as client:
            resp = post_generic(client, payload, secret)
    except httpx.HTTPError as exc:
        fail(f"no answer from {url}: {exc} (is `triage serve` or `triage run` running?)")
    if resp.status_code != 202:
        detail = resp.text
        if resp.headers.get("content-type", "").startswith("application/problem+json"):
            detail = str(resp.json().get("detail") or detail)
        fail(f"{url}/webhooks/generic answered {resp.status_code}: {detail}")
    answer = resp.json()
    ticket = answer["ticket_id"]
    seen = " (already stored: a duplicate)" if answer.get("duplicate") else ""
    console.print(
        f"ticket {ticket} accepted{seen}; `triage tickets show {ticket}` shows its labels",
        highlight=False,
    )
