"""How a webhook delivery is signed: Standard Webhooks (standardwebhooks.com), through the
``standardwebhooks`` library, plus the old ``X-MultiTalk-Signature`` header for one release.

Standard Webhooks headers on every delivery::

    webhook-id:        msg_<job id>_<run>   the same on every attempt of one message
    webhook-timestamp: <unix seconds>       the attempt's time (receivers refuse old ones)
    webhook-signature: v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>

The id is under the signature, so a receiver that dedupes on it cannot be fooled by a
replay with a changed id. It names the job *and* its run (``JobRecord.attempts``): a job run
again by RunPod's ``/retry`` sends a second, distinct message, while the replica that takes
over an undelivered webhook sends the same id again (receivers dedupe it).

Keys: the tenant's secret (``MULTITALK_WEBHOOK_SECRETS``). A ``whsec_<base64>`` secret is the
Standard Webhooks form (the key is the decoded bytes); any other string is used as it is
(its UTF-8 bytes), and :func:`standard_secret` gives the ``whsec_`` form a receiver's
library needs for it.

Deprecated, kept for one release for existing receivers: ``X-MultiTalk-Signature:
t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`` (the secret string's bytes as the key)
and ``X-MultiTalk-Delivery: <job id>``. Neither covers the delivery id; verify the Standard
Webhooks headers instead.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import time
from datetime import datetime, timezone
from typing import Optional

from standardwebhooks import Webhook

SIGNATURE_HEADER = "X-MultiTalk-Signature"  # deprecated (module docstring)
DELIVERY_HEADER = "X-MultiTalk-Delivery"  # deprecated
SECRET_PREFIX = "whsec_"


def signing_key(secret: str) -> bytes:
    """The HMAC key of a configured secret: a ``whsec_`` secret's decoded bytes, else the
    string's UTF-8 bytes."""
    if secret.startswith(SECRET_PREFIX):
        return base64.b64decode(secret[len(SECRET_PREFIX):] + "==")
    return secret.encode()


def standard_secret(secret: str) -> str:
    """The ``whsec_`` form of a configured secret (what a Standard Webhooks verifier takes)."""
    if secret.startswith(SECRET_PREFIX):
        return secret
    return SECRET_PREFIX + base64.b64encode(secret.encode()).decode()


def message_id(job_id: str, run: int) -> str:
    """The ``webhook-id`` of a job's final status after its ``run``-th run."""
    return f"msg_{job_id}_{run}"


def legacy_signature(secret: str, body: bytes, timestamp: Optional[int] = None) -> str:
    """The deprecated ``X-MultiTalk-Signature`` value for ``body``."""
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def delivery_headers(secret: str, body: bytes, msg_id: str, job_id: str,
                     timestamp: Optional[int] = None) -> dict[str, str]:
    """Every signature header of one delivery attempt of ``body`` (JSON, UTF-8)."""
    t = int(time.time()) if timestamp is None else timestamp
    signature = Webhook(signing_key(secret)).sign(msg_id, datetime.fromtimestamp(t, tz=timezone.utc),
                                                  body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(t),
        "webhook-signature": signature,
        SIGNATURE_HEADER: legacy_signature(secret, body, t),
        DELIVERY_HEADER: job_id,
    }
