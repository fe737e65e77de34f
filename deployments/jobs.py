"""Job records persisted as JSON in the store, next to the outputs.

``jobs/{id}.json`` holds one :class:`JobRecord`; ``jobs/idempotency/{sha256}.json`` maps an
``Idempotency-Key`` to the job it created; ``jobs/active/{id}`` marks an unfinished job;
``jobs/{id}.cancel`` is a cancel request for a job another ingress replica owns;
``jobs/claims/{id}/{n}`` records who took over an orphaned job for the n-th time;
``jobs/index/{scope}/{stamp}-{id}`` lists jobs newest first (one scope for all jobs, one per
tenant), so ``GET /v1/jobs`` reads one page of records, not all of them. Records are
the source of truth: a restarted ingress reloads them and runs again whatever was queued or
in progress (:meth:`JobStore.orphans`).

Taking over is atomic: every replica that finds an orphan with lease number ``n`` tries to
create ``claims/{id}/{n+1}`` with a put-if-absent (:meth:`Store.create`); only the one that
creates it runs the job. The former owner, if it was only slow, sees the claim at its next
heartbeat and stops (:meth:`JobStore.superseded`).

All methods are blocking (S3 calls); the async ingress calls them via ``asyncio.to_thread``.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from typing import Any, Optional

from pydantic import BaseModel, Field

from multitalk.api import InputError

from .schemas import ErrorInfo, JobRequest, JobState, JobStatus, ProgressInfo, ResultInfo
from .chunk_results import ChunkInfo
from .storage import NotFound, Store
from .webhooks import WebhookInfo

JOBS_PREFIX = "jobs/"
IDEMPOTENCY_PREFIX = "jobs/idempotency/"
# One empty object per unfinished job, so recovery lists only those instead of reading
# every record ever written.
ACTIVE_PREFIX = "jobs/active/"
CLAIMS_PREFIX = "jobs/claims/"
INDEX_PREFIX = "jobs/index/"
CURSOR_PATTERN = r"^\d{16}-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
_CURSOR = re.compile(CURSOR_PATTERN)


def _index_scope(tenant: Optional[str]) -> str:
    # Tenant names come from the API key file; hashed so that any name makes a safe key.
    return "all" if tenant is None else "tenant-" + hashlib.sha256(tenant.encode()).hexdigest()[:16]


def _index_name(record: "JobRecord") -> str:
    # Inverted microseconds: S3 lists keys in ascending order, so the newest job comes first.
    return f"{10**16 - int(record.created_at * 1e6):016d}-{record.id}"


def index_cursor(record: "JobRecord") -> str:
    """The ``after`` cursor of :meth:`JobStore.recent` that pages past ``record``."""
    return _index_name(record)


def output_key(job_id: str, tenant: Optional[str] = None) -> str:
    return f"outputs/{tenant}/{job_id}.mp4" if tenant else f"outputs/{job_id}.mp4"


def valid_job_id(job_id: str) -> bool:
    try:
        return str(uuid.UUID(job_id)) == job_id
    except (ValueError, TypeError, AttributeError):
        return False


class JobRecord(BaseModel):
    """Everything known about a job. Inputs are references, never bytes."""

    id: str
    state: JobState = JobState.IN_QUEUE
    created_at: float
    updated_at: float
    started_at: Optional[float] = None
    finished_at: Optional[float] = None
    request: Optional[JobRequest] = None
    action: str = "generate"  # RunPod action; non-generate actions complete at once
    source: str = "api"  # "api" | "runpod" | "handle": how field names are reported
    tenant: Optional[str] = None  # API-key tenant that submitted it (None: open service)
    idempotency_key: Optional[str] = None
    progress: ProgressInfo = Field(default_factory=ProgressInfo)
    timings: dict[str, float] = Field(default_factory=dict)
    result: Optional[ResultInfo] = None
    output: Optional[dict[str, Any]] = None
    error: Optional[ErrorInfo] = None
    options_applied: dict[str, Any] = Field(default_factory=dict)  # {field: {value, source}} (request_options)
    webhook: Optional[WebhookInfo] = None  # delivery of the final status (deployments/webhooks.py)
    chunks: list[ChunkInfo] = Field(default_factory=list)  # streaming: the chunks finished so far
    owner: Optional[str] = None  # ingress replica running it
    heartbeat_at: Optional[float] = None
    lease: int = 0  # how many times an ingress replica took the job over (claims/{id}/{lease})
    attempts: int = 0

    def status(self) -> JobStatus:
        return JobStatus(**self.model_dump(include=set(JobStatus.model_fields)))

    @property
    def webhook_pending(self) -> bool:
        """Finished, with a webhook whose delivery has not ended (``deployments.webhooks``)."""
        return (self.state.terminal and self.request is not None and bool(self.request.webhook)
                and (self.webhook is None or self.webhook.ended_at is None))


class JobStore:
    """CRUD for :class:`JobRecord` over a :class:`~deployments.storage.Store`."""

    def __init__(self, store: Store):
        self.store = store
        self._lock = threading.Lock()  # serialises idempotent creates within a replica

    @staticmethod
    def _key(job_id: str) -> str:
        return f"{JOBS_PREFIX}{job_id}.json"

    @staticmethod
    def _idem_key(key: str) -> str:
        return IDEMPOTENCY_PREFIX + hashlib.sha256(key.encode()).hexdigest() + ".json"

    @staticmethod
    def _fingerprint(request: Optional[JobRequest], action: str) -> str:
        body = request.model_dump_json() if request is not None else ""
        return hashlib.sha256(f"{action}\n{body}".encode()).hexdigest()

    def create(
        self,
        request: Optional[JobRequest],
        idempotency_key: Optional[str] = None,
        source: str = "api",
        action: str = "generate",
        job_id: Optional[str] = None,
        tenant: Optional[str] = None,
    ) -> tuple[JobRecord, bool]:
        """Create and persist a queued job; returns ``(record, created)``.

        With an ``idempotency_key`` already seen, returns the earlier job and ``False``;
        the same key with a different request body is a client bug (409).
        """
        with self._lock:
            fingerprint = self._fingerprint(request, action)
            if idempotency_key:
                try:
                    known = json.loads(self.store.get(self._idem_key(idempotency_key)))
                except NotFound:
                    known = None
                if known:
                    if known.get("fingerprint") != fingerprint:
                        raise InputError(
                            "Idempotency-Key", "key already used for a different request", 409
                        )
                    existing = self.get(known["job_id"])
                    if existing is not None:
                        return existing, False
            now = time.time()
            record = JobRecord(
                id=job_id or str(uuid.uuid4()),
                created_at=now,
                updated_at=now,
                request=request,
                action=action,
                source=source,
                idempotency_key=idempotency_key,
                tenant=tenant,
            )
            if action == "generate":
                self.store.put(ACTIVE_PREFIX + record.id, b"", "text/plain")
            self.save(record, touch=False)
            for scope in {_index_scope(None), _index_scope(tenant)}:
                self.store.put(f"{INDEX_PREFIX}{scope}/{_index_name(record)}", b"", "text/plain")
            if idempotency_key:
                mapping = {"key": idempotency_key, "job_id": record.id, "fingerprint": fingerprint}
                self.store.put(self._idem_key(idempotency_key), json.dumps(mapping).encode(), "application/json")
            return record, True

    def save(self, record: JobRecord, touch: bool = True) -> None:
        if touch:
            record.updated_at = time.time()
        self.store.put(self._key(record.id), record.model_dump_json().encode(), "application/json")
        if record.state.terminal and record.action == "generate" and not record.webhook_pending:
            self.store.delete(ACTIVE_PREFIX + record.id)

    def get(self, job_id: str) -> Optional[JobRecord]:
        if not valid_job_id(job_id):
            return None
        try:
            return JobRecord.model_validate_json(self.store.get(self._key(job_id)))
        except NotFound:
            return None

    def list_ids(self) -> list[str]:
        ids = []
        for key in self.store.list(JOBS_PREFIX):
            name = key[len(JOBS_PREFIX):]
            if "/" not in name and name.endswith(".json"):
                ids.append(name[: -len(".json")])
        return ids

    def recent(self, tenant: Optional[str] = None, limit: int = 20,
               after: Optional[str] = None) -> tuple[list[JobRecord], Optional[str]]:
        """One page of jobs, newest first: ``(records, cursor of the next page or None)``.

        ``tenant`` None: every job; else that tenant's. ``after``: a cursor from an earlier
        page (400 if malformed). Reads ``limit`` records, however many jobs exist.
        """
        if after is not None and not _CURSOR.match(after):
            raise InputError("after", "not a cursor from an earlier page", 400)
        prefix = f"{INDEX_PREFIX}{_index_scope(tenant)}/"
        keys = self.store.list(prefix, start_after=prefix + after if after else None, limit=limit)
        ids = [k[len(prefix) + 17:] for k in keys]  # after "<16-digit stamp>-"
        records = [rec for rec in map(self.get, ids) if rec is not None]
        cursor = keys[-1][len(prefix):] if len(keys) == limit else None
        return records, cursor

    def load_all(self) -> list[JobRecord]:
        records = []
        for job_id in self.list_ids():
            rec = self.get(job_id)
            if rec is not None:
                records.append(rec)
        return sorted(records, key=lambda r: r.created_at)

    def orphans(self, lease_s: float, owner: Optional[str] = None) -> list[JobRecord]:
        """Unfinished jobs nobody is running, and finished ones whose webhook nobody is
        delivering: their owner's heartbeat is older than ``lease_s`` (or they have no
        owner). ``owner``'s own jobs are never orphans."""
        now = time.time()
        found = []
        for key in self.store.list(ACTIVE_PREFIX):
            rec = self.get(key[len(ACTIVE_PREFIX):])
            if rec is None:
                continue
            if (rec.state.terminal and not rec.webhook_pending) or rec.action != "generate":
                continue
            if owner is not None and rec.owner == owner:
                continue
            beat = rec.heartbeat_at or rec.updated_at
            if rec.owner is None or now - beat > lease_s:
                found.append(rec)
        return sorted(found, key=lambda r: r.created_at)

    def claim(self, record: JobRecord, owner: str) -> bool:
        """Take over an orphaned job: ``True`` (and ``record.lease`` advanced) for exactly one
        of the replicas that try with the same record."""
        if not self.store.create(f"{CLAIMS_PREFIX}{record.id}/{record.lease + 1}", owner.encode(), "text/plain"):
            return False
        record.lease += 1
        record.owner = owner
        return True

    def superseded(self, record: JobRecord) -> bool:
        """Another replica has claimed the job since ``record``'s owner took it."""
        return self.store.exists(f"{CLAIMS_PREFIX}{record.id}/{record.lease + 1}")

    def unfinished(self) -> list[JobRecord]:
        """The records on the unfinished-work list (queued, running, or a webhook to deliver)."""
        return [rec for rec in map(self.get, (k[len(ACTIVE_PREFIX):] for k in self.store.list(ACTIVE_PREFIX)))
                if rec is not None]

    def reopen(self, record: JobRecord) -> None:
        """A finished job queued again (RunPod's ``/retry``): back on the unfinished-work
        list, an old cancel request dropped."""
        self.store.delete(f"{JOBS_PREFIX}{record.id}.cancel")
        self.store.put(ACTIVE_PREFIX + record.id, b"", "text/plain")

    def delete(self, job_id: str) -> None:
        """Forget a finished job (``DELETE /v1/videos/{id}``): its record and markers. Index
        entries stay (a page skips records that are gone)."""
        for key in (f"{JOBS_PREFIX}{job_id}.cancel", ACTIVE_PREFIX + job_id, self._key(job_id)):
            self.store.delete(key)

    # Cancel requests for jobs another replica runs: a marker the owner polls.
    def request_cancel(self, job_id: str) -> None:
        self.store.put(f"{JOBS_PREFIX}{job_id}.cancel", b"1", "text/plain")

    def cancel_requested(self, job_id: str) -> bool:
        return self.store.exists(f"{JOBS_PREFIX}{job_id}.cancel")
