"""The job service behind the ingress: the one object the routes and handle methods call.

Free of Ray and HTTP, so it can be tested in-process. It composes the units of one job
each:

* :class:`~deployments.admission.Admission`: capacity, references, limits, media checks;
* :class:`~deployments.runner.JobRunner`: running jobs (tasks, deadlines, retries, outcomes);
* :class:`~deployments.leases.Leases`: heartbeats and taking over orphaned jobs;
* :class:`~deployments.jobs.JobStore`: the persisted records;
* :class:`~deployments.queue_ops.QueueOperations`: what RunPod's and the OpenAI-style doors
  ask beyond submit/get/cancel (retry, purge, counts, stream position, delete, thumbnail).

Routes use only the public methods below (``submit``, ``get_for``, ``wait``, ``cancel``,
``recent``, ``video_location``, ...), never the units' internals.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from typing import Any, Callable, Literal, Optional

from pydantic import ConfigDict, Field

from multitalk.api import InputError, Limits
from multitalk.stage_factory import driver_for, import_attr

from . import volume
from .admission import Admission, Overloaded  # noqa: F401 - Overloaded: part of this module's API
from .jobs import JobRecord, JobStore, index_cursor, valid_job_id
from .leases import Leases
from .live_settings import LiveSettings, OptionLayers
from .queue_ops import QueueOperations
from .runner import CancelReason, GenerateFn, JobRunner, RunnerSettings, job_log
from .schemas import ErrorInfo, JobRequest, JobState
from .storage import LocalStore, Store, store_from_settings
from .webhook_signing import message_id
from .webhooks import WebhookInfo, Webhooks, WebhookSettings


class ServiceSettings(OptionLayers):
    """Ingress settings (``args.ingress`` in the serve config); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

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
    # The model this ingress serves: its generation loop and submit-time checks
    # (multitalk.stage_factory.DRIVERS); ``driver``: another generate function ("module:name").
    model: Literal["multitalk", "infinitetalk"] = "multitalk"
    driver: Optional[str] = None
    models_root: str = ""
    cache_dir: Optional[str] = None
    replica_id: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    # --- hardening (docs/SECURITY.md) ---
    max_body_bytes: int = 50 * 1024 * 1024  # request bodies over this answer 413 (0: no cap)
    # Retries of one job in all, in place or by re-running it (deployments/retry.py).
    max_stage_retries: int = 16
    stage_retry_backoff_s: float = 1.0  # doubled on each retry, at most 15 s
    # Transient failures are retried for this long after the first one: it must outlast the
    # cluster's node-death detection (Ray's health checks: 20-55 s by default).
    stage_retry_window_s: float = 150.0
    job_timeout_s: Optional[float] = 3600.0  # running job deadline -> FAILED "deadline exceeded"
    requeue_on_shutdown: bool = True  # running jobs go back to IN_QUEUE when the ingress stops
    precheck_inputs: bool = True  # decode the media at submit: a bad file is a 4xx now, not a FAILED job
    limits: Limits = Field(default_factory=Limits)
    # presets, request_defaults: from OptionLayers (they are live settings too)
    webhooks: WebhookSettings = Field(default_factory=WebhookSettings)
    lora_names: tuple[str, ...] = ()  # the app's `loras` (set by the builder): names a request may pick
    api_keys_file: Optional[str] = None  # else MULTITALK_API_KEYS_FILE; keys also from MULTITALK_API_KEYS
    auth_exempt_paths: tuple[str, ...] = ("/healthz", "/")
    # RunPod serverless URLs (/v2/{endpoint_id}/...): None answers any endpoint id, else
    # only this one (others: 404 naming endpoint_id).
    runpod_endpoint_id: Optional[str] = None

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "ServiceSettings":
        return cls.model_validate(dict(d or {}))

    def runner_settings(self) -> RunnerSettings:
        return RunnerSettings(**{f: getattr(self, f) for f in RunnerSettings.__dataclass_fields__})


class JobService(QueueOperations):
    """Owns the jobs of one ingress replica (see the module docstring)."""

    def __init__(self, store: Store, stages: Any, settings: Optional[ServiceSettings] = None,
                 generate_fn: Optional[GenerateFn] = None, local_store: Optional[LocalStore] = None,
                 live_replicas: Optional[Callable[[], set[str]]] = None):
        self.settings = s = settings or ServiceSettings()
        self.store = store
        self.jobs = JobStore(store)
        if local_store is None:
            local_store = store if isinstance(store, LocalStore) else store_from_settings(
                {"local_root": s.local_output_dir or "~/.cache/multitalk/outputs"}, env={})
        self.local_store: LocalStore = local_store  # type: ignore[assignment]
        self.admission = Admission(store, s.limits, s.allowed_buckets, s.max_queued_jobs,
                                   s.max_queued_jobs_per_tenant, s.retry_after_s, s.precheck_inputs,
                                   s.presets, s.request_defaults, self.speech_voices, s.lora_names, s.model)
        self.leases = Leases(self.jobs, s.replica_id, s.lease_s, s.persist_interval_s, job_log,
                             fence=not s.exclusive, live_replicas=live_replicas)
        self.webhooks = Webhooks(s.webhooks)
        generate_fn = generate_fn or (import_attr(s.driver) if s.driver else driver_for(s.model).generate)
        self.runner = JobRunner(stages, self.admission, self.leases, store, self.local_store,
                                generate_fn, s.limits, s.runner_settings(),
                                on_finished=self._finished)
        self._deliveries: set[asyncio.Task] = set()
        # Jobs this replica finished or queued again since it started, by (tenant, outcome).
        self._outcomes: Counter[tuple[Optional[str], str]] = Counter()
        self._started = False
        self._sweeper: Optional[asyncio.Task] = None
        self._models_root: Optional[str] = None
        self._voices: Optional[list[str]] = None
        self._models_report: Optional[tuple[float, dict]] = None

    def apply_live(self, live: "LiveSettings") -> None:
        """New live settings (``deployments/live_settings.py``; the ingress's ``reconfigure``):
        presets, request defaults, limits and LoRA names for the jobs submitted from now on.
        Jobs already accepted keep the options they were resolved with."""
        values = live.for_model(self.settings.model)
        self.settings = self.settings.model_copy(update=values)
        adm = self.admission
        adm.presets, adm.request_defaults = values["presets"], values["request_defaults"]
        adm.limits, adm.lora_names = values["limits"], values["lora_names"]
        self.runner.limits = values["limits"]
        self._models_report = None  # /v1/models lists the presets and LoRAs

    # --- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        """Reload job records and re-queue unfinished ones; idempotent."""
        if self._started:
            return
        self._started = True
        await asyncio.to_thread(self.admission.warm_up)
        # A single (exclusive) ingress owns every unfinished job at start-up.
        await self.recover(0.0 if self.settings.exclusive else self.settings.lease_s)
        if not self.settings.exclusive:  # only several ingress replicas can orphan jobs while we run
            self._sweeper = asyncio.get_running_loop().create_task(
                self.leases.sweep_forever(self.runner.is_running, self.runner.schedule, self._notify))

    async def recover(self, lease_s: float) -> None:
        """Run the unfinished jobs nobody runs (heartbeat older than ``lease_s``; see
        :meth:`deployments.leases.Leases.recover`)."""
        await self.leases.recover(lease_s, self.runner.is_running, self.runner.schedule, self._notify)

    async def stop(self) -> None:
        """Graceful shutdown: running and queued jobs are persisted as IN_QUEUE (owner
        cleared) so that the next ingress runs them (``requeue_on_shutdown``)."""
        if self._sweeper:
            self._sweeper.cancel()
        await self.runner.stop()
        for task in self._deliveries:  # the record says what was not delivered
            task.cancel()
        await asyncio.gather(*self._deliveries, return_exceptions=True)
        self.leases.close()

    # --- submit ----------------------------------------------------------------------
    async def save_upload(self, field_name: str, filename: Optional[str], data: bytes,
                          tenant: Optional[str] = None) -> str:
        return await asyncio.to_thread(self.admission.save_upload, field_name, filename, data, tenant)

    async def submit(self, request: "JobRequest | dict", idempotency_key: Optional[str] = None,
                     source: str = "api", tenant: Optional[str] = None) -> JobRecord:
        """Validate, persist and queue a job (a ``JobRequest`` or its raw JSON object).
        Raises InputError (4xx) or Overloaded (429)."""
        await self.start()
        self.admission.check_capacity(self.runner.unfinished, tenant)
        request, applied = self.admission.resolve_options(request, source)
        request = await asyncio.to_thread(self.admission.admit, request, source, tenant)
        if request.webhook is not None:  # "" too: a webhook that is not an http(s) URL is refused
            url = await asyncio.to_thread(self.webhooks.check, request.webhook, tenant)
            request = request.model_copy(update={"webhook": url})
        if tenant is not None and idempotency_key:
            idempotency_key = f"{tenant}/{idempotency_key}"  # keys are per tenant
        rec, created = await asyncio.to_thread(self.jobs.create, request, idempotency_key, source, "generate",
                                               None, tenant, self.settings.replica_id, applied)
        log = job_log(rec.id)
        if not created:
            log.info("idempotent retry (key %r): returning the existing job", idempotency_key)
            return self.runner.records.get(rec.id, rec)
        self.leases.track(rec)
        log.info("queued: %d audio track(s), mode %s, %s frames, %d steps",
                 len(request.audio), request.mode, request.frames, request.sampling.steps)
        self.runner.schedule(rec)
        return rec

    async def run_action(self, action: str, params: dict, run: Callable[[str, dict], dict],
                         idempotency_key: Optional[str] = None, tenant: Optional[str] = None) -> JobRecord:
        """A job answered at once (RunPod ``model_check`` / ``volume_explore``): ``run(models
        root, params)`` gives its output; kept as a finished job record."""
        await self.start()
        if tenant is not None and idempotency_key:
            idempotency_key = f"{tenant}/{idempotency_key}"
        rec, created = await asyncio.to_thread(self.jobs.create, None, idempotency_key, "runpod", action, None,
                                               tenant)
        if not created:
            return rec
        started = time.time()
        try:
            rec.output = await asyncio.to_thread(run, await self.models_root() or "", params)
            rec.state = JobState.COMPLETED
        except InputError as e:
            rec.error, rec.state = ErrorInfo(field=e.field, message=e.message, status=e.status), JobState.FAILED
        rec.started_at, rec.finished_at = started, time.time()
        await asyncio.to_thread(self.jobs.save, rec)
        return rec

    def speech_voices(self) -> Optional[list[str]]:
        """The Kokoro voices under the models root ([] without a Kokoro folder); ``None``
        where this replica cannot see the models root (it is only mirrored where stages run)."""
        if self._voices is None:
            root = volume.optional_models_root({"models_root": self.settings.models_root,
                                                "cache_dir": self.settings.cache_dir})
            if root is None:
                return None
            self._voices = volume.speech_voices(root)
        return self._voices

    async def speaker_boxes(self, image: bytes, speakers: int, speaker_order=None) -> dict:
        """The boxes a job without ``bbox`` would get for this condition image (faces found,
        grown into speaker boxes; :func:`multitalk.utils.faces.boxes_for_image`)."""
        from multitalk.utils.faces import boxes_for_image

        return await asyncio.to_thread(boxes_for_image, image, speakers, speaker_order,
                                       self.settings.limits.max_image_pixels)

    async def models_report(self, max_age_s: float = 300.0) -> dict:
        """``/v1/models``: the models root's components and the loaders' verdict (kept for
        ``max_age_s``: verifying a 14B set reads every header, a few seconds)."""
        cached = self._models_report
        if cached is None or time.monotonic() - cached[0] > max_age_s:
            root = await self.models_root()
            report = await asyncio.to_thread(volume.model_check, root or "")
            # What requests may pick on this server, beside what the models root holds.
            report.update(model=self.settings.model, presets=sorted(self.settings.presets),
                          loras=list(self.settings.lora_names))
            cached = self._models_report = (time.monotonic(), report)
        return cached[1]

    async def models_root(self) -> Optional[str]:
        if self._models_root is None:
            self._models_root = await asyncio.to_thread(
                volume.optional_models_root,
                {"models_root": self.settings.models_root, "cache_dir": self.settings.cache_dir},
            )
        return self._models_root

    # --- queries ---------------------------------------------------------------------
    async def get(self, job_id: str) -> Optional[JobRecord]:
        """The job (this replica's live copy where it runs it), or ``None``."""
        if job_id in self.runner.records:
            return self.runner.records[job_id]
        if not valid_job_id(job_id):
            return None
        return await asyncio.to_thread(self.jobs.get, job_id)

    async def get_for(self, job_id: str, tenant: Optional[str]) -> JobRecord:
        """The job, if it exists (404) and ``tenant`` may see it (403)."""
        rec = await self.get(job_id)
        if rec is None:
            raise InputError("id", f"no job {job_id!r}", 404)
        if tenant is not None and rec.tenant != tenant:
            raise InputError("id", "this job belongs to another tenant", 403)
        return rec

    async def recent(self, tenant: Optional[str], limit: int = 20,
                     after: Optional[str] = None) -> tuple[list[JobRecord], Optional[str]]:
        """One page of jobs, newest first (live copies win), and the next page's cursor."""
        page, cursor = await asyncio.to_thread(self.jobs.recent, tenant, limit, after)
        return [self.runner.records.get(r.id, r) for r in page], cursor

    async def recent_after_job(self, tenant: Optional[str], limit: int,
                               after_job: Optional[str]) -> tuple[list[JobRecord], Optional[str]]:
        """Like :meth:`recent`, the page after the job ``after_job`` (an id, as OpenAI-style
        clients page)."""
        cursor = None
        if after_job is not None:
            rec = await self.get(after_job)
            if rec is None or (tenant is not None and rec.tenant != tenant):
                raise InputError("after", f"no job {after_job!r}", 404)
            cursor = index_cursor(rec)
        return await self.recent(tenant, limit, cursor)

    async def wait(self, job_id: str, timeout: Optional[float] = None) -> Optional[JobRecord]:
        """The job once finished, or as it stands when ``timeout`` runs out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        event = self.runner.done.get(job_id)
        if event is not None:
            try:
                await asyncio.wait_for(event.wait(), timeout)
            except asyncio.TimeoutError:
                pass
            rec = await self.get(job_id)
            if rec is None or rec.state.terminal or job_id in self.runner.records:
                return rec
            # Taken over by another replica while we waited: follow its record.
        while True:  # owned by another replica: poll its record
            rec = await self.get(job_id)
            if rec is None or rec.state.terminal:
                return rec
            if deadline is not None and time.monotonic() >= deadline:
                return rec
            await asyncio.sleep(1.0)

    async def cancel(self, job_id: str, tenant: Optional[str] = None) -> JobRecord:
        """Cancel a job (404/403 like :meth:`get_for`); a finished job is answered as it is."""
        rec = await self.get_for(job_id, tenant)
        if rec.state.terminal:
            return rec
        task = self.runner.cancel(job_id, CancelReason.CLIENT)
        if task is not None:
            job_log(job_id).info("cancel requested")
            await asyncio.wait({task}, timeout=30)
            return self.runner.records.get(job_id, rec)
        # Another replica holds it (or nobody does): the record says CANCELLED now, written
        # conditionally; its owner sees the new version at its next heartbeat and stops.
        return await asyncio.to_thread(self.jobs.cancel, job_id) or rec

    def output_store(self, rec: JobRecord) -> Store:
        return self.runner.output_store(rec)

    def video_location(self, rec: JobRecord) -> tuple[Store, str]:
        if rec.result is None:
            raise KeyError(rec.id)
        target = self.local_store if rec.result.store == "local" and self.local_store is not self.store else self.store
        return target, rec.result.key

    async def refresh_url(self, rec: JobRecord) -> JobRecord:
        """Presigned URLs expire: re-sign when answering a status query."""
        if rec.result is not None and rec.result.store == "s3":
            store, key = self.video_location(rec)
            url = await asyncio.to_thread(store.presigned_url, key, self.settings.presign_expires_s)
            rec = rec.model_copy(update={"result": rec.result.model_copy(update={"url": url})})
        return rec

    def _finished(self, rec: JobRecord) -> None:
        """The runner persisted ``rec`` in a final state: count it, deliver its webhook."""
        self._outcomes[(rec.tenant, rec.state.value.lower())] += 1
        self._notify(rec)

    def _notify(self, rec: JobRecord) -> None:
        """A job of this replica reached a final state (or was taken over with its webhook
        undelivered): deliver its webhook in the background."""
        if not rec.webhook_pending:
            return
        from .runpod import runpod_status

        payload = (runpod_status(rec) if rec.source == "runpod" else rec.status()).model_dump(mode="json")
        info = rec.webhook or WebhookInfo(url=rec.request.webhook)

        async def on_update(state: WebhookInfo) -> None:
            rec.webhook = state
            await self.leases.persist(rec)

        task = asyncio.ensure_future(self.webhooks.deliver(info, payload, rec.tenant, rec.id, on_update,
                                                           message_id=message_id(rec.id, rec.attempts)))
        self._deliveries.add(task)
        task.add_done_callback(self._deliveries.discard)

    def health(self) -> dict:
        return {"status": "ok", "store": self.store.describe(), "jobs_running": self.runner.unfinished()}
