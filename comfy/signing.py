"""Standard Webhooks signatures (https://www.standardwebhooks.com): the headers every delivery carries.

The signed content is `{webhook-id}.{webhook-timestamp}.{body}`; the signature is
`v1,<base64 of HMAC-SHA256(key, content)>`. A secret of the form `whsec_<base64>` stands for the bytes
it encodes (the Standard Webhooks convention); any other secret is used as its UTF-8 bytes."""
from __future__ import annotations

import base64
import binascii
import hashlib
import hmac

PREFIX = "whsec_"
MIN_KEY_BYTES = 16  # shorter keys are refused in the settings


def secret_key(secret: str) -> bytes:
    """The HMAC key a secret stands for; ValueError when a whsec_ secret is not valid base64."""
    if secret.startswith(PREFIX):
        try:
            return base64.b64decode(secret[len(PREFIX):], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the part after whsec_ is not valid base64") from None
    return secret.encode("utf-8")


def signature(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The webhook-signature header value of one attempt."""
    digest = hmac.new(key, b"%s.%d.%s" % (msg_id.encode(), timestamp, body), hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(key: bytes, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """Every header of one delivery attempt (the id stays the same on every retry; the timestamp is now)."""
    return {"Content-Type": "application/json", "webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(key, msg_id, timestamp, body), "User-Agent": "comfy-bridge-webhooks"}
