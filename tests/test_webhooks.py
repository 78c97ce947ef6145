"""The webhook listener of `rlhf serve` (`annotation/webhooks.py`): only signed, recent calls wake it."""

from __future__ import annotations

import base64
import json
import time

import httpx

from annotation import webhooks

SECRET = "whsec_" + base64.b64encode(b"a secret of thirty-two bytes....").decode()


def call(
    listener: webhooks.Listener, body: bytes, secret: str = SECRET, stamp: float | None = None, path: str = ""
) -> int:
    stamp_text = str(int(time.time() if stamp is None else stamp))
    headers = {
        "webhook-id": "msg_1",
        "webhook-timestamp": stamp_text,
        "webhook-signature": webhooks.signature(secret, "msg_1", stamp_text, body),
        "content-type": "application/json",
    }
    url = listener.url if not path else listener.url.replace(webhooks.PATH, path)
    return httpx.post(url, content=body, headers=headers).status_code


def test_signed_recent_calls_are_accepted_and_forged_or_replayed_ones_refused():
    events: list[str] = []
    listener = webhooks.Listener(events.append)
    try:
        assert listener.url.startswith("http://127.0.0.1:")
        body = json.dumps({"type": "record.completed", "data": {}}).encode()
        assert call(listener, body) == 503  # no webhook registered yet: no secret to check against
        listener.secret = SECRET
        assert call(listener, body) == 204
        other = "whsec_" + base64.b64encode(b"another secret of 32 bytes......").decode()
        assert call(listener, body, secret=other) == 401  # forged
        assert call(listener, body, stamp=time.time() - 3600) == 401  # replayed an hour later
        assert call(listener, body, path="/elsewhere") == 404
        tampered = httpx.post(
            listener.url,
            content=body.replace(b"completed", b"deleted__"),
            headers={
                "webhook-id": "msg_1",
                "webhook-timestamp": str(int(time.time())),
                "webhook-signature": webhooks.signature(SECRET, "msg_1", str(int(time.time())), body),
            },
        )
        assert tampered.status_code == 401
        assert events == ["record.completed"] and listener.refused == 3
    finally:
        listener.close()
