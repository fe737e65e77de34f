"""The job runner: runs each accepted job as an asyncio task in the ingress replica.

One job: fetch its inputs from the store, run the library's chunk loop
(``multitalk.driver.generate`` or the model's) over the stages (deployment handles in
production), upload the mp4 from the file the loop wrote (in parts, never whole in memory),
and land every outcome in the job record: COMPLETED with the result, FAILED
with the error (the field named for an input error), CANCELLED, or back IN_QUEUE when the
ingress shuts down. Beside it run the job's heartbeat (``deployments.leases``) and its
deadline. A job that fails transiently (a replica died) is re-run within its retry
budget (``deployments.retry``). Why a job stopped early is one :class:`CancelReason`.
Once a job's final record is saved, the runner forgets it: its maps hold running jobs only.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from enum import Enum
from typing import Any, Awaitable, Callable, Optional

from multitalk.api import GenerationResult, Limits, Progress

from . import metrics
from .admission import Admission, rename_field
from .chunk_results import ChunkRecorder, chunks_prefix
from .jobs import JobRecord
from .leases import Leases
from .retry import RetryBudget, input_error_in
from .schemas import ErrorInfo, JobState, ProgressInfo, ResultInfo
from .storage import LocalStore, Store

logger = logging.getLogger("multitalk.serve")

GenerateFn = Callable[..., Awaitable[GenerationResult]]


class JobLog(logging.LoggerAdapter):
    """Tags every line with the job id: a ``[job <id>]`` prefix for people and grep, and the
    :data:`~deployments.metrics.JOB_LOG_FIELD` attribute, a field of its own in JSON logs."""

    def process(self, msg, kwargs):
        kwargs["extra"] = {**kwargs.get("extra", {}), metrics.JOB_LOG_FIELD: self.extra["job_id"]}
        return f"[job {self.extra['job_id']}] {msg}", kwargs


def job_log(job_id: str) -> JobLog:
    return JobLog(logger, {"job_id": job_id})


class CancelReason(str, Enum):
    """Why a running job's task was cancelled (the first reason given wins)."""

    CLIENT = "client"  # a cancel request, here or through another replica's marker
    SHUTDOWN = "shutdown"  # this ingress replica stops
    DEADLINE = "deadline"  # past job_timeout_s
    SUPERSEDED = "superseded"  # another replica took the job over: write nothing more
    LEASE_LOST = "lease_lost"  # the record could not be written in time: stop, write nothing more


class ProgressTracker:
    """The driver's progress callback: updates the live record, marks it for the next
    heartbeat write, feeds the metrics and logs stage changes (and every tenth step)."""

    def __init__(self, rec: JobRecord, log: logging.LoggerAdapter):
        self.rec, self.log = rec, log
        self._dirty = False
        self._stage: Optional[str] = None

    def take_dirty(self) -> bool:
        dirty, self._dirty = self._dirty, False
        return dirty

    def mark_dirty(self) -> None:
        self._dirty = True

    def __call__(self, p: Progress) -> None:
        info = ProgressInfo(**dataclasses.asdict(p))
        if not info.total_steps and self.rec.progress.total_steps:
            # Stages after the sampler report no steps; keep the count so clients' step
            # bars do not jump back to zero.
            info.step, info.total_steps = self.rec.progress.step, self.rec.progress.total_steps
        self.rec.progress = info
        metrics.jobs.progress(self.rec.id, p)
        self._dirty = True
        if p.stage != self._stage:
            self._stage = p.stage
            self.log.info("stage %s %s", p.stage, p.message)
        elif p.total_steps and (p.step == p.total_steps or p.step % 10 == 0):
            self.log.info("%s step %d/%d chunk %d/%d", p.stage, p.step, p.total_steps, p.chunk + 1, p.total_chunks)


@dataclasses.dataclass
class RunnerSettings:
    """The runner's part of the ingress settings (``deployments.service.ServiceSettings``)."""

    max_concurrent_jobs: int = 2
    job_timeout_s: Optional[float] = 3600.0
    requeue_on_shutdown: bool = True
    max_stage_retries: int = 16
    stage_retry_backoff_s: float = 1.0
    stage_retry_window_s: float = 150.0
    presign_expires_s: int = 3600


class JobRunner:
    """Owns the live records and tasks of the jobs this replica runs."""

    def __init__(self, stages: Any, admission: Admission, leases: Leases, store: Store, local_store: LocalStore,
                 generate_fn: GenerateFn, limits: Limits, settings: RunnerSettings,
                 on_finished: Optional[Callable[[JobRecord], None]] = None):
        self.stages, self.admission, self.leases = stages, admission, leases
        self.on_finished = on_finished  # called with each record persisted in a final state
        self.store, self.local_store = store, local_store
        self.generate_fn, self.limits, self.settings = generate_fn, limits, settings
        # The jobs this replica runs, until their final record is saved: live copies, tasks,
        # and the events their waiters hold.
        self.records: dict[str, JobRecord] = {}
        self.tasks: dict[str, asyncio.Task] = {}
        self.done: dict[str, asyncio.Event] = {}
        self._reasons: dict[str, CancelReason] = {}
        self._slots: Optional[asyncio.Semaphore] = None

    # --- bookkeeping -----------------------------------------------------------------
    def is_running(self, job_id: str) -> bool:
        return job_id in self.tasks

    def unfinished(self, tenant: Optional[str] = None) -> int:
        """Jobs this replica runs or queues (``tenant``: only that tenant's)."""
        return sum(1 for job_id, t in self.tasks.items() if not t.done()
                   and (tenant is None or getattr(self.records.get(job_id), "tenant", None) == tenant))

    def schedule(self, rec: JobRecord) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.settings.max_concurrent_jobs)
        self.records[rec.id] = rec
        metrics.jobs.state(rec.id, rec.state)
        self.done[rec.id] = asyncio.Event()
        self.tasks[rec.id] = asyncio.get_running_loop().create_task(self._run(rec), name=f"job-{rec.id}")

    def cancel(self, job_id: str, reason: CancelReason) -> Optional[asyncio.Task]:
        """Cancel the job's task (if this replica runs it); returns the task."""
        task = self.tasks.get(job_id)
        if task is not None and not task.done():
            self._reasons.setdefault(job_id, reason)
            task.cancel()
        return task

    async def stop(self) -> None:
        for job_id in list(self.tasks):
            self.cancel(job_id, CancelReason.SHUTDOWN)
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)

    # --- one job ---------------------------------------------------------------------
    async def _run(self, rec: JobRecord) -> None:
        log = job_log(rec.id)
        budget = RetryBudget(self.settings.max_stage_retries, self.settings.stage_retry_backoff_s,
                             window_s=self.settings.stage_retry_window_s)
        stages = self.stages.for_job(rec.id, retries=budget)
        tracker = ProgressTracker(rec, log)
        # The lease covers the job from now on, queued or running: a job waiting for a slot
        # is held by this replica as much as a running one (without heartbeats it would look
        # orphaned to the other ingress replicas after lease_s, and one would claim it).
        beat = asyncio.ensure_future(self.leases.heartbeat(
            rec, tracker.take_dirty, lambda why: self.cancel(rec.id, CancelReason(why))))
        deadline: Optional[asyncio.TimerHandle] = None
        result: Optional[GenerationResult] = None
        try:
            async with self._slots:
                await self._mark_started(rec, log)
                if self.settings.job_timeout_s:
                    deadline = asyncio.get_running_loop().call_later(
                        self.settings.job_timeout_s, self.cancel, rec.id, CancelReason.DEADLINE)
                result = await self._generate(rec, stages, tracker, budget)
                await self._finish(rec, result, log)
        except asyncio.CancelledError:
            stages.cancel()
            self._cancelled(rec, self._reasons.get(rec.id), log)
        except Exception as e:  # noqa: BLE001 - every failure must land in the record
            stages.cancel()  # calls the driver started but no longer waits for
            self._failed(rec, e, log)
        finally:
            beat.cancel()
            if deadline is not None:
                deadline.cancel()
            if result is not None:
                result.release()  # the mp4 file, uploaded or not
            await self._close(rec, log)

    async def _mark_started(self, rec: JobRecord, log: logging.LoggerAdapter) -> None:
        rec.state, rec.started_at = JobState.IN_PROGRESS, time.time()
        metrics.jobs.state(rec.id, rec.state)
        rec.attempts += 1
        rec.timings["queue"] = round(rec.started_at - rec.created_at, 3)
        rec.progress = ProgressInfo(stage="inputs", message="fetching inputs")
        stop = await self.leases.persist(rec)
        if stop is not None:  # taken over or cancelled through another replica while queued
            self._reasons.setdefault(rec.id, CancelReason(stop))
            raise asyncio.CancelledError
        log.info("started (attempt %d)", rec.attempts)

    async def _generate(self, rec: JobRecord, stages: Any, tracker: ProgressTracker,
                        budget: RetryBudget) -> GenerationResult:
        """Fetch the inputs and run the driver; re-run within ``budget`` after a transient failure."""
        t0 = time.monotonic()
        media = await asyncio.to_thread(self.admission.fetch_inputs, rec.request, rec.source, rec.tenant)
        rec.timings["fetch_inputs"] = round(time.monotonic() - t0, 3)
        gen_request = rec.request.with_media(media)

        def on_retry(exc: BaseException, delay: float) -> None:
            stages.cancel()  # whatever the failed attempt left running
            rec.progress = ProgressInfo(stage="retry", message=f"stage failed ({type(exc).__name__}); "
                                                               f"retry {budget.used}/{budget.retries}")

        def attempt():
            rec.chunks = []  # a re-run starts the chunks over
            return self.generate_fn(gen_request, stages, tracker, limits=self.limits,
                                    on_chunk=self._chunk_recorder(rec, tracker))

        t0 = time.monotonic()
        try:
            result = await budget.run(f"job {rec.id}", attempt, on_retry)
        finally:
            if budget.used:
                rec.timings["stage_retries"] = budget.used
        rec.timings["generate"] = round(time.monotonic() - t0, 3)
        rec.timings.update({k: round(float(v), 3) for k, v in (result.timings or {}).items()})
        return result

    def output_store(self, rec: JobRecord) -> Store:
        """Where the job's results go: the local output folder or the configured store."""
        return self.local_store if rec.request.output.format == "local" else self.store

    def _chunk_recorder(self, rec: JobRecord, tracker: ProgressTracker) -> Optional[ChunkRecorder]:
        """Streaming jobs: each finished chunk stored as it is encoded (``deployments/chunk_results.py``)."""
        if rec.request.mode != "streaming":
            return None
        prefix = chunks_prefix(self.admission.output_key_for(rec))
        return ChunkRecorder(self.output_store(rec), prefix, rec.chunks, tracker.mark_dirty)

    async def _finish(self, rec: JobRecord, result: GenerationResult, log: logging.LoggerAdapter) -> None:
        total_steps, total_chunks = rec.progress.total_steps, rec.progress.total_chunks
        rec.progress = ProgressInfo(stage="upload", step=total_steps, total_steps=total_steps,
                                    chunk=total_chunks - 1, total_chunks=total_chunks, message="uploading video")
        t0 = time.monotonic()
        rec.result = await self._upload(rec, result)
        rec.timings["upload"] = round(time.monotonic() - t0, 3)
        if rec.request.frames is None and rec.request.mode == "clip":
            rec.options_applied["frames"] = {"value": result.num_frames, "source": "fitted to the audio"}
        rec.state = JobState.COMPLETED
        rec.progress = rec.progress.model_copy(update={"stage": "done", "message": ""})
        log.info("completed: %d frames, %s", result.num_frames, rec.result.key)

    async def _upload(self, rec: JobRecord, result: GenerationResult) -> ResultInfo:
        key = self.admission.output_key_for(rec)
        target = self.output_store(rec)
        if result.video_file is not None:  # from the file, in parts (S3: the transfer manager's multipart upload)
            await asyncio.to_thread(target.put_file, key, result.video_file.path, "video/mp4")
        else:
            await asyncio.to_thread(target.put, key, result.video, "video/mp4")
        url = await asyncio.to_thread(target.presigned_url, key, self.settings.presign_expires_s)
        speech_key = speech_url = None
        if getattr(result, "speech_wav", None):  # text to speech: the synthesised soundtrack beside the video
            speech_key = key[: -len(".mp4")] + ".speech.wav"
            await asyncio.to_thread(target.put, speech_key, result.speech_wav, "audio/wav")
            speech_url = await asyncio.to_thread(target.presigned_url, speech_key, self.settings.presign_expires_s)
        local = isinstance(target, LocalStore)
        return ResultInfo(
            speech_key=speech_key, speech_url=speech_url,
            key=key, store="local" if local else "s3", url=url, path=str(target.path(key)) if local else None,
            video_url=f"/v1/jobs/{rec.id}/video", frames=result.num_frames,
            duration=round(result.num_frames / float(result.fps or 25), 3), fps=result.fps, width=result.width,
            height=result.height, chunks=result.chunks, lip_sync=result.lip_sync,
            warnings=list(result.warnings or []), loras=list(result.loras or []),
            boxes=getattr(result, "boxes", None), boxes_source=getattr(result, "boxes_source", None),
        )

    def _cancelled(self, rec: JobRecord, reason: Optional[CancelReason], log: logging.LoggerAdapter) -> None:
        if reason is CancelReason.SUPERSEDED:
            log.info("left to the replica that took it over")
        elif reason is CancelReason.LEASE_LOST:
            log.warning("stopped: its lease could not be renewed; left to the replica that takes it over")
        elif reason is CancelReason.DEADLINE:
            rec.state = JobState.FAILED
            rec.error = ErrorInfo(message=f"deadline exceeded (job_timeout_s={self.settings.job_timeout_s:g})",
                                  status=504)
            log.warning("deadline exceeded after %.0f s", self.settings.job_timeout_s)
        elif reason is CancelReason.SHUTDOWN and self.settings.requeue_on_shutdown:
            # Not the client's cancel: the ingress is shutting down. Leave the job queued
            # and unowned; the next ingress's recovery runs it again.
            rec.state, rec.owner = JobState.IN_QUEUE, None
            rec.progress = ProgressInfo(stage="queued", message="re-queued at ingress shutdown")
            log.info("re-queued at shutdown")
        else:
            rec.state = JobState.CANCELLED
            rec.progress.message = "cancelled"
            log.info("cancelled")

    def _failed(self, rec: JobRecord, exc: BaseException, log: logging.LoggerAdapter) -> None:
        ie = input_error_in(exc)
        if ie is not None:
            ie = rename_field(ie, rec.source)
            rec.error = ErrorInfo(field=ie.field, message=ie.message, status=ie.status)
            log.warning("failed on input %s: %s", ie.field, ie.message)
        else:
            rec.error = ErrorInfo(message=f"{type(exc).__name__}: {exc}", status=500)
            log.exception("failed")
        rec.state = JobState.FAILED

    async def _close(self, rec: JobRecord, log: logging.LoggerAdapter) -> None:
        """Persist the outcome (unless the job is not this replica's any more) and forget the
        job: from here on its record in the store is the truth. A record that could not be
        saved stays here, so that this replica still answers for the job."""
        reason = self._reasons.pop(rec.id, None)
        saved = True
        if reason in (CancelReason.SUPERSEDED, CancelReason.LEASE_LOST):  # the record is another owner's
            self.records.pop(rec.id, None)
        else:
            rec.finished_at = time.time() if rec.state.terminal else None
            if rec.started_at and rec.finished_at:
                rec.timings["total"] = round(rec.finished_at - rec.started_at, 3)
            try:
                stop = await self.leases.persist(rec)
                if stop == CancelReason.CLIENT.value:  # cancelled elsewhere meanwhile: rec says so now
                    log.info("cancelled through another ingress replica before it finished")
                    stop = await self.leases.persist(rec)
                if stop == CancelReason.SUPERSEDED.value:
                    log.warning("taken over by another ingress replica before its outcome was written")
                    self.records.pop(rec.id, None)
            except Exception:
                saved = False
                log.exception("could not persist the final record")
            metrics.jobs.finished(rec.id, rec.state, rec.timings)
            if rec.state.terminal and self.on_finished is not None and rec.id in self.records:
                self.on_finished(rec)
        self.leases.release(rec.id)
        self.tasks.pop(rec.id, None)
        if saved:
            self.records.pop(rec.id, None)
        self.done.pop(rec.id).set()
