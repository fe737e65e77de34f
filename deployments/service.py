"""The job runner behind the ingress: queueing, running, persisting and cancelling jobs.

Free of Ray and HTTP so it can be tested in-process: the ingress deployment owns one
:class:`JobService` and exposes it over FastAPI routes and handle methods.

A job runs as an asyncio task in the ingress replica: fetch inputs from the store, call
the library's driver (``multitalk.driver.generate``) with a ``Stages`` implementation
(deployment handles in production), upload the mp4 to ``outputs/{job_id}.mp4``.
Cancelling the task cancels the in-flight stage calls (see ``stages.ServeStages``).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional

from multitalk.api import GenerationResult, InputError, Progress

from . import metrics, volume
from .jobs import JobRecord, JobStore, output_key, valid_job_id
from .schemas import (
    NATIVE_FIELD_NAMES,
    RUNPOD_FIELD_NAMES,
    ErrorInfo,
    JobRequest,
    JobState,
    ProgressInfo,
    ResultInfo,
    RunPodStatus,
)
from .storage import LocalStore, Store, check_input, resolve_input, store_from_settings

logger = logging.getLogger("multitalk.serve")

GenerateFn = Callable[..., Awaitable[GenerationResult]]


class Overloaded(Exception):
    """Too many unfinished jobs in this ingress replica (HTTP 429)."""

    def __init__(self, retry_after: int, what: str = "too many jobs queued"):
        super().__init__(f"{what}; retry after {retry_after}s")
        self.retry_after = retry_after


class JobLog(logging.LoggerAdapter):
    """Tags every line with the job id: a ``[job <id>]`` prefix for people and grep, and the
    :data:`~deployments.metrics.JOB_LOG_FIELD` attribute, a field of its own in JSON logs."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**kwargs.get("extra", {}), metrics.JOB_LOG_FIELD: self.extra["job_id"]}
        return f"[job {self.extra['job_id']}] {msg}", kwargs


@dataclass
class ServiceSettings:
    """Ingress settings (``args.ingress`` in the serve config)."""

    max_concurrent_jobs: int = 2  # jobs running at once; >1 overlaps one job's encoders with another's DiT
    max_queued_jobs: int = 16  # unfinished jobs per replica before 429
    # Unfinished jobs one API-key tenant may hold in a replica before its submissions get 429
    # (None: no per-tenant limit), so one busy tenant cannot fill the whole queue.
    max_queued_jobs_per_tenant: Optional[int] = None
    retry_after_s: int = 30
    lease_s: float = 60.0  # a job whose owner's heartbeat is older is re-queued by another replica
    persist_interval_s: float = 2.0  # progress is written at most this often
    exclusive: bool = True  # single ingress replica: at start-up, every unfinished job is ours to re-run
    presign_expires_s: int = 3600
    runsync_timeout_s: float = 120.0
    allowed_buckets: tuple[str, ...] = ()
    local_output_dir: Optional[str] = None  # for output format "local" when the store is S3
    driver: str = "multitalk.driver:generate"
    models_root: str = ""
    cache_dir: Optional[str] = None
    replica_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    # --- hardening (issue 7; docs/SECURITY.md) ---
    max_body_bytes: int = 50 * 1024 * 1024  # request bodies over this answer 413 (0: no cap)
    max_stage_retries: int = 2  # re-runs of a job whose stage replica died (RayActorError...)
    stage_retry_backoff_s: float = 1.0  # doubled on each retry
    job_timeout_s: Optional[float] = 3600.0  # running job deadline -> FAILED "deadline exceeded"
    requeue_on_shutdown: bool = True  # running jobs go back to IN_QUEUE when the ingress stops
    precheck_inputs: Optional[bool] = None  # decode media at submit (4xx now); None: with the real driver
    max_audio_seconds: float = 300.0
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 2000
    api_keys_file: Optional[str] = None  # else MULTITALK_API_KEYS_FILE; keys also from MULTITALK_API_KEYS
    auth_exempt_paths: tuple[str, ...] = ("/healthz", "/")

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "ServiceSettings":
        d = dict(d or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ingress settings: {sorted(unknown)}")
        if "allowed_buckets" in d:
            d["allowed_buckets"] = tuple(d["allowed_buckets"] or ())
        if "auth_exempt_paths" in d:
            d["auth_exempt_paths"] = tuple(d["auth_exempt_paths"] or ())
        return cls(**d)


def import_attr(path: str):
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


def _input_error(exc: BaseException) -> Optional[InputError]:
    """The InputError inside ``exc`` (Ray wraps exceptions raised in other replicas)."""
    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, InputError):
            return exc
        exc = getattr(exc, "cause", None) or exc.__cause__
        seen += 1
    return None


# Stage failures worth another attempt: the replica (actor) died or was unreachable.
RETRYABLE_ERRORS = frozenset({
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "ReplicaUnavailableError",
    "DeploymentUnavailableError", "NodeDiedError", "WorkerCrashedError", "OwnerDiedError",
})


def retryable(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is a dead/unreachable replica error."""
    seen = 0
    while exc is not None and seen < 5:
        if any(c.__name__ in RETRYABLE_ERRORS for c in type(exc).__mro__):
            return True
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        seen += 1
    return False


def check_access(rec: JobRecord, tenant: Optional[str]) -> JobRecord:
    """403 when an authenticated tenant asks for another tenant's job."""
    if tenant is not None and rec.tenant != tenant:
        raise InputError("id", "this job belongs to another tenant", 403)
    return rec


class JobService:
    """Owns the job records and the asyncio tasks running them (one per ingress replica)."""

    def __init__(
        self,
        store: Store,
        stages: Any,
        settings: Optional[ServiceSettings] = None,
        generate_fn: Optional[GenerateFn] = None,
        local_store: Optional[LocalStore] = None,
    ):
        self.settings = settings or ServiceSettings()
        self.store = store
        self.jobs = JobStore(store)
        self.stages = stages
        self._generate_fn = generate_fn
        if local_store is None:
            local_store = store if isinstance(store, LocalStore) else store_from_settings(
                {"local_root": self.settings.local_output_dir or "~/.cache/multitalk/outputs"}, env={}
            )
        self.local_store: LocalStore = local_store  # type: ignore[assignment]
        self.records: dict[str, JobRecord] = {}  # jobs this replica owns (the live copies)
        self.tasks: dict[str, asyncio.Task] = {}
        self.done: dict[str, asyncio.Event] = {}
        self._slots: Optional[asyncio.Semaphore] = None
        self._started = False
        self._sweeper: Optional[asyncio.Task] = None
        self._models_root: Optional[str] = None
        self._stopping = False
        self._user_cancelled: set[str] = set()  # cancelled by a client, not by shutdown
        self._expired: set[str] = set()  # past job_timeout_s
        self._superseded: set[str] = set()  # taken over by another replica: stop, write nothing
        real_driver = generate_fn is None and self.settings.driver == "multitalk.driver:generate"
        self._real_driver = real_driver
        self._precheck = real_driver if self.settings.precheck_inputs is None else self.settings.precheck_inputs

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Reload job records and re-queue unfinished ones; idempotent."""
        if self._started:
            return
        self._started = True
        self._slots = asyncio.Semaphore(self.settings.max_concurrent_jobs)
        lease = 0.0 if self.settings.exclusive else self.settings.lease_s
        await self._recover(lease)
        if not self.settings.exclusive:  # only several ingress replicas can orphan jobs while we run
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def stop(self) -> None:
        """Graceful shutdown: running and queued jobs are persisted as IN_QUEUE (owner
        cleared) so that the next ingress runs them (``requeue_on_shutdown``)."""
        self._stopping = True
        if self._sweeper:
            self._sweeper.cancel()
        for task in list(self.tasks.values()):
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    async def _recover(self, lease_s: float) -> None:
        try:
            orphans = await asyncio.to_thread(self.jobs.orphans, lease_s, self.settings.replica_id)
        except Exception:
            logger.exception("could not list job records for recovery")
            return
        for rec in orphans:
            if rec.id in self.tasks:
                continue
            previous_owner = rec.owner
            try:
                won = await asyncio.to_thread(self.jobs.claim, rec, self.settings.replica_id)
            except Exception:
                logger.exception("could not claim job %s", rec.id)
                continue
            if not won:  # another replica took it over first
                continue
            JobLog(logger, {"job_id": rec.id}).info(
                "re-queueing (was %s, owner %s, lease %d)", rec.state.value, previous_owner, rec.lease
            )
            rec.heartbeat_at = time.time()
            rec.state = JobState.IN_QUEUE
            rec.progress = ProgressInfo(stage="queued", message="re-queued after an ingress restart")
            await asyncio.to_thread(self.jobs.save, rec.model_copy(deep=True))
            self._schedule(rec)

    async def _sweep_forever(self) -> None:
        # Picks up jobs whose owner died (multi-replica ingress) once their lease expires.
        while True:
            await asyncio.sleep(max(self.settings.lease_s / 2, 1.0))
            try:
                await self._recover(self.settings.lease_s)
            except Exception:
                logger.exception("job sweep failed")

    # --- submit ----------------------------------------------------------------------

    def _unfinished(self, tenant: Optional[str] = None) -> int:
        """Jobs this replica runs or queues (``tenant``: only that tenant's)."""
        return sum(1 for job_id, t in self.tasks.items() if not t.done()
                   and (tenant is None or getattr(self.records.get(job_id), "tenant", None) == tenant))

    async def save_upload(self, field_name: str, filename: Optional[str], data: bytes,
                          tenant: Optional[str] = None) -> str:
        """Store an uploaded input; returns its key. Content-addressed, so a retried
        upload (same Idempotency-Key) yields the same request and the same job."""
        if not data:
            raise InputError(field_name, "empty upload")
        ext = ""
        if filename and "." in filename:
            ext = "." + filename.rsplit(".", 1)[1].lower()
            if not re.fullmatch(r"\.[a-z0-9]{1,8}", ext):
                ext = ""
        folder = f"inputs/uploads/{tenant}/" if tenant else "inputs/uploads/"
        key = f"{folder}{hashlib.sha256(data).hexdigest()[:32]}{ext}"
        if not await asyncio.to_thread(self.store.exists, key):
            await asyncio.to_thread(self.store.put, key, data, None)
        return key

    def _allowed_for(self, ref: str, name: str, tenant: Optional[str]) -> tuple[str, ...]:
        """Buckets ``ref`` may be read from. ``allowed_buckets`` entries are ``bucket`` or
        ``bucket/prefix``; the store's own bucket only under its prefix (and, like the
        local store, never job records, other tenants' uploads or outputs)."""
        if not ref.strip().lower().startswith("s3://"):
            return self.settings.allowed_buckets
        from .storage import S3Store, parse_s3_url

        bucket, key = parse_s3_url(ref.strip(), name)
        if isinstance(self.store, S3Store) and bucket == self.store.bucket:
            if not key.startswith(self.store.prefix):
                raise InputError(name, f"'{ref}' is outside this service's prefix", 403)
            self._confine(key[len(self.store.prefix):], name, tenant)
        allowed = []
        for entry in self.settings.allowed_buckets:
            b, _, prefix = entry.partition("/")
            if b == bucket and key.startswith(prefix):
                allowed.append(b)
        return tuple(allowed)

    @staticmethod
    def _confine(key: str, name: str, tenant: Optional[str]) -> None:
        if key.startswith("jobs/"):
            raise InputError(name, "job records cannot be used as inputs", 403)
        if tenant is not None:
            for area in ("outputs/", "inputs/uploads/"):
                if key.startswith(area) and not key.startswith(f"{area}{tenant}/"):
                    raise InputError(name, f"'{key}' belongs to another tenant", 403)

    def _limits(self):
        from multitalk.driver import Limits

        return Limits(max_audio_seconds=self.settings.max_audio_seconds,
                      max_image_pixels=self.settings.max_image_pixels,
                      max_prompt_chars=self.settings.max_prompt_chars)

    def _precheck_media(self, request: JobRequest, source: str) -> None:
        """Decode and check the media now (the library's own checks) so that a bad file is
        a 4xx naming the field instead of a FAILED job later."""
        from multitalk.driver import plan_chunks, prepare_inputs

        image, audio = self._fetch_inputs(request, source)
        gen = request.to_generation_request(image, audio)
        try:
            prep = prepare_inputs(gen, self._limits())
            plan_chunks(prep.audio_frames, gen.frames, gen.mode, gen.motion_frames,
                        gen.frames if gen.mode == "clip" else gen.max_frames)
        except InputError as e:
            raise self._rename(e, source) from None

    async def _validate_inputs(self, request: JobRequest, source: str, tenant: Optional[str] = None) -> JobRequest:
        """Check every reference exists (4xx now rather than a failed job later)."""
        canon = {}
        for name, ref in request.input_fields():
            try:
                allowed = self._allowed_for(ref, name, tenant)
                canon[name] = await asyncio.to_thread(
                    check_input, ref, self.store, name, allowed
                )
                if not canon[name].startswith("s3://"):
                    self._confine(canon[name], name, tenant)
            except InputError as e:
                raise self._rename(e, source) from None
        return request.model_copy(
            update={
                "image": canon["condition_image"],
                "audio": [canon[f"audio_{i + 1}"] for i in range(len(request.audio))],
            }
        )

    @staticmethod
    def _rename(e: InputError, source: str) -> InputError:
        """Errors name fields as the caller sent them (RunPod input vs JobRequest)."""
        names = RUNPOD_FIELD_NAMES if source == "runpod" else NATIVE_FIELD_NAMES
        if e.field in names:
            return InputError(names[e.field], e.message, e.status)
        return e

    async def submit(
        self, request: JobRequest, idempotency_key: Optional[str] = None, source: str = "api",
        tenant: Optional[str] = None,
    ) -> JobRecord:
        """Validate, persist and queue a job. Raises InputError (4xx) or Overloaded (429)."""
        await self.start()
        if self._unfinished() >= self.settings.max_queued_jobs:
            raise Overloaded(self.settings.retry_after_s)
        quota = self.settings.max_queued_jobs_per_tenant
        if tenant is not None and quota is not None and self._unfinished(tenant) >= quota:
            raise Overloaded(self.settings.retry_after_s,
                             f"tenant {tenant!r} has {quota} unfinished jobs, its limit")
        request = await self._validate_inputs(request, source, tenant)
        if self._precheck:
            await asyncio.to_thread(self._precheck_media, request, source)
        if tenant is not None and idempotency_key:
            idempotency_key = f"{tenant}/{idempotency_key}"  # keys are per tenant
        rec, created = await asyncio.to_thread(self.jobs.create, request, idempotency_key, source,
                                               "generate", None, tenant)
        log = JobLog(logger, {"job_id": rec.id})
        if not created:
            log.info("idempotent retry (key %r): returning the existing job", idempotency_key)
            return self.records.get(rec.id, rec)
        rec.owner = self.settings.replica_id
        rec.heartbeat_at = time.time()
        await asyncio.to_thread(self.jobs.save, rec.model_copy(deep=True))
        log.info("queued: %d audio track(s), mode %s, %d frames, %d steps",
                 len(request.audio), request.mode, request.frames, request.sampling.steps)
        self._schedule(rec)
        return rec

    async def run_action(self, action: str, params: dict, idempotency_key: Optional[str] = None,
                         tenant: Optional[str] = None) -> JobRecord:
        """RunPod ``model_check`` / ``volume_explore``: answered at once, kept as a job record."""
        await self.start()
        if tenant is not None and idempotency_key:
            idempotency_key = f"{tenant}/{idempotency_key}"
        rec, created = await asyncio.to_thread(
            self.jobs.create, None, idempotency_key, "runpod", action, None, tenant
        )
        if not created:
            return rec
        started = time.time()
        try:
            root = await self.models_root()
            if action == "model_check":
                output = await asyncio.to_thread(volume.model_check, root or "")
            elif action == "volume_explore":
                output = await asyncio.to_thread(
                    volume.volume_explore, root or "", params.get("path", ""), params.get("max_depth", 3)
                )
            else:
                raise InputError("action", f"unknown action {action!r}")
            rec.output, rec.state = output, JobState.COMPLETED
        except InputError as e:
            rec.error, rec.state = ErrorInfo(field=e.field, message=e.message, status=e.status), JobState.FAILED
        rec.started_at, rec.finished_at = started, time.time()
        await asyncio.to_thread(self.jobs.save, rec)
        return rec

    async def models_root(self) -> Optional[str]:
        if self._models_root is None:
            self._models_root = await asyncio.to_thread(
                volume.optional_models_root,
                {"models_root": self.settings.models_root, "cache_dir": self.settings.cache_dir},
            )
        return self._models_root

    def _schedule(self, rec: JobRecord) -> None:
        self.records[rec.id] = rec
        metrics.jobs.state(rec.id, rec.state)
        self.done[rec.id] = asyncio.Event()
        self.tasks[rec.id] = asyncio.get_running_loop().create_task(self._run(rec), name=f"job-{rec.id}")

    # --- queries ---------------------------------------------------------------------

    async def get(self, job_id: str) -> Optional[JobRecord]:
        if job_id in self.records:
            return self.records[job_id]
        if not valid_job_id(job_id):
            return None
        return await asyncio.to_thread(self.jobs.get, job_id)

    async def wait(self, job_id: str, timeout: Optional[float] = None) -> Optional[JobRecord]:
        """The job once finished, or as it stands when ``timeout`` runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        event = self.done.get(job_id)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            rec = await self.get(job_id)
            if rec is None or rec.state.terminal or job_id in self.records:
                return rec
            # Taken over by another replica while we waited: follow its record.
        while True:  # owned by another replica: poll its record
            rec = await self.get(job_id)
            if rec is None or rec.state.terminal:
                return rec
            if deadline is not None and time.monotonic() >= deadline:
                return rec
            await asyncio.sleep(1.0)

    async def cancel(self, job_id: str) -> Optional[JobRecord]:
        rec = await self.get(job_id)
        if rec is None or rec.state.terminal:
            return rec
        task = self.tasks.get(job_id)
        if task is not None:
            JobLog(logger, {"job_id": job_id}).info("cancel requested")
            self._user_cancelled.add(job_id)
            task.cancel()
            await asyncio.wait({task}, timeout=30)
            return self.records.get(job_id, rec)
        # Another replica runs it: leave a marker its heartbeat loop picks up, and mark
        # the record so clients see the cancellation now.
        await asyncio.to_thread(self.jobs.request_cancel, job_id)
        rec.state, rec.finished_at = JobState.CANCELLED, time.time()
        await asyncio.to_thread(self.jobs.save, rec)
        return rec

    def video_location(self, rec: JobRecord) -> tuple[Store, str]:
        if rec.result is None:
            raise KeyError(rec.id)
        target = self.local_store if rec.result.store == "local" and self.local_store is not self.store else self.store
        return target, rec.result.key

    # --- running ---------------------------------------------------------------------

    def generate_fn(self) -> GenerateFn:
        if self._generate_fn is None:
            self._generate_fn = import_attr(self.settings.driver)
        return self._generate_fn

    async def _persist(self, rec: JobRecord) -> None:
        rec.heartbeat_at = time.time()
        snapshot = rec.model_copy(deep=True)
        await asyncio.to_thread(self.jobs.save, snapshot)

    async def _heartbeat(self, rec: JobRecord, dirty: list[bool], task: asyncio.Task) -> None:
        """Writes progress (throttled) and the lease heartbeat; polls for remote cancels."""
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.settings.persist_interval_s)
            try:
                if dirty[0] or time.monotonic() - last > self.settings.lease_s / 3:
                    if await asyncio.to_thread(self.jobs.superseded, rec):
                        # We were too slow to beat: another replica claimed the job and runs it.
                        JobLog(logger, {"job_id": rec.id}).warning("taken over by another ingress replica; "
                                                                   "stopping here")
                        self._superseded.add(rec.id)
                        task.cancel()
                        return
                    dirty[0] = False
                    last = time.monotonic()
                    await self._persist(rec)
                if await asyncio.to_thread(self.jobs.cancel_requested, rec.id):
                    JobLog(logger, {"job_id": rec.id}).info("cancel marker found")
                    self._user_cancelled.add(rec.id)
                    task.cancel()
                    return
            except Exception:
                JobLog(logger, {"job_id": rec.id}).exception("could not persist progress")

    def _fetch_inputs(self, request: JobRequest, source: str) -> tuple[bytes, list[bytes]]:
        out = []
        for name, ref in request.input_fields():
            try:
                out.append(resolve_input(ref, self.store, name, self.settings.allowed_buckets))
            except InputError as e:
                raise self._rename(e, source) from None
        return out[0], out[1:]

    async def _run(self, rec: JobRecord) -> None:
        log = JobLog(logger, {"job_id": rec.id})
        task = asyncio.current_task()
        dirty = [False]
        beat: Optional[asyncio.Task] = None
        deadline: Optional[asyncio.TimerHandle] = None
        # Per-job view of the stages where supported, so a cancel reaches this job's calls.
        stages = self.stages.for_job(rec.id) if hasattr(self.stages, "for_job") else self.stages
        try:
            assert self._slots is not None and rec.request is not None
            async with self._slots:
                rec.state, rec.started_at = JobState.IN_PROGRESS, time.time()
                metrics.jobs.state(rec.id, rec.state)
                rec.attempts += 1
                rec.timings["queue"] = round(rec.started_at - rec.created_at, 3)
                rec.progress = ProgressInfo(stage="inputs", message="fetching inputs")
                await self._persist(rec)
                beat = asyncio.get_running_loop().create_task(self._heartbeat(rec, dirty, task))
                if self.settings.job_timeout_s:
                    deadline = asyncio.get_running_loop().call_later(
                        self.settings.job_timeout_s, self._expire, rec.id, task)
                log.info("started (attempt %d)", rec.attempts)

                t0 = time.monotonic()
                image, audio = await asyncio.to_thread(self._fetch_inputs, rec.request, rec.source)
                rec.timings["fetch_inputs"] = round(time.monotonic() - t0, 3)
                gen_request = rec.request.to_generation_request(image, audio)

                last_stage = [None]

                def on_progress(p: Progress) -> None:
                    info = ProgressInfo(**dataclasses.asdict(p))
                    if not info.total_steps and rec.progress.total_steps:
                        # Stages after the sampler report no steps; keep the count so
                        # clients' step bars do not jump back to zero.
                        info.step, info.total_steps = rec.progress.step, rec.progress.total_steps
                    rec.progress = info
                    metrics.jobs.progress(rec.id, p)
                    dirty[0] = True
                    if p.stage != last_stage[0]:
                        last_stage[0] = p.stage
                        log.info("stage %s %s", p.stage, p.message)
                    elif p.total_steps and (p.step == p.total_steps or p.step % 10 == 0):
                        log.info("%s step %d/%d chunk %d/%d", p.stage, p.step, p.total_steps,
                                 p.chunk + 1, p.total_chunks)

                t0 = time.monotonic()
                result = await self._generate(rec, gen_request, stages, on_progress, log)
                rec.timings["generate"] = round(time.monotonic() - t0, 3)
                rec.timings.update({k: round(float(v), 3) for k, v in (result.timings or {}).items()})

                total_steps, total_chunks = rec.progress.total_steps, rec.progress.total_chunks
                rec.progress = ProgressInfo(stage="upload", step=total_steps, total_steps=total_steps,
                                            chunk=total_chunks - 1, total_chunks=total_chunks,
                                            message="uploading video")
                t0 = time.monotonic()
                rec.result = await self._upload(rec, result)
                rec.timings["upload"] = round(time.monotonic() - t0, 3)
                rec.state = JobState.COMPLETED
                rec.progress = rec.progress.model_copy(update={"stage": "done", "message": ""})
                log.info("completed: %d frames, %s", result.num_frames, rec.result.key)
        except asyncio.CancelledError:
            if hasattr(stages, "cancel"):
                stages.cancel()
            if rec.id in self._superseded:
                log.info("left to the replica that took it over")
            elif rec.id in self._expired:
                rec.state = JobState.FAILED
                rec.error = ErrorInfo(message=f"deadline exceeded (job_timeout_s={self.settings.job_timeout_s:g})",
                                      status=504)
                log.warning("deadline exceeded after %.0f s", self.settings.job_timeout_s)
            elif self._stopping and self.settings.requeue_on_shutdown and rec.id not in self._user_cancelled:
                # Not the client's cancel: the ingress is shutting down. Leave the job
                # queued and unowned; the next ingress's recovery runs it again.
                rec.state, rec.owner = JobState.IN_QUEUE, None
                rec.progress = ProgressInfo(stage="queued", message="re-queued at ingress shutdown")
                log.info("re-queued at shutdown")
            else:
                rec.state = JobState.CANCELLED
                rec.progress.message = "cancelled"
                log.info("cancelled")
        except Exception as e:  # noqa: BLE001 - every failure must land in the record
            if hasattr(stages, "cancel"):
                stages.cancel()  # calls the driver started but no longer waits for
            ie = _input_error(e)
            if ie is not None:
                ie = self._rename(ie, rec.source)
                rec.error = ErrorInfo(field=ie.field, message=ie.message, status=ie.status)
                log.warning("failed on input %s: %s", ie.field, ie.message)
            else:
                rec.error = ErrorInfo(message=f"{type(e).__name__}: {e}", status=500)
                log.exception("failed")
            rec.state = JobState.FAILED
        finally:
            if beat is not None:
                beat.cancel()
            if deadline is not None:
                deadline.cancel()
            self._expired.discard(rec.id)
            self._user_cancelled.discard(rec.id)
            if rec.id in self._superseded:  # the record is the new owner's now
                self._superseded.discard(rec.id)
                self.records.pop(rec.id, None)
            else:
                rec.finished_at = time.time() if rec.state.terminal else None
                if rec.started_at and rec.finished_at:
                    rec.timings["total"] = round(rec.finished_at - rec.started_at, 3)
                metrics.jobs.finished(rec.id, rec.state, rec.timings)
                try:
                    await self._persist(rec)
                except Exception:
                    log.exception("could not persist the final record")
            self.tasks.pop(rec.id, None)
            self.done[rec.id].set()

    def _expire(self, job_id: str, task: asyncio.Task) -> None:
        if not task.done():
            self._expired.add(job_id)
            task.cancel()

    async def _generate(self, rec: JobRecord, gen_request, stages, on_progress, log) -> GenerationResult:
        """The driver run; re-run (up to ``max_stage_retries`` times, with backoff) when a
        stage replica died or was unreachable. Other errors propagate at once."""
        kwargs = {"limits": self._limits()} if self._real_driver else {}
        attempt = 0
        while True:
            try:
                if hasattr(stages, "prepare"):
                    await stages.prepare()
                return await self.generate_fn()(gen_request, stages, on_progress, **kwargs)
            except Exception as e:
                if not retryable(e) or attempt >= self.settings.max_stage_retries:
                    if attempt:
                        log.warning("giving up after %d stage retries", attempt)
                    raise
                attempt += 1
                if hasattr(stages, "cancel"):
                    stages.cancel()  # whatever the failed attempt left running
                rec.timings["stage_retries"] = attempt
                rec.progress = ProgressInfo(stage="retry", message=f"stage failed ({type(e).__name__}); "
                                                                   f"retry {attempt}/{self.settings.max_stage_retries}")
                log.warning("stage failed (%s: %s); retry %d/%d", type(e).__name__, e, attempt,
                            self.settings.max_stage_retries)
                await asyncio.sleep(self.settings.stage_retry_backoff_s * 2 ** (attempt - 1))

    async def _upload(self, rec: JobRecord, result: GenerationResult) -> ResultInfo:
        out = rec.request.output
        key = out.key or output_key(rec.id, rec.tenant)
        if rec.tenant and not key.startswith(f"outputs/{rec.tenant}/"):
            # each tenant's outputs live under its own prefix
            key = f"outputs/{rec.tenant}/" + (key[len("outputs/"):] if key.startswith("outputs/") else key)
        if not key.startswith("outputs/"):
            key = "outputs/" + key  # never let an output overwrite inputs or job records
        if not key.endswith(".mp4"):
            key += ".mp4"
        target: Store = self.local_store if out.format == "local" else self.store
        await asyncio.to_thread(target.put, key, result.video, "video/mp4")
        url = await asyncio.to_thread(target.presigned_url, key, self.settings.presign_expires_s)
        return ResultInfo(
            key=key,
            store="local" if isinstance(target, LocalStore) else "s3",
            url=url,
            path=str(target.path(key)) if isinstance(target, LocalStore) else None,
            video_url=f"/v1/jobs/{rec.id}/video",
            frames=result.num_frames,
            duration=round(result.num_frames / float(result.fps or 25), 3),
            fps=result.fps,
            width=result.width,
            height=result.height,
            chunks=result.chunks,
            lip_sync=result.lip_sync,
            warnings=list(result.warnings or []),
        )

    # --- views -----------------------------------------------------------------------

    async def refresh_url(self, rec: JobRecord) -> JobRecord:
        """Presigned URLs expire: re-sign when answering a status query."""
        if rec.result is not None and rec.result.store == "s3":
            store, key = self.video_location(rec)
            url = await asyncio.to_thread(store.presigned_url, key, self.settings.presign_expires_s)
            rec = rec.model_copy(update={"result": rec.result.model_copy(update={"url": url})})
        return rec


def runpod_status(rec: JobRecord) -> RunPodStatus:
    """A job record in the predecessor's ``/status`` shape."""
    output = None
    error = None
    if rec.state == JobState.COMPLETED:
        if rec.action == "generate" and rec.result is not None:
            r = rec.result
            output = {
                "status": "success",
                "output_format": r.store,
                "video_key": r.key,
                "video_url": r.url,
                "frames": r.frames,
                "duration": r.duration,
                "fps": r.fps,
                "width": r.width,
                "height": r.height,
                "timings": rec.timings,
            }
            if r.store == "s3":
                output["s3_key"] = r.key
            if r.path:
                output["local_path"] = r.path
        else:
            output = rec.output
    elif rec.state == JobState.FAILED and rec.error is not None:
        error = f"{rec.error.field}: {rec.error.message}" if rec.error.field else rec.error.message
    elif rec.state in (JobState.IN_QUEUE, JobState.IN_PROGRESS):
        output = {"progress": rec.progress.model_dump()}
    delay = int((rec.started_at - rec.created_at) * 1000) if rec.started_at else None
    exe = int((rec.finished_at - rec.started_at) * 1000) if rec.started_at and rec.finished_at else None
    return RunPodStatus(id=rec.id, status=rec.state.value, output=output, error=error,
                        delayTime=delay, executionTime=exe)
