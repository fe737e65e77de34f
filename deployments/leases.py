"""Leases: who runs which job, kept honest across ingress replicas.

A job record names its owner (an ingress replica) and carries the owner's last heartbeat.
:meth:`Leases.heartbeat` runs beside every job this replica runs: it writes the job's
progress (throttled) and the heartbeat, and stops the job when a client's cancel marker
appears or when another replica has taken the job over. :meth:`Leases.recover` takes over
the jobs nobody runs any more (their owner's heartbeat is older than ``lease_s``, or the
record was re-queued at a shutdown), with an atomic claim in the store
(:meth:`deployments.jobs.JobStore.claim`), so exactly one replica runs each of them. A
finished job whose webhook delivery had not ended is taken over the same way, and the new
owner delivers the webhook instead of re-running the job.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable, Optional

from .jobs import JobRecord, JobStore
from .schemas import JobState, ProgressInfo

logger = logging.getLogger("multitalk.serve")


class Leases:
    def __init__(self, jobs: JobStore, replica_id: str, lease_s: float = 60.0, persist_interval_s: float = 2.0,
                 job_log: Optional[Callable[[str], logging.LoggerAdapter]] = None):
        self.jobs = jobs
        self.replica_id = replica_id
        self.lease_s = lease_s
        self.persist_interval_s = persist_interval_s
        self._log = job_log or (lambda job_id: logging.LoggerAdapter(logger, {}))
        self._writing: dict[str, asyncio.Future] = {}  # per job: its record write in flight

    async def persist(self, rec: JobRecord) -> None:
        """Write ``rec`` with a fresh heartbeat (a snapshot: the live record keeps changing).

        A job's writes land in the order they were made: a heartbeat cancelled while its
        write runs in a worker thread must not land after the job's final record (the runner
        forgets a finished job, so the store's copy is what is answered from then on)."""
        previous = self._writing.get(rec.id)
        if previous is not None:
            await asyncio.wait({previous})
        rec.heartbeat_at = time.time()
        write = asyncio.ensure_future(asyncio.to_thread(self.jobs.save, rec.model_copy(deep=True)))
        self._writing[rec.id] = write

        def landed(done: asyncio.Future, job_id: str = rec.id) -> None:
            if self._writing.get(job_id) is done:
                del self._writing[job_id]
            if not done.cancelled():
                done.exception()  # retrieved: its awaiter (if still there) reports it

        write.add_done_callback(landed)
        await asyncio.shield(write)

    async def heartbeat(self, rec: JobRecord, take_dirty: Callable[[], bool],
                        stop: Callable[[str], None]) -> None:
        """Runs until cancelled, beside the job: progress when ``take_dirty()`` says it
        changed (at most every ``persist_interval_s``) or a bare heartbeat every
        ``lease_s / 3``; ``stop("superseded" | "client")`` when the job must end."""
        log = self._log(rec.id)
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.persist_interval_s)
            try:
                if take_dirty() or time.monotonic() - last > self.lease_s / 3:
                    if await asyncio.to_thread(self.jobs.superseded, rec):
                        # We were too slow to beat: another replica claimed the job and runs it.
                        log.warning("taken over by another ingress replica; stopping here")
                        stop("superseded")
                        return
                    last = time.monotonic()
                    await self.persist(rec)
                if await asyncio.to_thread(self.jobs.cancel_requested, rec.id):
                    log.info("cancel marker found")
                    stop("client")
                    return
            except Exception:
                log.exception("could not persist progress")

    async def recover(self, lease_s: float, is_running: Callable[[str], bool],
                      schedule: Callable[[JobRecord], None], redeliver: Callable[[JobRecord], None]) -> None:
        """Claim the unfinished jobs nobody runs (heartbeat older than ``lease_s``; 0: every
        unowned one) and hand each one won to ``schedule``; a finished job won for its
        webhook goes to ``redeliver``."""
        try:
            orphans = await asyncio.to_thread(self.jobs.orphans, lease_s, self.replica_id)
        except Exception:
            logger.exception("could not list job records for recovery")
            return
        for rec in orphans:
            if is_running(rec.id):
                continue
            previous_owner = rec.owner
            try:
                won = await asyncio.to_thread(self.jobs.claim, rec, self.replica_id)
            except Exception:
                logger.exception("could not claim job %s", rec.id)
                continue
            if not won:  # another replica took it over first
                continue
            if rec.state.terminal:  # only its webhook is left to deliver
                self._log(rec.id).info("delivering the webhook owner %s did not finish", previous_owner)
                await self.persist(rec)
                redeliver(rec)
                continue
            self._log(rec.id).info("re-queueing (was %s, owner %s, lease %d)", rec.state.value, previous_owner,
                                   rec.lease)
            rec.state = JobState.IN_QUEUE
            rec.progress = ProgressInfo(stage="queued", message="re-queued after an ingress restart")
            await self.persist(rec)
            schedule(rec)

    async def sweep_forever(self, is_running: Callable[[str], bool], schedule: Callable[[JobRecord], None],
                            redeliver: Callable[[JobRecord], None]) -> None:
        """Several ingress replicas: pick up jobs whose owner died once their lease expires."""
        while True:
            await asyncio.sleep(max(self.lease_s / 2, 1.0))
            try:
                await self.recover(self.lease_s, is_running, schedule, redeliver)
            except Exception:
                logger.exception("job sweep failed")
