"""Webhooks: the final status of a job POSTed once to the URL its request named.

* **Where to.** ``webhook`` in ``/v1/jobs`` (and RunPod's top-level ``webhook``) is checked at
  submit under the same rules as inputs: ``http``/``https`` only, the host on the
  configured allow-list (``ingress.webhooks.allowed_hosts``: names, or ``*.example.com``),
  and every address it resolves to public, never loopback, private, link-local or
  reserved, unless ``allow_private`` is set (an in-VPC receiver). Without an allow-list a
  webhook is refused: the service makes no outbound call its operator did not allow.
* **Connected where checked.** Every delivery attempt resolves the host once, off the
  event loop, checks every address, and connects to those addresses only: the HTTP client
  is handed a resolver that answers with the checked addresses (:class:`PinnedResolver`)
  and never looks the name up again, so a DNS answer that changes between the check and
  the connection (DNS rebinding) cannot send the POST anywhere unchecked. The name still
  goes in the ``Host`` header and, for https, in SNI and the certificate check.
  Environment proxies are not used (a proxy would resolve the name itself); redirects are
  not followed.
* **Signed.** Standard Webhooks headers (``webhook-id``, ``webhook-timestamp``,
  ``webhook-signature``; ``deployments/webhook_signing.py``, which also adds the deprecated
  ``X-MultiTalk-Signature``) with the tenant's secret (``MULTITALK_WEBHOOK_SECRETS`` /
  ``secrets_file``: ``tenant:secret`` entries, as the API keys, ``whsec_...`` secrets
  preferred; an open service uses the entry of tenant ``*``). The secrets file is read again
  when it changes (checked at most once a second, ``deployments/watched_file.py``): a secret
  rotates without a restart. ``webhook-id`` is signed and names one message: receivers
  dedupe on it. No secret for the tenant: the webhook is refused at submit.
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

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from pydantic import BaseModel, ConfigDict, Field

from multitalk.api import InputError

from .watched_file import WatchedFile
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


def _getaddrinfo(host: str) -> list[str]:
    """Every address ``host`` resolves to (blocking: called in a worker thread)."""
    return list(dict.fromkeys(a[4][0] for a in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)))


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver for one delivery: ``host`` resolves to the addresses that were
    checked, and nothing else resolves at all (a redirect or a proxy could not go elsewhere)."""

    def __init__(self, host: str, addresses: list[str]):
        self.host, self.addresses = host, list(addresses)

    async def resolve(self, host: str, port: int = 0, family: int = socket.AF_INET) -> list[ResolveResult]:
        if host != self.host:
            raise OSError(f"{host!r} was not checked for this webhook")
        return [{"hostname": host, "host": address, "port": port,
                 "family": socket.AF_INET6 if ":" in address else socket.AF_INET,
                 "proto": 0, "flags": socket.AI_NUMERICHOST} for address in self.addresses]

    async def close(self) -> None:
        return None


class Webhooks:
    """Checks webhook URLs at submit and delivers final statuses (module docstring)."""

    def __init__(self, settings: Optional[WebhookSettings] = None, env: Optional[dict] = None,
                 resolve: Callable[[str], list[str]] = None):
        self.settings = settings or WebhookSettings()
        env = os.environ if env is None else env
        self._env_secrets = _parse_secrets(env.get("MULTITALK_WEBHOOK_SECRETS", ""))
        self._secrets_file: Optional[WatchedFile[dict[str, str]]] = None
        if self.settings.secrets_file:
            self._secrets_file = WatchedFile(self.settings.secrets_file, _parse_secrets, "webhook secrets file")
        self._resolve = resolve or _getaddrinfo

    def secret_for(self, tenant: Optional[str]) -> Optional[str]:
        secrets = {**self._env_secrets, **(self._secrets_file.value if self._secrets_file is not None else {})}
        return secrets.get(tenant if tenant is not None else OPEN_SERVICE_TENANT)

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

    def _check_addresses(self, host: str, field: str) -> list[str]:
        """The addresses ``host`` resolves to, each one checked (blocking: resolves)."""
        try:
            addresses = self._resolve(host)
        except OSError as e:
            raise InputError(field, f"host {host!r} does not resolve: {e}") from None
        if not addresses:
            raise InputError(field, f"host {host!r} does not resolve")
        if not self.settings.allow_private:
            bad = [a for a in addresses if not _public(a)]
            if bad:
                raise InputError(field, f"host {host!r} resolves to a private or loopback address ({bad[0]})", 403)
        return addresses

    async def deliver(self, info: WebhookInfo, payload: dict, tenant: Optional[str], delivery_id: str,
                      on_update: Callable[[WebhookInfo], Any], message_id: Optional[str] = None) -> WebhookInfo:
        """POST ``payload`` until it is accepted or the attempts run out; ``on_update`` is
        called (and awaited) after every attempt with the state to persist. ``message_id``:
        the signed ``webhook-id`` (default ``delivery_id``, the job id)."""
        body = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
        host = urlsplit(info.url).hostname or ""
        loop = asyncio.get_running_loop()
        for attempt in range(1, self.settings.attempts + 1):
            info.attempts = attempt
            retry = False
            try:
                # Resolved once, in a worker thread; the POST goes to these addresses only.
                addresses, secret = await loop.run_in_executor(None, self._prepare, host, tenant)
                headers = {"Content-Type": "application/json",
                           **delivery_headers(secret, body, message_id or delivery_id, delivery_id)}
                status = await self._post(info.url, host, addresses, body, headers)
                info.status_code, info.error = status, None
                if 200 <= status < 300:
                    info.delivered_at = time.time()
                else:
                    retry = status == 429 or status >= 500
                    info.error = f"answered {status}"
            except InputError as e:  # the host now resolves somewhere it may not go
                info.error = e.message
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
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

    def _prepare(self, host: str, tenant: Optional[str]) -> tuple[list[str], str]:
        """One attempt's blocking part (a worker thread): the checked addresses of ``host``, and
        the tenant's current secret (its file may be read again)."""
        return self._check_addresses(host, "webhook"), self.secret_for(tenant) or ""

    async def _post(self, url: str, host: str, addresses: list[str], body: bytes, headers: dict) -> int:
        """One POST of ``body`` to ``url``, connected to one of ``addresses`` (checked for
        ``host``); the answer's status code."""
        connector = aiohttp.TCPConnector(resolver=PinnedResolver(host, addresses), use_dns_cache=False,
                                         force_close=True)
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_s)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:
            async with session.post(url, data=body, headers=headers, allow_redirects=False) as response:
                return response.status
