"""Several ingress replicas over one store, racing: the store's conditional writes decide.

Each test runs two :class:`JobService` replicas over one store, a local folder and a real
S3 server (moto over HTTP), with their own store objects as two processes would have:

* the same ``Idempotency-Key`` submitted to both at the same moment makes one job;
* a cancel through the replica that does not run the job stays cancelled, whether it lands
  between two heartbeats of the owner or just before the owner writes the job's outcome;
* a job waiting for a slot at its owner is held by the owner (not taken over);
* a replica cut off from the store stops its job before the other replica runs it;
* heartbeats go on while the default thread pool is full of per-job work.
"""
from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from deployments.jobs import JobStore
from deployments.schemas import JobRequest, JobState
from deployments.service import JobService, ServiceSettings
from deployments.storage import LocalStore

from fakes import FakeStages, fake_generate, make_bucket

RECORD_WRITES = ("put", "put_if", "put_versioned")


@pytest.fixture(params=["local", "s3"])
def stores(request, tmp_path):
    """A factory of store objects over one backing store (each replica gets its own)."""
    if request.param == "local":
        root = tmp_path / "store"
        return lambda: LocalStore(root)
    from deployments.storage import S3Store

    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = f"races-{time.monotonic_ns()}"
    make_bucket(endpoint, bucket)
    return lambda: S3Store(bucket, endpoint_url=endpoint, region="eu-west-1")


def _inputs(store):
    for name, data in {"1.wav": b"RIFFone", "multi1.png": b"\x89PNG"}.items():
        store.put(name, data)


class Runs:
    """A generate function per replica that counts which replica ran what, and when."""

    def __init__(self):
        self.runs: list[tuple[str, str, float]] = []  # (replica, prompt, monotonic start)

    def __call__(self, name):
        async def generate(request, stages, progress=None, limits=None, on_chunk=None):
            self.runs.append((name, request.prompt, time.monotonic()))
            return await fake_generate(request, stages, progress, limits)
        return generate


def _replica(store, name, runs, stages=None, **settings):
    settings = {"exclusive": False, "lease_s": 10.0, "persist_interval_s": 0.05, "replica_id": name,
                "precheck_inputs": False, "limits": {"max_steps": 400}, **settings}
    return JobService(store=store, stages=stages or FakeStages(), settings=ServiceSettings(**settings),
                      generate_fn=runs(name))


def _request(prompt="p", steps=2):
    return JobRequest(image="multi1.png", audio=["1.wav"], prompt=prompt, frames=9, sampling={"steps": steps})


def _is_record(key: str) -> bool:
    return key.startswith("jobs/") and key.count("/") == 1 and key.endswith(".json")


def _watch_record_writes(store, name, log: list, before_write=None):
    """Log ``(replica, state)`` of every job-record write this store object makes (and let
    ``before_write(key, record)`` act just before one lands)."""
    for method in RECORD_WRITES:
        if not hasattr(store, method):  # the previous release's stores had plain puts only
            continue

        def wrapped(key, data, *args, _write=getattr(store, method), **kw):
            if not _is_record(key):
                return _write(key, data, *args, **kw)
            record = json.loads(data)
            if before_write is not None:
                before_write(key, record)
            out = _write(key, data, *args, **kw)
            if out is not None or _write.__name__ == "put":
                log.append((name, record["state"]))
            return out

        setattr(store, method, wrapped)


# --- 2. one job per idempotency key ------------------------------------------------------


def _meet_at_idempotency_keys(stores):
    """Hold the first idempotency-key call of each replica until the other's arrives, so
    that both look the key up (or create it) at the same moment: the race, every time."""
    barrier, seen = threading.Barrier(len(stores), timeout=5), threading.local()
    for store in stores:
        for method in ("get", "exists", "put", "create", "put_if", "get_versioned"):
            if not hasattr(store, method):
                continue

            def wrapped(key, *args, _call=getattr(store, method), **kw):
                if key.startswith("jobs/idempotency/") and not getattr(seen, "met", False):
                    seen.met = True
                    try:
                        barrier.wait()
                    except threading.BrokenBarrierError:
                        pass
                return _call(key, *args, **kw)

            setattr(store, method, wrapped)


def test_the_same_idempotency_key_at_two_replicas_at_once_makes_one_job(stores):
    store_a, store_b = stores(), stores()
    _inputs(store_a)
    _meet_at_idempotency_keys([store_a, store_b])
    runs = Runs()
    a, b = _replica(store_a, "replica-a", runs), _replica(store_b, "replica-b", runs)

    async def scenario():
        await asyncio.gather(a.start(), b.start())
        first, second = await asyncio.gather(a.submit(_request(), idempotency_key="retry-1"),
                                             b.submit(_request(), idempotency_key="retry-1"))
        owner = a if first.id in a.runner.records else b
        done = await owner.wait(first.id, timeout=20)
        await asyncio.gather(a.stop(), b.stop())
        return first, second, done

    first, second, done = asyncio.run(scenario())
    assert first.id == second.id, "two jobs for one idempotency key"
    assert JobStore(stores()).list_ids() == [first.id]
    assert done.state == JobState.COMPLETED and len(runs.runs) == 1, runs.runs


# --- 3. fenced records: a cancel racing the owner ----------------------------------------


def test_a_cancel_through_another_replica_racing_heartbeats_stays_cancelled(stores):
    """B cancels a job A runs while A writes a heartbeat every 50 ms: no write after the
    cancel says anything but CANCELLED, and A stops sampling."""
    store_a, store_b = stores(), stores()
    _inputs(store_a)
    writes: list[tuple[str, str]] = []
    _watch_record_writes(store_a, "replica-a", writes)
    _watch_record_writes(store_b, "replica-b", writes)
    runs, slow = Runs(), FakeStages()
    slow.step_delay = 0.05
    a = _replica(store_a, "replica-a", runs, stages=slow)
    b = _replica(store_b, "replica-b", runs)

    async def scenario():
        rec = await a.submit(_request(steps=200))
        for _ in range(100):  # until A samples and has written progress
            if slow.calls.count("diffusion") and writes.count(("replica-a", "IN_PROGRESS")) >= 3:
                break
            await asyncio.sleep(0.05)
        answer = await b.cancel(rec.id)
        await asyncio.wait_for(a.runner.done[rec.id].wait(), 10)
        await asyncio.gather(a.stop(), b.stop())
        return rec.id, answer

    job_id, answer = asyncio.run(scenario())
    assert answer.state == JobState.CANCELLED
    cancel_at = writes.index(("replica-b", "CANCELLED"))
    after = writes[cancel_at:]
    assert all(state == "CANCELLED" for _, state in after), f"the cancel was overwritten: {after}"
    assert "diffusion" in slow.cancelled  # A stopped sampling
    assert JobStore(stores()).get(job_id).state == JobState.CANCELLED


def test_a_cancel_landing_just_before_the_owner_writes_the_outcome_stays_cancelled(stores):
    store_a, store_b = stores(), stores()
    _inputs(store_a)
    runs = Runs()
    b = _replica(store_b, "replica-b", runs)
    answers = []

    def cancel_first(key, record):  # B's cancel lands between A's last read and its final write
        if record["state"] == "COMPLETED" and not answers:
            answers.append(asyncio.run(b.cancel(record["id"])))

    _watch_record_writes(store_a, "replica-a", [], before_write=cancel_first)
    a = _replica(store_a, "replica-a", runs)

    async def scenario():
        rec = await a.submit(_request())
        await asyncio.wait_for(a.runner.done[rec.id].wait(), 10)
        live = await a.get(rec.id)
        await asyncio.gather(a.stop(), b.stop())
        return rec.id, live

    job_id, live = asyncio.run(scenario())
    assert answers and answers[0].state == JobState.CANCELLED  # what B told its client
    assert JobStore(stores()).get(job_id).state == JobState.CANCELLED, "the owner's outcome overwrote the cancel"
    assert live.state == JobState.CANCELLED  # and what A answers agrees


# --- 3. fenced records: leases ------------------------------------------------------------


def test_a_job_waiting_for_a_slot_is_held_by_its_owner(stores):
    """A runs one job at a time; its second job waits in A's queue longer than the lease.
    B's sweeps must not take it over: A holds it (its heartbeat covers queued jobs)."""
    store_a, store_b = stores(), stores()
    _inputs(store_a)
    runs, slow = Runs(), FakeStages()
    slow.step_delay = 0.05
    a = _replica(store_a, "replica-a", runs, stages=slow, lease_s=2.0, max_concurrent_jobs=1)
    b = _replica(store_b, "replica-b", runs, lease_s=2.0)

    async def scenario():
        await asyncio.gather(a.start(), b.start())
        first = await a.submit(_request("first", steps=90))  # about 4.5 s: over 2 leases
        second = await a.submit(_request("second"))
        done = await a.wait(second.id, timeout=20)
        await asyncio.gather(a.stop(), b.stop())
        return first, second, done

    first, second, done = asyncio.run(scenario())
    assert [(name, prompt) for name, prompt, _ in runs.runs] == [("replica-a", "first"), ("replica-a", "second")]
    stored = JobStore(stores()).get(second.id)
    assert done.state == JobState.COMPLETED and stored.owner == "replica-a" and stored.lease == 0


class CutOff:
    """Cuts one replica's store object off: from ``cut()`` on, every call hangs (as S3
    calls do when the network is gone) until ``heal()``, then fails."""

    def __init__(self, store):
        self.store, self._cut, self._healed = store, threading.Event(), threading.Event()
        for method in ("get", "put", "exists", "list", "delete", "create", "get_versioned", "version", "put_if",
                       "put_versioned", "size"):
            if hasattr(store, method):
                setattr(store, method, self._wrap(getattr(store, method)))

    def _wrap(self, call):
        def wrapped(*args, **kw):
            if self._cut.is_set():
                self._healed.wait(60)
                raise ConnectionError("store unreachable")
            return call(*args, **kw)
        return wrapped

    def cut(self):
        self._cut.set()

    def heal(self):
        self._healed.set()


def _stopped(service: JobService, job_id: str) -> bool:
    """The job no longer runs at this replica (the runner forgets a job once it has ended)."""
    done = service.runner.done.get(job_id)
    return done is None or done.is_set()


def test_a_replica_cut_off_from_the_store_stops_its_job_before_another_runs_it(stores):
    store_a = stores()
    _inputs(store_a)
    link = CutOff(store_a)
    runs, slow = Runs(), FakeStages()
    slow.step_delay = 0.05
    a = _replica(store_a, "replica-a", runs, stages=slow, lease_s=3.0)
    b = _replica(stores(), "replica-b", runs, lease_s=3.0)

    async def scenario():
        await asyncio.gather(a.start(), b.start())
        rec = await a.submit(_request(steps=400))
        while not slow.calls.count("diffusion"):
            await asyncio.sleep(0.05)
        link.cut()
        stopped_at = None
        try:
            for _ in range(300):  # until B runs the job (its lease ran out), 15 s at most
                if stopped_at is None and _stopped(a, rec.id):
                    stopped_at = time.monotonic()
                if any(name == "replica-b" for name, _, _ in runs.runs):
                    break
                await asyncio.sleep(0.05)
            done = await b.wait(rec.id, timeout=30)
        finally:
            link.heal()
        await asyncio.gather(a.stop(), b.stop())
        return rec.id, stopped_at, done

    job_id, a_stopped_at, done = asyncio.run(scenario())
    b_started = [t for name, _, t in runs.runs if name == "replica-b"]
    assert b_started, "the other replica never took the job over"
    assert a_stopped_at is not None and a_stopped_at < b_started[0], "the cut-off replica still ran the job"
    assert "diffusion" in slow.cancelled  # it stopped sampling, not only writing
    stored = JobStore(stores()).get(job_id)
    assert done.state == JobState.COMPLETED and stored.owner == "replica-b" and stored.lease == 1


# --- 7. lease I/O on its own threads -------------------------------------------------------


def test_heartbeats_go_on_while_the_default_thread_pool_is_busy(tmp_path):
    """The job's own work fills the default thread pool (as input fetches, decoding and
    encoding do on a loaded replica); the job's heartbeat must not queue behind it."""
    store = LocalStore(tmp_path / "store")
    _inputs(store)
    release = threading.Event()
    beats: list[float] = []

    async def busy_generate(request, stages, progress=None, limits=None, on_chunk=None):
        loop = asyncio.get_running_loop()
        work = [loop.run_in_executor(None, release.wait, 30) for _ in range(2)]  # the pool's 2 threads
        job_id = next(iter(service.runner.records))
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # what other replicas see meanwhile
            beats.append(JobStore(store).get(job_id).heartbeat_at)
            await asyncio.sleep(0.1)
        release.set()
        await asyncio.gather(*work)
        return await fake_generate(request, stages, progress, limits)

    service = JobService(store=store, stages=FakeStages(), generate_fn=busy_generate,
                         # One replica (no fencing: a stall of this loaded machine must not stop the job);
                         # a heartbeat every 0.4 s.
                         settings=ServiceSettings(exclusive=True, lease_s=1.2, persist_interval_s=0.05,
                                                  precheck_inputs=False))

    async def scenario():
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=2))
        rec = await service.submit(_request())
        done = await service.wait(rec.id, timeout=20)
        await service.stop()
        return done

    try:
        done = asyncio.run(scenario())
    finally:
        release.set()
    assert done.state == JobState.COMPLETED
    assert len(set(beats)) >= 3, f"heartbeats stalled behind the busy pool: {sorted(set(beats))}"
