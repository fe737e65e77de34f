"""Several ingress replicas over one store: an orphaned job is taken over by exactly one.

The claim is a conditional write of the job's record (local: a generation number; S3: a
conditional write against a real moto server over HTTP); ``jobs/claims/{id}/{n}`` (a
put-if-absent) records who took it. A replica that was only slow, not dead, sees the new
owner at its next heartbeat and stops without writing the record again; a replica the
cluster no longer runs loses its jobs at once. That a queued job keeps its lease is
``tests/test_replica_races.py``'s (both store kinds).
"""
from __future__ import annotations

import asyncio
import threading
import time

import pytest

from deployments.jobs import JobStore
from deployments.schemas import JobRequest, JobState
from deployments.service import JobService, ServiceSettings
from deployments.storage import LocalStore

from fakes import FakeStages, fake_generate, make_bucket


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "store")
    from deployments.storage import S3Store

    endpoint = request.getfixturevalue("moto_endpoint")
    bucket = f"takeover-{time.monotonic_ns()}"
    make_bucket(endpoint, bucket)
    return S3Store(bucket, endpoint_url=endpoint, region="eu-west-1")


def test_create_is_put_if_absent_and_one_racer_wins(store):
    assert store.create("jobs/claims/x/1", b"first") is True
    assert store.create("jobs/claims/x/1", b"second") is False
    assert store.get("jobs/claims/x/1") == b"first"
    wins = []

    def race(i):
        wins.append(store.create("jobs/claims/y/1", str(i).encode()))

    threads = [threading.Thread(target=race, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(wins) == [False] * 7 + [True]
    assert store.list("jobs/claims/y/") == ["jobs/claims/y/1"]  # no temporary files left behind


def _orphan(store) -> str:
    """A job whose owner died a while ago (stale heartbeat)."""
    jobs = JobStore(store)
    for name, data in {"1.wav": b"RIFFone", "multi1.png": b"\x89PNG"}.items():
        store.put(name, data)
    rec, _ = jobs.create(JobRequest(image="multi1.png", audio=["1.wav"], prompt="p"))
    rec.state, rec.owner, rec.heartbeat_at = JobState.IN_PROGRESS, "dead-replica", time.time() - 600
    jobs.save(rec)
    return rec.id


class CountingGenerate:
    def __init__(self):
        self.runs: list[str] = []

    def __call__(self, name):
        async def generate(request, stages, progress=None, limits=None, on_chunk=None):
            self.runs.append(name)
            return await fake_generate(request, stages, progress, limits)
        return generate


def _replica(store, name, counter, stages=None, **settings):
    # lease_s well above any stall of a loaded test machine: a live owner must never look dead here.
    settings = {"exclusive": False, "lease_s": 10.0, "persist_interval_s": 0.05, "replica_id": name,
                "precheck_inputs": False, **settings}
    return JobService(store=store, stages=stages or FakeStages(), settings=ServiceSettings(**settings),
                      generate_fn=counter(name))


def test_two_replicas_recovering_at_once_run_an_orphan_once(store):
    job_id = _orphan(store)
    counter = CountingGenerate()
    a, b = _replica(store, "replica-a", counter), _replica(store, "replica-b", counter)

    async def scenario():
        await asyncio.gather(a.start(), b.start())  # both find the orphan in their first sweep
        for _ in range(3):  # later sweeps: the job is owned and fresh, or finished
            await asyncio.gather(a.recover(10.0), b.recover(10.0))
        owner = a if job_id in a.runner.tasks or job_id in a.runner.records else b
        rec = await owner.wait(job_id, timeout=20)
        await asyncio.gather(a.stop(), b.stop())
        return rec

    rec = asyncio.run(scenario())
    assert rec.state == JobState.COMPLETED
    assert len(counter.runs) == 1, counter.runs
    stored = JobStore(store).get(job_id)
    assert stored.state == JobState.COMPLETED and stored.lease == 1 and stored.owner == counter.runs[0]


def test_a_slow_owner_stops_when_another_replica_takes_its_job_over(store):
    for name, data in {"1.wav": b"RIFFone", "multi1.png": b"\x89PNG"}.items():
        store.put(name, data)
    counter = CountingGenerate()
    slow = FakeStages()
    slow.step_delay = 0.2
    a = _replica(store, "replica-a", counter, stages=slow, lease_s=0.6)
    b = _replica(store, "replica-b", counter)

    async def scenario():
        rec = await a.submit(JobRequest(image="multi1.png", audio=["1.wav"], prompt="p",
                                        sampling={"steps": 40}))
        await asyncio.sleep(0.5)  # a is sampling
        assert JobStore(store).get(rec.id).state == JobState.IN_PROGRESS
        await b.start()
        # As if a's heartbeat had gone stale: b claims the job. The claim is a conditional write,
        # and a's heartbeat (every 0.1 s here) may land between b's read and b's write, which
        # then loses: b sweeps again, as its sweeper would.
        for _ in range(20):
            await b.recover(0.0)
            if rec.id in b.runner.tasks:
                break
        assert rec.id in b.runner.tasks
        done_b = await b.wait(rec.id, timeout=20)
        for _ in range(50):  # a notices at its next heartbeat and lets go
            if rec.id not in a.runner.tasks:
                break
            await asyncio.sleep(0.1)
        stopped = rec.id not in a.runner.tasks
        await asyncio.gather(a.stop(), b.stop())
        return rec.id, done_b, stopped

    job_id, done_b, a_stopped = asyncio.run(scenario())
    assert a_stopped, "the superseded replica kept running the job"
    assert "diffusion" in slow.cancelled  # a's sampling was stopped, not left to finish
    assert done_b.state == JobState.COMPLETED
    stored = JobStore(store).get(job_id)
    # a wrote nothing after b took over: the record is b's finished one.
    assert stored.state == JobState.COMPLETED and stored.owner == "replica-b" and stored.lease == 1
    assert counter.runs == ["replica-a", "replica-b"]


def test_a_job_whose_owner_the_cluster_no_longer_runs_is_taken_over_at_once(tmp_path):
    """The owner's heartbeat is fresh (its process still runs: a killed raylet left it alive,
    or its node is cut off), but Serve no longer counts it among the ingress replicas: the
    job is claimed at once instead of never (the OBSERVED drill's four running jobs)."""
    store = LocalStore(tmp_path / "store")
    jobs = JobStore(store)
    for name, data in {"1.wav": b"RIFFone", "multi1.png": b"\x89PNG"}.items():
        store.put(name, data)
    rec, _ = jobs.create(JobRequest(image="multi1.png", audio=["1.wav"], prompt="p"))
    rec.state, rec.owner, rec.heartbeat_at = JobState.IN_PROGRESS, "replica-a", time.time()
    jobs.save(rec)
    live = {"replica-a", "replica-b"}
    counter = CountingGenerate()
    b = JobService(store=store, stages=FakeStages(), generate_fn=counter("replica-b"), live_replicas=lambda: set(live),
                   settings=ServiceSettings(exclusive=False, lease_s=60.0, persist_interval_s=0.05,
                                            replica_id="replica-b", precheck_inputs=False))

    async def scenario():
        await b.recover(60.0)  # a is alive and beating: nothing to take
        kept = rec.id not in b.runner.tasks
        live.discard("replica-a")  # a's node was declared dead; Serve replaced it
        await b.recover(60.0)
        done = await b.wait(rec.id, timeout=20)
        await b.stop()
        return kept, done

    kept, done = asyncio.run(scenario())
    assert kept and done.state == JobState.COMPLETED and counter.runs == ["replica-b"]
    stored = jobs.get(rec.id)
    assert stored.owner == "replica-b" and stored.lease == 1
