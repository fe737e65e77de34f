"""Job records persisted as JSON in the store, next to the outputs.

``jobs/{id}.json`` holds one :class:`JobRecord`; ``jobs/idempotency/{sha256}.json`` maps an
``Idempotency-Key`` to the job it created; ``jobs/active/{id}`` marks an unfinished job;
``jobs/claims/{id}/{n}`` records who took over an orphaned job for the n-th time;
``jobs/index/{scope}/{stamp}-{id}`` lists jobs newest first (one scope for all jobs, one per
tenant), so ``GET /v1/jobs`` reads one page of records, not all of them. Records are
the source of truth: a restarted ingress reloads them and runs again whatever was queued or
in progress (:meth:`JobStore.orphans`).

Every write of a record is conditional (:meth:`~deployments.storage.Store.put_if`): a record
read or written here carries the store's version of it, and :meth:`JobStore.save` fails with
:class:`RecordConflict` when another writer changed the record since. That is what keeps
several ingress replicas honest:

* **One job per idempotency key.** The key's mapping is created if absent *before* the job
  exists; of two replicas receiving the same key at once, one creates the mapping and the
  job, the other reads the mapping and returns that job (:meth:`JobStore.create`).
* **Taking over** an orphan is a conditional write of its record, based on the version in
  which its heartbeat was seen stale: of the replicas that race, exactly one wins, and none
  does if the owner was only slow and wrote a heartbeat in between (:meth:`JobStore.claim`).
* **A cancel through another replica** is a conditional write too (:meth:`JobStore.cancel`);
  the owner's next write conflicts, it reads the record, sees the cancel and stops, and the
  record stays cancelled. An owner whose write conflicts because another replica took the
  job over stops without writing again (``deployments.leases``).

All methods are blocking (S3 calls); the async ingress calls them in worker threads.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import uuid
from typing import Any, Optional

from pydantic import BaseModel, Field, PrivateAttr

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
# How long a replica that lost the race for an idempotency key waits for the winner to
# write the job it reserved the key for (the winner writes it right after the mapping);
# after that the winner is taken to have died in between and the key is taken over.
IDEMPOTENCY_WAIT_S = 10.0
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
    # The store's version of the record this copy was read or written at (not persisted):
    # what the next conditional write of it is based on (JobStore.save).
    _version: Optional[str] = PrivateAttr(default=None)

    def status(self) -> JobStatus:
        return JobStatus(**self.model_dump(include=set(JobStatus.model_fields)))

    @property
    def webhook_pending(self) -> bool:
        """Finished, with a webhook whose delivery has not ended (``deployments.webhooks``)."""
        return (self.state.terminal and self.request is not None and bool(self.request.webhook)
                and (self.webhook is None or self.webhook.ended_at is None))


class RecordConflict(Exception):
    """A conditional write of a job record lost: another writer changed it since it was
    read. ``stored`` is the record as it is now (``None`` if it is gone)."""

    def __init__(self, job_id: str, stored: Optional[JobRecord]):
        super().__init__(f"job record {job_id} changed since it was read")
        self.stored = stored


class JobStore:
    """CRUD for :class:`JobRecord` over a :class:`~deployments.storage.Store`."""

    def __init__(self, store: Store, idempotency_wait_s: float = IDEMPOTENCY_WAIT_S):
        self.store = store
        self.idempotency_wait_s = idempotency_wait_s

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
        owner: Optional[str] = None,
        options_applied: Optional[dict[str, Any]] = None,
    ) -> tuple[JobRecord, bool]:
        """Create and persist a queued job; returns ``(record, created)``.

        With an ``idempotency_key`` already seen, here or by another replica at the same
        moment, returns the earlier job and ``False``; the same key with a different request
        body is a client bug (409). ``owner``: the replica that will run it (its heartbeat
        starts now).
        """
        fingerprint = self._fingerprint(request, action)
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
            owner=owner,
            heartbeat_at=now if owner else None,
            options_applied=dict(options_applied or {}),
        )
        if idempotency_key:
            earlier = self._reserve_key(idempotency_key, fingerprint, record.id)
            if earlier is not None:
                return earlier, False
        try:
            if action == "generate":
                self.store.put(ACTIVE_PREFIX + record.id, b"", "text/plain")
            version = self.store.put_if(self._key(record.id), record.model_dump_json().encode(), "application/json",
                                        if_version=None)
            if version is None:
                raise InputError("id", f"job {record.id} exists already", 409)
            record._version = version
        except BaseException:
            if idempotency_key:  # free the key, so that the client's retry is not kept waiting
                try:
                    self.store.delete(self._idem_key(idempotency_key))
                except Exception:  # noqa: BLE001 - the store failed already; the reservation expires
                    pass
            raise
        for scope in {_index_scope(None), _index_scope(tenant)}:
            self.store.put(f"{INDEX_PREFIX}{scope}/{_index_name(record)}", b"", "text/plain")
        return record, True

    def _reserve_key(self, key: str, fingerprint: str, job_id: str) -> Optional[JobRecord]:
        """Map ``key`` to ``job_id`` if no job has it yet (``None``: reserved for us), else
        the job it maps to. Create-if-absent in the store, so of several replicas that
        receive the key at once exactly one reserves it."""
        path = self._idem_key(key)
        mapping = json.dumps({"key": key, "job_id": job_id, "fingerprint": fingerprint}).encode()
        based_on: Optional[str] = None  # None: only if absent; else the version of a dead reservation
        while True:
            if self.store.put_if(path, mapping, "application/json", if_version=based_on) is not None:
                return None
            try:
                raw, version = self.store.get_versioned(path)
            except NotFound:  # freed by a creator that failed: try again
                based_on = None
                continue
            known = json.loads(raw)
            if known.get("fingerprint") != fingerprint:
                raise InputError("Idempotency-Key", "key already used for a different request", 409)
            earlier = self._await_record(known["job_id"])
            if earlier is not None:
                return earlier
            # Reserved, but the job never appeared: its creator died in between. Take the
            # key over, conditionally, so that one of several waiting replicas does.
            based_on = version

    def _await_record(self, job_id: str) -> Optional[JobRecord]:
        deadline = time.monotonic() + self.idempotency_wait_s
        while True:
            record = self.get(job_id)
            if record is not None or time.monotonic() >= deadline:
                return record
            time.sleep(0.05)

    def save(self, record: JobRecord, touch: bool = True) -> None:
        """Persist ``record``. A record read or written through this store carries its
        version and is written only if nobody changed it since (else :class:`RecordConflict`
        with the stored record); a record built elsewhere is written as it is."""
        if touch:
            record.updated_at = time.time()
        data = record.model_dump_json().encode()
        if record._version is None:
            version = self.store.put_versioned(self._key(record.id), data, "application/json")
        else:
            version = self.store.put_if(self._key(record.id), data, "application/json", if_version=record._version)
            if version is None:
                raise RecordConflict(record.id, self.get(record.id))
        record._version = version
        if record.state.terminal and record.action == "generate" and not record.webhook_pending:
            self.store.delete(ACTIVE_PREFIX + record.id)

    def changed(self, record: JobRecord) -> bool:
        """Whether the stored record is no longer the version ``record`` was read or written
        at (one HEAD request: how an owner notices a cancel or a takeover between writes)."""
        return self.store.version(self._key(record.id)) != record._version

    def get(self, job_id: str) -> Optional[JobRecord]:
        if not valid_job_id(job_id):
            return None
        try:
            raw, version = self.store.get_versioned(self._key(job_id))
        except NotFound:
            return None
        record = JobRecord.model_validate_json(raw)
        record._version = version
        return record

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

    def orphans(self, lease_s: float, owner: Optional[str] = None,
                live_owners: Optional[set[str]] = None) -> list[JobRecord]:
        """Unfinished jobs nobody is running, and finished ones whose webhook nobody is
        delivering: they have no owner, their owner's heartbeat is older than ``lease_s``, or
        their owner is not among ``live_owners`` (the replicas the cluster still runs; None:
        not known). ``owner``'s own jobs are never orphans."""
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
            gone = live_owners is not None and rec.owner not in live_owners
            if rec.owner is None or gone or now - beat > lease_s:
                found.append(rec)
        return sorted(found, key=lambda r: r.created_at)

    def claim(self, record: JobRecord, owner: str) -> bool:
        """Take over an orphaned job: ``True`` (``record`` now owned by ``owner`` under the
        next lease, and written) for exactly one of the replicas that try with the same
        record. The write is conditional on the version ``record`` was read at, so it fails
        for every replica if the owner wrote a heartbeat in between (it was slow, not dead)."""
        before = (record.owner, record.lease, record.heartbeat_at)
        record.owner, record.lease, record.heartbeat_at = owner, record.lease + 1, time.time()
        try:
            self.save(record)
        except RecordConflict:
            record.owner, record.lease, record.heartbeat_at = before
            return False
        # Who took the job over, for people reading the store (the record is the authority).
        self.store.create(f"{CLAIMS_PREFIX}{record.id}/{record.lease}", owner.encode(), "text/plain")
        return True

    def superseded(self, record: JobRecord) -> bool:
        """Another replica has claimed the job since ``record``'s owner took it."""
        stored = self.get(record.id)
        return stored is None or (stored.owner, stored.lease) != (record.owner, record.lease)

    def cancel(self, job_id: str) -> Optional[JobRecord]:
        """Cancel a job another replica owns (or nobody runs): its record says CANCELLED
        unless it finished first (then it is returned as it is). A conditional write, retried
        on conflicts; the owner notices at its next heartbeat, stops, and keeps it cancelled."""
        while True:
            rec = self.get(job_id)
            if rec is None or rec.state.terminal:
                return rec
            rec.state, rec.finished_at = JobState.CANCELLED, time.time()
            rec.progress = rec.progress.model_copy(update={"message": "cancelled"})
            try:
                self.save(rec)
            except RecordConflict:
                continue
            self.request_cancel(job_id)  # for owners of the previous release (a rolling upgrade)
            return rec

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

    # Cancel markers: how the previous release told an owner about a cancel (it polled them).
    def request_cancel(self, job_id: str) -> None:
        self.store.put(f"{JOBS_PREFIX}{job_id}.cancel", b"1", "text/plain")

    def cancel_requested(self, job_id: str) -> bool:
        return self.store.exists(f"{JOBS_PREFIX}{job_id}.cancel")
