"""Webhooks: the final status of a job POSTed once to the URL its request named.

* **Where to.** ``webhook`` in ``/v1/jobs`` (and RunPod's top-level ``webhook``) is checked at
  submit under the same rules as inputs: ``http``/``https`` only, the host on the
  configured allow-list (``ingress.webhooks.allowed_hosts``: names, or ``*.example.com``),
  and every address it resolves to public, never loopback, private, link-local or
  reserved, unless ``allow_private`` is set (an in-VPC receiver). Without an allow-list a
  webhook is refused: the service makes no outbound call its operator did not allow. The
  address check runs again just before each delivery (DNS may change in between).
* **Signed.** Standard Webhooks headers (``webhook-id``, ``webhook-timestamp``,
  ``webhook-signature``; ``deployments/webhook_signing.py``, which also adds the deprecated
  ``X-MultiTalk-Signature``) with the tenant's secret (``MULTITALK_WEBHOOK_SECRETS`` /
  ``secrets_file``: ``tenant:secret`` entries, as the API keys, ``whsec_...`` secrets
  preferred; an open service uses the entry of tenant ``*``). ``webhook-id`` is signed and
  names one message: receivers dedupe on it. No secret for the tenant: the webhook is
  refused at submit.
* **At least once, with retries.** The replica that finishes the job delivers it in the
  background (the job's completion never waits for it), retrying connection errors, 429
  and 5xx with doubling backoff (``attempts``, ``backoff_s``); other 4xx answers end the
  delivery. The outcome lands in the record after every attempt (``webhook``:
  delivered_at, attempts, last status or error, ended_at). A finished job whose delivery
  has not ended stays in the store's list of unfinished work: when its replica dies before
  the delivery ends, the replica that takes the job over (``deployments.leases``) delivers
  it instead of re-running the job. So a receiver may, rarely, get one status twice (the
  old owner's POST landed, its record write did not): ``webhook-id`` is the same on both,
  dedupe on it.
"""
from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import socket
import time
from typing import Any, Callable, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field

from multitalk.api import InputError

from .webhook_signing import DELIVERY_HEADER, SIGNATURE_HEADER, delivery_headers  # noqa: F401 - re-exported
from .webhook_signing import legacy_signature as sign  # noqa: F401 - the old name

logger = logging.getLogger("multitalk.serve")

OPEN_SERVICE_TENANT = "*"


class WebhookSettings(BaseModel):
    """``ingress.webhooks`` in the serve config."""

    model_config = ConfigDict(extra="forbid")

    allowed_hosts: tuple[str, ...] = ()
    allow_private: bool = False
    secrets_file: Optional[str] = None  # else MULTITALK_WEBHOOK_SECRETS ("tenant:secret,...")
    attempts: int = Field(5, ge=1)
    backoff_s: float = 1.0
    timeout_s: float = 10.0


class WebhookInfo(BaseModel):
    """Delivery state in the job record."""

    url: str
    delivered_at: Optional[float] = None
    attempts: int = 0
    status_code: Optional[int] = None
    error: Optional[str] = None
    ended_at: Optional[float] = None  # delivered, refused, or out of attempts: nothing more to send


def _parse_secrets(text: str) -> dict[str, str]:
    out = {}
    for entry in text.replace("\n", ",").split(","):
        entry = entry.strip()
        if entry and not entry.startswith("#"):
            tenant, sep, secret = entry.partition(":")
            if not sep or not secret.strip():
                raise ValueError("webhook secrets are 'tenant:secret' entries")
            out[tenant.strip()] = secret.strip()
    return out


def _host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    host = host.lower().rstrip(".")
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if host == entry or (entry.startswith("*.") and host.endswith(entry[1:])):
            return True
    return False


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    return not (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
                or ip.is_unspecified)


class Webhooks:
    """Checks webhook URLs at submit and delivers final statuses (module docstring)."""

    def __init__(self, settings: Optional[WebhookSettings] = None, env: Optional[dict] = None,
                 resolve: Callable[[str], list[str]] = None):
        self.settings = settings or WebhookSettings()
        env = os.environ if env is None else env
        text = env.get("MULTITALK_WEBHOOK_SECRETS", "")
        if self.settings.secrets_file:
            text += "\n" + open(os.path.expanduser(self.settings.secrets_file)).read()
        self._secrets = _parse_secrets(text)
        self._resolve = resolve or (lambda host: [a[4][0] for a in socket.getaddrinfo(host, None)])

    def secret_for(self, tenant: Optional[str]) -> Optional[str]:
        return self._secrets.get(tenant if tenant is not None else OPEN_SERVICE_TENANT)

    def check(self, url: str, tenant: Optional[str], field: str = "webhook") -> str:
        """The URL if a webhook may be sent there for ``tenant``; else an InputError naming ``field``."""
        parts = urlsplit(url.strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(field, "must be an http(s) URL")
        if parts.username or parts.password:
            raise InputError(field, "must not carry credentials")
        if not self.settings.allowed_hosts:
            raise InputError(field, "webhooks are not enabled on this server (ingress.webhooks.allowed_hosts)", 403)
        if not _host_allowed(parts.hostname, self.settings.allowed_hosts):
            raise InputError(field, f"host {parts.hostname!r} is not on this server's webhook allow-list", 403)
        self._check_addresses(parts.hostname, field)
        if self.secret_for(tenant) is None:
            raise InputError(field, "no webhook signing secret is configured for this tenant "
                                    "(MULTITALK_WEBHOOK_SECRETS)", 403)
        return url.strip()

    def _check_addresses(self, host: str, field: str) -> None:
        try:
            addresses = self._resolve(host)
        except OSError as e:
            raise InputError(field, f"host {host!r} does not resolve: {e}") from None
        if not self.settings.allow_private:
            bad = [a for a in addresses if not _public(a)]
            if bad:
                raise InputError(field, f"host {host!r} resolves to a private or loopback address ({bad[0]})", 403)

    async def deliver(self, info: WebhookInfo, payload: dict, tenant: Optional[str], delivery_id: str,
                      on_update: Callable[[WebhookInfo], Any], message_id: Optional[str] = None) -> WebhookInfo:
        """POST ``payload`` until it is accepted or the attempts run out; ``on_update`` is
        called (and awaited) after every attempt with the state to persist. ``message_id``:
        the signed ``webhook-id`` (default ``delivery_id``, the job id)."""
        import requests

        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        secret = self.secret_for(tenant) or ""
        for attempt in range(1, self.settings.attempts + 1):
            info.attempts = attempt
            retry = False
            try:
                self._check_addresses(urlsplit(info.url).hostname or "", "webhook")
                headers = {"Content-Type": "application/json",
                           **delivery_headers(secret, body, message_id or delivery_id, delivery_id)}
                r = await asyncio.to_thread(requests.post, info.url, data=body, headers=headers,
                                            timeout=self.settings.timeout_s, allow_redirects=False)
                info.status_code, info.error = r.status_code, None
                if 200 <= r.status_code < 300:
                    info.delivered_at = time.time()
                else:
                    retry = r.status_code == 429 or r.status_code >= 500
                    info.error = f"answered {r.status_code}"
            except InputError as e:  # the host now resolves somewhere it may not go
                info.error = e.message
            except requests.RequestException as e:
                info.error, retry = f"{type(e).__name__}: {str(e)[:200]}", True
            if info.delivered_at is not None or not retry or attempt == self.settings.attempts:
                info.ended_at = time.time()
            await on_update(info)
            if info.ended_at is not None:
                break
            await asyncio.sleep(self.settings.backoff_s * 2 ** (attempt - 1))
        if info.delivered_at is None:
            logger.warning("webhook %s not delivered after %d attempt(s): %s", info.url, info.attempts, info.error)
        return info
