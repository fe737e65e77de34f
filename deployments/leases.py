"""Leases: who runs which job, kept honest across ingress replicas.

A job record names its owner (an ingress replica) and carries the owner's last heartbeat.
:meth:`Leases.heartbeat` runs beside every job this replica holds, queued or running: it
writes the job's progress (throttled) and the heartbeat, and between writes asks the store
whether the record changed (one HEAD). Every write is conditional on the version this
replica last wrote or read (``deployments.jobs``), and a write that conflicts is
reconciled, never repeated blindly (:meth:`Leases.persist`):

* another replica took the job over (the record names another owner or lease): stop the
  job and write nothing more (``superseded``);
* another replica cancelled it: stop, and keep it cancelled (``client``).

**Fencing.** With several ingress replicas (``exclusive: false``), a replica that has not
managed to write a job's record for two thirds of ``lease_s`` (cut off from the store, or
its writes hang) stops that job by itself (``lease_lost``) and writes nothing more; other
replicas take a job over only after the whole ``lease_s`` without a heartbeat, so the job
has stopped before another replica runs it. The last third is the margin for stopping the
job's stage calls and for clock differences between nodes.

:meth:`Leases.recover` takes over the jobs nobody runs any more (their owner's heartbeat is
older than ``lease_s``, their owner is no longer one of the cluster's ingress replicas, or
the record was re-queued at a shutdown) with a conditional write of the record
(:meth:`deployments.jobs.JobStore.claim`), so exactly one replica runs each of them. A
finished job whose webhook delivery had not ended is taken over the same way, and the new
owner delivers the webhook instead of re-running the job.

All lease I/O runs on this replica's own small thread pool, never on the default executor
that per-job work (input fetches, uploads, decoding, encoding) fills: a busy replica must
not miss its heartbeats.

**An owner the cluster no longer runs.** A heartbeat only says the owner's process runs: a
replica whose node Ray has declared dead (raylet killed, network partition) is gone from
Serve's replicas while its leases may look fresh for up to ``lease_s``. Its jobs are taken
over at the next sweep (``live_replicas``), without waiting for the lease to expire. This
is the one takeover not preceded by the owner's own fencing: if that owner still runs, its
next write conflicts with the claim, it reads the record, sees another owner and stops
(``superseded``) without writing again, so the record stays the new owner's.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Optional

from .jobs import JobRecord, JobStore, RecordConflict
from .schemas import JobState, ProgressInfo

logger = logging.getLogger("multitalk.serve")

# Why the store says a job must stop here (deployments.runner.CancelReason values).
SUPERSEDED, CANCELLED_ELSEWHERE, LEASE_LOST = "superseded", "client", "lease_lost"
# Share of the lease after which an owner that could not write its job's record stops it.
FENCE_FRACTION = 2 / 3


class Leases:
    def __init__(self, jobs: JobStore, replica_id: str, lease_s: float = 60.0, persist_interval_s: float = 2.0,
                 job_log: Optional[Callable[[str], logging.LoggerAdapter]] = None, fence: bool = True,
                 io_threads: int = 4, live_replicas: Optional[Callable[[], set[str]]] = None):
        self.jobs = jobs
        self.replica_id = replica_id
        self.lease_s = lease_s
        self.persist_interval_s = persist_interval_s
        self.fence = fence  # several replicas: stop a job whose lease could not be renewed in time
        self._log = job_log or (lambda job_id: logging.LoggerAdapter(logger, {}))
        # The ingress replicas the cluster still runs (Serve's replica ids; blocking): a job
        # whose owner is not among them is taken over at once, even if its heartbeat is fresh.
        # A heartbeat only says the owner's process runs: a replica whose node the cluster has
        # declared dead (raylet killed, network partition) may still run and renew its leases
        # while its jobs can never finish.
        self.live_replicas = live_replicas
        self._io = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="lease-io")
        # Job id -> monotonic time the last successful write of its record was sent.
        self._written: dict[str, float] = {}

    @property
    def fence_s(self) -> float:
        return self.lease_s * FENCE_FRACTION

    async def _io_call(self, fn: Callable, *args: Any) -> Any:
        """Run blocking store I/O on the lease pool."""
        return await asyncio.get_running_loop().run_in_executor(self._io, functools.partial(fn, *args))

    def track(self, rec: JobRecord) -> None:
        """``rec`` was just written by this replica (created with it as owner, or claimed)."""
        self._written[rec.id] = time.monotonic()

    def release(self, job_id: str) -> None:
        """This replica holds the job no more."""
        self._written.pop(job_id, None)

    def close(self) -> None:
        """The replica stops: no more lease I/O (a call stuck on a dead store is left behind)."""
        self._io.shutdown(wait=False, cancel_futures=True)

    # --- writes ------------------------------------------------------------------------
    async def persist(self, rec: JobRecord) -> Optional[str]:
        """Write ``rec`` (a snapshot: the live record keeps changing) with a fresh heartbeat,
        conditional on the version this replica last wrote or read. ``None`` once written;
        else why the job must stop here: :data:`SUPERSEDED` (write nothing more) or
        :data:`CANCELLED_ELSEWHERE` (``rec`` now says CANCELLED; writing it keeps it so)."""
        for _ in range(8):
            sent = time.monotonic()
            rec.heartbeat_at = time.time()
            snapshot = rec.model_copy(deep=True)
            try:
                await self._io_call(self.jobs.save, snapshot)
            except RecordConflict as conflict:
                reason = self._reconcile(rec, conflict.stored)
                if reason is not None:
                    return reason
                continue  # a write that leaves the job ours: ours goes on top of it
            rec._version = snapshot._version
            self._written[rec.id] = sent
            return None
        raise RuntimeError(f"job record {rec.id} keeps changing under its owner")

    async def refresh(self, rec: JobRecord) -> Optional[str]:
        """Read the record if another replica wrote it since; like :meth:`persist`'s answer."""
        if not await self._io_call(self.jobs.changed, rec):
            return None
        stored = await self._io_call(self.jobs.get, rec.id)
        return self._reconcile(rec, stored)

    def _reconcile(self, rec: JobRecord, stored: Optional[JobRecord]) -> Optional[str]:
        """Another writer changed the record: is the job still ours, and still wanted?"""
        if stored is None or stored.owner != self.replica_id or stored.lease != rec.lease:
            return SUPERSEDED
        rec._version = stored._version
        if stored.state is JobState.CANCELLED and rec.state is not JobState.CANCELLED:
            rec.state, rec.finished_at = JobState.CANCELLED, stored.finished_at
            rec.progress = rec.progress.model_copy(update={"message": "cancelled"})
            return CANCELLED_ELSEWHERE
        return None

    # --- the heartbeat -----------------------------------------------------------------
    async def heartbeat(self, rec: JobRecord, take_dirty: Callable[[], bool],
                        stop: Callable[[str], None]) -> None:
        """Runs until cancelled, beside a job this replica holds: progress when
        ``take_dirty()`` says it changed, a bare
        heartbeat every ``lease_s / 3``, a version check in between; ``stop(reason)``
        (:data:`SUPERSEDED`, :data:`CANCELLED_ELSEWHERE`, :data:`LEASE_LOST`) when the job
        must end here. It wakes every ``persist_interval_s``, or every ``lease_s / 6`` when
        that is shorter (then progress is written that often)."""
        log = self._log(rec.id)
        self._written.setdefault(rec.id, time.monotonic())
        tick = min(self.persist_interval_s, self.lease_s / 6)
        while True:
            await asyncio.sleep(tick)
            since = time.monotonic() - self._written.get(rec.id, time.monotonic())
            if self.fence and since > self.fence_s:
                log.error("lease lost: the record could not be written for %.1f s (lease %.1f s); stopping the "
                          "job here, another replica takes it over", since, self.lease_s)
                stop(LEASE_LOST)
                return
            try:
                if since > self.lease_s / 3 or take_dirty():
                    reason = await self._within_lease(self.persist(rec), since)
                else:
                    reason = await self._within_lease(self.refresh(rec), since)
            except asyncio.TimeoutError:
                continue  # the store did not answer before the fence: stopped above
            except Exception:
                log.exception("could not persist progress")
                continue
            if reason is not None:
                log.warning("taken over by another ingress replica; stopping here" if reason == SUPERSEDED
                            else "cancelled through another ingress replica")
                stop(reason)
                return

    async def _within_lease(self, call, since: float):
        """``call`` awaited no longer than the lease allows (no limit without fencing)."""
        if not self.fence:
            return await call
        return await asyncio.wait_for(call, max(0.0, self.fence_s - since))

    # --- taking over -------------------------------------------------------------------
    async def recover(self, lease_s: float, is_running: Callable[[str], bool],
                      schedule: Callable[[JobRecord], None], redeliver: Callable[[JobRecord], None]) -> None:
        """Claim the unfinished jobs nobody runs (heartbeat older than ``lease_s``; 0: every
        unowned one) and hand each one won to ``schedule``; a finished job won for its
        webhook goes to ``redeliver``. Our own jobs count too when ``lease_s`` > 0: one we
        hold no more had its lease lost and may be claimed again, by us as by anyone. A job
        whose owner is not among ``live_replicas()`` (when known) counts whatever its heartbeat."""
        live = None
        if self.live_replicas is not None:
            try:  # asks Ray's GCS, not the store: a default worker thread, not the lease pool
                live = await asyncio.to_thread(self.live_replicas)
            except Exception:  # noqa: BLE001 - not known now: the leases alone decide
                logger.warning("could not list the live ingress replicas", exc_info=True)
        try:
            orphans = await self._io_call(self.jobs.orphans, lease_s, self.replica_id if lease_s <= 0 else None,
                                          live)
        except Exception:
            logger.exception("could not list job records for recovery")
            return
        for rec in orphans:
            if is_running(rec.id):
                continue
            previous_owner, previous_state = rec.owner, rec.state
            if not rec.state.terminal:
                rec.state = JobState.IN_QUEUE
                rec.progress = ProgressInfo(stage="queued", message="re-queued after an ingress restart")
            sent = time.monotonic()
            try:
                won = await self._io_call(self.jobs.claim, rec, self.replica_id)
            except Exception:
                logger.exception("could not claim job %s", rec.id)
                continue
            if not won:  # another replica took it over first, or its owner was alive after all
                continue
            self._written[rec.id] = sent
            if rec.state.terminal:  # only its webhook is left to deliver
                self._log(rec.id).info("delivering the webhook owner %s did not finish", previous_owner)
                redeliver(rec)
                continue
            self._log(rec.id).info("re-queueing (was %s, owner %s, lease %d)", previous_state.value, previous_owner,
                                   rec.lease)
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
