"""Bearer API keys per tenant, and the ASGI guards in front of the ingress routes.

Keys come from ``MULTITALK_API_KEYS`` (comma-separated ``tenant:key`` pairs) and/or the
file named by ``MULTITALK_API_KEYS_FILE`` (one ``tenant:key`` per line or comma-separated;
``#`` comments; a line may hold ``tenant:sha256:<64 hex>`` so that the file never holds a
clear key). Only SHA-256 digests are kept in memory and a presented key is compared with
:func:`hmac.compare_digest` against every digest (the time taken does not depend on which
key, if any, matched). The file is re-read when it changes (checked at most once a
second, ``deployments/watched_file.py``), so keys can be rotated without a restart: add the new key, roll the clients,
remove the old key.

No keys configured at all = open service (the embedded CPU default); a warning is logged.

:class:`AuthMiddleware` answers 401 (``WWW-Authenticate: Bearer``) before any route runs
and puts the caller's tenant in ``request.state.tenant``. :class:`BodyLimitMiddleware`
answers 413 from ``Content-Length`` before reading the body, and counts the bytes of
bodies that arrive without one (chunked), raising :class:`BodyTooLarge` (an
:class:`~multitalk.api.InputError`, 413) as soon as the cap is passed.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Optional

from multitalk.api import InputError

from .watched_file import WatchedFile

logger = logging.getLogger("multitalk.serve")

ENV_KEYS = "MULTITALK_API_KEYS"
ENV_KEYS_FILE = "MULTITALK_API_KEYS_FILE"
TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HASHED = re.compile(r"^sha256:([0-9a-fA-F]{64})$")
DEFAULT_EXEMPT = ("/healthz", "/")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def parse_keys(text: str, source: str = "keys") -> list[tuple[str, bytes]]:
    """``tenant:key`` entries (comma- or newline-separated) -> [(tenant, sha256 digest)]."""
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0]
        for item in line.split(","):
            item = item.strip()
            if not item:
                continue
            tenant, sep, key = item.partition(":")
            tenant, key = tenant.strip(), key.strip()
            if not sep or not key:
                raise ValueError(f"{source}: entry for tenant {tenant!r} is not 'tenant:key'")
            if not TENANT_RE.match(tenant):
                raise ValueError(f"{source}: tenant {tenant!r} must match {TENANT_RE.pattern}")
            m = _HASHED.match(key)
            out.append((tenant, bytes.fromhex(m.group(1)) if m else digest(key)))
    return out


class KeyRing:
    """Tenants' API keys, hashed. Thread-safe; reloads its file when it changes."""

    def __init__(self, keys: str = "", keys_file: Optional[str] = None, check_interval_s: float = 1.0):
        self._env_entries = parse_keys(keys or "", ENV_KEYS)
        # Re-read when it changes (deployments/watched_file.py): rotation without a restart.
        self._file: Optional[WatchedFile[list[tuple[str, bytes]]]] = None
        if keys_file:
            path = Path(keys_file).expanduser()
            self._file = WatchedFile(path, lambda text: parse_keys(text, str(path)), "API keys file", check_interval_s)
        if not self.configured:
            logger.warning("no API keys configured (%s / %s): the API is open to anyone who can reach it",
                           ENV_KEYS, ENV_KEYS_FILE)

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None, keys_file: Optional[str] = None) -> "KeyRing":
        env = os.environ if env is None else env
        return cls(env.get(ENV_KEYS, ""), keys_file or env.get(ENV_KEYS_FILE) or None)

    @property
    def keys_file(self) -> Optional[Path]:
        return self._file.path if self._file is not None else None

    @property
    def entries(self) -> list[tuple[str, bytes]]:
        return self._env_entries + (self._file.value if self._file is not None else [])

    @property
    def configured(self) -> bool:
        return bool(self.entries)

    def tenants(self) -> set[str]:
        return {t for t, _ in self.entries}

    def authenticate(self, key: Optional[str]) -> Optional[str]:
        """The tenant owning ``key``, or None. Compares against every stored digest."""
        entries = self.entries
        if not key:
            return None
        presented = digest(key)
        found = None
        for tenant, stored in entries:
            if hmac.compare_digest(presented, stored) and found is None:
                found = tenant
        return found


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> Optional[str]:
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


async def _send_error(send, status: int, message: str, field: Optional[str], headers: Optional[dict] = None) -> None:
    body = json.dumps({"error": {"field": field, "message": message, "status": status}}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class AuthMiddleware:
    """401 unless the request carries a valid bearer key (when any key is configured).

    ``exempt``: exact paths served without a key (health check, the static web page).
    The authenticated tenant goes into ``scope["state"]["tenant"]`` (``request.state.tenant``);
    it is None when the service is open.
    """

    def __init__(self, app, keyring: KeyRing, exempt: Iterable[str] = DEFAULT_EXEMPT):
        self.app = app
        self.keyring = keyring
        self.exempt = set(exempt)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = scope.setdefault("state", {})
        state["tenant"] = None
        if self.keyring.configured and scope.get("path") not in self.exempt:
            token = bearer_token(scope.get("headers") or [])
            tenant = self.keyring.authenticate(token)
            if tenant is None:
                msg = "missing bearer API key" if token is None else "invalid API key"
                return await _send_error(send, 401, msg, "Authorization", {"WWW-Authenticate": "Bearer"})
            state["tenant"] = tenant
        return await self.app(scope, receive, send)


class BodyTooLarge(InputError):
    def __init__(self, limit: int):
        super().__init__("body", f"request body larger than {limit} bytes", 413)


class BodyLimitMiddleware:
    """413 for bodies over ``max_bytes``: from ``Content-Length`` before reading anything,
    otherwise while the body streams in (nothing past the cap is handed to the route)."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = int(max_bytes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.max_bytes <= 0:
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers") or []:
            if name.lower() == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    return await _send_error(send, 400, "invalid Content-Length", "Content-Length")
                if declared > self.max_bytes:
                    return await _send_error(send, 413, f"request body larger than {self.max_bytes} bytes "
                                                        f"(Content-Length {declared})", "body")
        seen = 0
        limit = self.max_bytes

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return await self.app(scope, counted, send)
