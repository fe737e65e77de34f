"""Hardening, overload: nothing lost or duplicated under load with 429s, and the
per-tenant queue limit.
"""
from __future__ import annotations

import concurrent.futures as cf
import threading
import time

from fakes import FakeStages, wait_state
from inputs import A, G, KEYS, body, make

from deployments.auth import KeyRing
from deployments.jobs import JobStore


# --- 5. overload: nothing lost or duplicated ---------------------------------------------


def test_load_nothing_lost_or_duplicated(tmp_path):
    stages = FakeStages()
    stages.step_delay = 0.002
    client, service, store = make(tmp_path, stages=stages, precheck_inputs=False, max_queued_jobs=8,
                                  retry_after_s=1, max_concurrent_jobs=4)
    n, concurrency = 100, 10
    rejected, ids = [], []
    lock = threading.Lock()

    def one(i):
        key = f"load-{i}"
        while True:
            r = client.post("/v1/jobs", json=body(prompt=f"job {i}"), headers={"Idempotency-Key": key})
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                with lock:
                    rejected.append(i)
                time.sleep(0.05)  # a real client waits Retry-After seconds
                continue
            assert r.status_code == 202, r.text
            with lock:
                ids.append(r.json()["id"])
            return

    with client:
        with cf.ThreadPoolExecutor(concurrency) as pool:
            list(pool.map(one, range(n)))
        finals = [wait_state(client, j, timeout=60) for j in ids]
    assert len(ids) == n and len(set(ids)) == n  # none lost, none duplicated
    assert all(f["state"] == "COMPLETED" for f in finals)
    assert rejected, "expected some 429 answers under this load"
    assert len(JobStore(store).list_ids()) == n and not store.list("jobs/active/")
    prompts = sorted(f["request"]["prompt"] for f in finals)
    assert prompts == sorted(f"job {i}" for i in range(n))


def test_per_tenant_queue_limit(tmp_path):
    """One busy tenant cannot fill the replica's queue: beyond its own limit it gets 429
    with Retry-After, naming the tenant, while another tenant still gets in."""
    stages = FakeStages()
    stages.step_delay = 0.3  # jobs stay unfinished while we submit
    client, service, _ = make(tmp_path, stages=stages, keyring=KeyRing(KEYS), max_queued_jobs_per_tenant=2,
                              max_queued_jobs=10, retry_after_s=7)
    with client:
        for _ in range(2):
            assert client.post("/v1/jobs", json=body(sampling={"steps": 20}), headers=A).status_code == 202
        r = client.post("/v1/jobs", json=body(), headers=A)
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert "acme" in r.json()["error"]["message"] and "limit" in r.json()["error"]["message"]
        assert client.post("/v1/jobs", json=body(), headers=G).status_code == 202  # others are not blocked
        for job_id in list(service.runner.tasks):
            client.delete(f"/v1/jobs/{job_id}", headers=A if service.runner.records[job_id].tenant == "acme" else G)
