"""Argilla's events for `rlhf serve`: a webhook registered on the annotation server, and the local listener
it calls, so the loop moves when a record is completed instead of at the next poll.

argilla-server 2.4+ sends Standard Webhooks (https://www.standardwebhooks.com): a JSON body and the
headers `webhook-id`, `webhook-timestamp` and `webhook-signature` (`v1,<base64 HMAC-SHA256>` of
`id.timestamp.body` under the webhook's secret, which the server returns once, when the webhook is
created). The listener binds 127.0.0.1 on a free port, accepts only POSTs whose signature verifies with
that secret and whose timestamp is within `TOLERANCE_S` of now (a replayed or forged call is refused with
401 and counted), and reads at most `MAX_BODY` bytes. Each accepted event calls `on_event(type)`.

The webhook is deleted when the listener closes. A server on another machine cannot reach 127.0.0.1
here: `reachable` says so, and the service keeps polling instead.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

from annotation import server
from annotation.argilla_dataset import Api

EVENTS = ("record.completed", "response.updated", "response.deleted")
"""What wakes the service: a record got its last needed answer (Argilla's task distribution), or an
answer of a completed record changed."""
PATH = "/argilla-events"
TOLERANCE_S = 300
"""How far a call's timestamp may be from now."""
MAX_BODY = 1 << 20


def signature(secret: str, msg_id: str, timestamp: str, body: bytes) -> str:
    """The Standard Webhooks signature `v1,<base64>` of a call."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: str, headers: Any, body: bytes, now: float | None = None) -> bool:
    """Whether a call is signed with `secret` and recent (headers: any mapping with `get`)."""
    msg_id, stamp, signatures = (
        headers.get(h) for h in ("webhook-id", "webhook-timestamp", "webhook-signature")
    )
    if not (msg_id and stamp and signatures) or not stamp.isdigit():
        return False
    if abs((time.time() if now is None else now) - int(stamp)) > TOLERANCE_S:
        return False
    expected = signature(secret, msg_id, stamp, body)
    return any(hmac.compare_digest(expected, given) for given in signatures.split())


def reachable(connection: server.Connection) -> bool:
    """Whether the annotation server runs on this machine (only then can it call a 127.0.0.1 listener)."""
    return httpx.URL(connection.url).host in ("127.0.0.1", "localhost", "::1")


class Listener:
    """A local HTTP listener for one Argilla webhook; `register` creates the webhook, `close` deletes it."""

    def __init__(self, on_event: Callable[[str], None]):
        self.on_event = on_event
        self.secret: str | None = None
        self.webhook_id: str | None = None
        self.connection: server.Connection | None = None
        self.accepted: Counter[str] = Counter()
        self.refused = 0
        listener = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if self.path != PATH or length > MAX_BODY or listener.secret is None:
                    self.send_response(404 if self.path != PATH else 413 if length > MAX_BODY else 503)
                    self.end_headers()
                    return
                body = self.rfile.read(length)
                if not verify(listener.secret, self.headers, body):
                    listener.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                try:
                    event = str(json.loads(body).get("type", "?"))
                except ValueError:
                    event = "?"
                listener.accepted[event] += 1
                self.send_response(204)
                self.end_headers()
                listener.on_event(event)

            def log_message(self, format: str, *args: Any) -> None:  # the service logs what matters
                pass

        self.http = ThreadingHTTPServer((server.HOST, 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, name="argilla-webhooks", daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://{server.HOST}:{self.http.server_address[1]}{PATH}"

    def register(self, connection: server.Connection, description: str) -> None:
        """Create the webhook on the annotation server (raises `ArgillaServerError` when it cannot)."""
        with Api(connection) as api:
            created = api.post(
                "/api/v1/webhooks",
                json={"url": self.url, "events": list(EVENTS), "description": description[:1000]},
            )
        self.connection, self.webhook_id, self.secret = connection, created["id"], created["secret"]

    def close(self) -> None:
        """Delete the webhook (when the server is still there) and stop listening."""
        if self.connection is not None and self.webhook_id is not None:
            try:
                with Api(self.connection, timeout=10.0) as api:
                    api.request("DELETE", f"/api/v1/webhooks/{self.webhook_id}")
            except server.ArgillaServerError:
                pass  # the server is gone, and its webhooks with it
        self.http.shutdown()
        self.http.server_close()


def description(workflow: str) -> str:
    return f"rlhf serve {workflow} (pid {os.getpid()})"
