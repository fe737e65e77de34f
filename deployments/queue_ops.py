"""What the RunPod and OpenAI-style front doors ask of the job service beyond submit, get and
cancel: the queue as a whole (retry, purge, counts), a job's stream read position, and a
finished job's files (thumbnail, delete). A mixin of :class:`~deployments.service.JobService`
(it uses the service's units: ``runner``, ``jobs``, ``leases``, ``admission``, ``store``), so
that the routes still call one object.
"""
from __future__ import annotations

import asyncio
from typing import Optional

from multitalk.api import InputError

from .chunk_results import chunks_prefix, read_stream_cursor, stream_cursor_key, write_stream_cursor
from .jobs import JobRecord
from .runner import job_log
from .schemas import JobState, ProgressInfo


class QueueOperations:
    # --- the queue as a whole (RunPod's /retry, /purge-queue, /health) -----------------
    async def retry(self, job_id: str, tenant: Optional[str] = None) -> JobRecord:
        """Run a FAILED or CANCELLED job again, same id and request (409 otherwise). Claimed
        like a take-over (``JobStore.claim``), so two replicas cannot both run it."""
        rec = await self.get_for(job_id, tenant)
        if rec.action != "generate" or rec.state not in (JobState.FAILED, JobState.CANCELLED):
            raise InputError("id", f"job is {rec.state.value}; only a failed or cancelled job can be retried", 409)
        if rec.webhook_pending:
            raise InputError("id", "the job's webhook is still being delivered; retry once it has ended", 409)
        self.admission.check_capacity(self.runner.unfinished, tenant)
        if self.runner.is_running(job_id) or not await asyncio.to_thread(
                self.jobs.claim, rec, self.settings.replica_id):
            raise InputError("id", "the job is being retried by another request", 409)
        rec.state, rec.started_at, rec.finished_at = JobState.IN_QUEUE, None, None
        rec.progress = ProgressInfo(message="retried")
        rec.result = rec.error = rec.output = rec.webhook = None
        rec.chunks, rec.timings = [], {}
        await self.leases.persist(rec)
        await asyncio.to_thread(self.jobs.reopen, rec)
        await asyncio.to_thread(write_stream_cursor, self.store, rec.id, 0)
        self._outcomes[(tenant, "retried")] += 1
        job_log(rec.id).info("retried (run %d next)", rec.attempts + 1)
        self.runner.schedule(rec)
        return rec

    async def unfinished(self, tenant: Optional[str]) -> list[JobRecord]:
        """The unfinished jobs ``tenant`` may see (None: all), across every ingress replica."""
        stored = await asyncio.to_thread(self.jobs.unfinished)
        live = [self.runner.records.get(r.id, r) for r in stored]
        return [r for r in live if not r.state.terminal and (tenant is None or r.tenant == tenant)]

    async def purge_queue(self, tenant: Optional[str] = None) -> list[str]:
        """Cancel every job still waiting to start that ``tenant`` may see; their ids."""
        removed = []
        for rec in await self.unfinished(tenant):
            if rec.state == JobState.IN_QUEUE:  # the live state, read just before cancelling
                await self.cancel(rec.id, tenant)
                removed.append(rec.id)
        return removed

    async def job_counts(self, tenant: Optional[str] = None) -> dict[str, int]:
        """Queued and running jobs (every replica), jobs this replica finished or retried
        since it started, and its job slots (``max_concurrent_jobs``) busy."""
        unfinished = await self.unfinished(tenant)
        busy = sum(1 for job_id, r in self.runner.records.items()
                   if self.runner.is_running(job_id) and r.state == JobState.IN_PROGRESS)
        counts = {"queued": sum(r.state == JobState.IN_QUEUE for r in unfinished),
                  "running": sum(r.state == JobState.IN_PROGRESS for r in unfinished),
                  "slots": self.settings.max_concurrent_jobs, "slots_busy": busy}
        for outcome in ("completed", "failed", "cancelled", "retried"):
            counts[outcome] = sum(n for (t, o), n in self._outcomes.items()
                                  if o == outcome and (tenant is None or t == tenant))
        return counts

    async def stream_position(self, job_id: str) -> int:
        """How many of the job's results a stream reader took already (RunPod ``/stream``)."""
        return await asyncio.to_thread(read_stream_cursor, self.store, job_id)

    async def advance_stream(self, job_id: str, position: int) -> None:
        await asyncio.to_thread(write_stream_cursor, self.store, job_id, position)

    # --- a finished job's files ----------------------------------------------------------
    async def thumbnail(self, rec: JobRecord) -> bytes:
        """A COMPLETED job's first frame as a JPEG, made once and kept beside its mp4."""
        from .openai_videos import thumbnail_key, first_frame_jpeg

        store, video_key = self.video_location(rec)
        key = thumbnail_key(video_key)
        if await asyncio.to_thread(store.exists, key):
            return await asyncio.to_thread(store.get, key)
        jpeg = await asyncio.to_thread(first_frame_jpeg, store, video_key)
        await asyncio.to_thread(store.put, key, jpeg, "image/jpeg")
        return jpeg

    async def delete(self, job_id: str, tenant: Optional[str] = None) -> None:
        """Forget a job and its files (``DELETE /v1/videos/{id}``); an unfinished one is
        cancelled first. A job another replica runs is cancelled there (409: delete it again
        once it has stopped)."""
        rec = await self.get_for(job_id, tenant)
        if not rec.state.terminal:
            elsewhere = not self.runner.is_running(job_id)
            rec = await self.cancel(job_id, tenant)
            if elsewhere or self.runner.is_running(job_id):
                raise InputError("id", "the job is being cancelled; delete it again once it has stopped", 409)
        if rec.request is not None:
            store = self.output_store(rec)
            key = rec.result.key if rec.result is not None else self.admission.output_key_for(rec)
            from .openai_videos import thumbnail_key

            keys = [key, thumbnail_key(key), key[: -len(".mp4")] + ".speech.wav"]
            keys += await asyncio.to_thread(store.list, chunks_prefix(key))
            for k in keys:
                await asyncio.to_thread(store.delete, k)
        await asyncio.to_thread(self.store.delete, stream_cursor_key(job_id))
        await asyncio.to_thread(self.jobs.delete, job_id)
        self.runner.records.pop(job_id, None)
        job_log(job_id).info("deleted")
