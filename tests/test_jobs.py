"""Job records: persistence, reload, idempotency, orphan detection, schemas."""
from __future__ import annotations

import time

import pytest
from pydantic import ValidationError

from deployments.jobs import JobRecord, JobStore, output_key, valid_job_id
from deployments.runpod import GenerateInput, RunPodRequest
from deployments.schemas import JobRequest, JobState, ProgressInfo, ResultInfo
from deployments.storage import LocalStore
from multitalk.api import InputError


def _req(**kw) -> JobRequest:
    return JobRequest(image="multi1.png", audio=["1.wav"], prompt="two people talk", **kw)


def test_create_persists_and_reloads(tmp_path):
    store = LocalStore(tmp_path)
    jobs = JobStore(store)
    rec, created = jobs.create(_req())
    assert created and valid_job_id(rec.id) and rec.state == JobState.IN_QUEUE
    assert store.exists(f"jobs/{rec.id}.json")

    rec.state = JobState.IN_PROGRESS
    rec.progress = ProgressInfo(stage="diffusion", step=3, total_steps=40, chunk=0, total_chunks=2)
    rec.timings["audio"] = 1.5
    rec.result = ResultInfo(key=output_key(rec.id), store="local", frames=81, duration=3.24)
    jobs.save(rec)

    again = JobStore(LocalStore(tmp_path)).get(rec.id)  # a fresh store: as after a restart
    assert again is not None
    assert again.state == JobState.IN_PROGRESS
    assert again.progress.step == 3 and again.progress.total_chunks == 2
    assert again.timings == {"audio": 1.5}
    assert again.request.audio == ["1.wav"] and again.request.sampling.steps == 40
    assert again.result.key == f"outputs/{rec.id}.mp4"
    assert again.updated_at >= again.created_at
    status = again.status()
    assert status.id == rec.id and status.state == JobState.IN_PROGRESS


def test_job_record_holds_references_not_bytes(tmp_path):
    store = LocalStore(tmp_path)
    rec, _ = JobStore(store).create(_req())
    raw = store.get(f"jobs/{rec.id}.json").decode()
    assert "multi1.png" in raw and len(raw) < 4000


def test_idempotency_key(tmp_path):
    jobs = JobStore(LocalStore(tmp_path))
    a, created_a = jobs.create(_req(), idempotency_key="retry-1")
    b, created_b = JobStore(LocalStore(tmp_path)).create(_req(), idempotency_key="retry-1")
    assert created_a and not created_b and a.id == b.id
    c, created_c = jobs.create(_req(), idempotency_key="retry-2")
    assert created_c and c.id != a.id
    with pytest.raises(InputError) as e:
        jobs.create(_req(frames=41), idempotency_key="retry-1")
    assert e.value.status == 409 and e.value.field == "Idempotency-Key"
    # Mappings do not show up as jobs.
    assert sorted(jobs.list_ids()) == sorted([a.id, c.id])


def test_load_all_and_orphans(tmp_path):
    jobs = JobStore(LocalStore(tmp_path))
    done, _ = jobs.create(_req())
    done.state = JobState.COMPLETED
    jobs.save(done)
    stale, _ = jobs.create(_req())
    stale.state, stale.owner, stale.heartbeat_at = JobState.IN_PROGRESS, "dead-replica", time.time() - 600
    jobs.save(stale)
    fresh, _ = jobs.create(_req())
    fresh.state, fresh.owner, fresh.heartbeat_at = JobState.IN_PROGRESS, "live-replica", time.time()
    jobs.save(fresh)
    mine, _ = jobs.create(_req())
    mine.owner = "me"
    jobs.save(mine)

    assert [r.id for r in jobs.load_all()] == [done.id, stale.id, fresh.id, mine.id]
    assert {r.id for r in jobs.orphans(lease_s=60, owner="me")} == {stale.id}
    # lease 0 (single ingress replica restarting): every unfinished job but our own.
    assert {r.id for r in jobs.orphans(lease_s=0, owner="me")} == {stale.id, fresh.id}
    # Recovery reads only the unfinished jobs' index, which finished jobs leave.
    assert sorted(jobs.store.list("jobs/active/")) == sorted(f"jobs/active/{r.id}" for r in (stale, fresh, mine))
    stale.state = JobState.FAILED
    jobs.save(stale)
    assert f"jobs/active/{stale.id}" not in jobs.store.list("jobs/active/")
    assert {r.id for r in jobs.orphans(lease_s=0, owner="me")} == {fresh.id}


def test_a_finished_job_with_its_webhook_undelivered_stays_unfinished_work(tmp_path):
    from deployments.webhooks import WebhookInfo

    jobs = JobStore(LocalStore(tmp_path))
    rec, _ = jobs.create(_req(webhook="https://hooks.example.com/x"))
    rec.state, rec.owner, rec.heartbeat_at = JobState.COMPLETED, "dead-replica", time.time() - 600
    rec.webhook = WebhookInfo(url="https://hooks.example.com/x", attempts=2, status_code=500)
    jobs.save(rec)
    assert rec.webhook_pending and [r.id for r in jobs.orphans(lease_s=60, owner="me")] == [rec.id]
    rec.heartbeat_at = time.time()  # its owner is still delivering
    jobs.save(rec)
    assert jobs.orphans(lease_s=60, owner="me") == []
    rec.webhook.ended_at = time.time()  # delivered, refused or out of attempts
    jobs.save(rec)
    assert not rec.webhook_pending and jobs.orphans(lease_s=0, owner="me") == []
    assert jobs.store.list("jobs/active/") == []


def test_cancel_marker(tmp_path):
    jobs = JobStore(LocalStore(tmp_path))
    rec, _ = jobs.create(_req())
    assert not jobs.cancel_requested(rec.id)
    jobs.request_cancel(rec.id)
    assert jobs.cancel_requested(rec.id)
    assert jobs.list_ids() == [rec.id]


def test_get_rejects_bad_ids(tmp_path):
    jobs = JobStore(LocalStore(tmp_path))
    for bad in ("../x", "nope", "", "jobs/idempotency/x"):
        assert jobs.get(bad) is None


def test_job_request_validation():
    with pytest.raises(ValidationError):
        JobRequest(image="a.png", audio=[])
    with pytest.raises(ValidationError):
        JobRequest(image="a.png", audio=["1", "2", "3", "4", "5"])  # at most four speakers
    with pytest.raises(ValidationError):
        _req(frames=80)
    with pytest.raises(ValidationError):
        JobRequest(image="a.png", audio=["1.wav", "2.wav"], bbox=[[0, 0, 10, 10]])
    with pytest.raises(ValidationError):
        _req(output={"format": "local", "key": "../x.mp4"})
    with pytest.raises(ValidationError):
        _req(sampling={"steps": 0})
    ok = JobRequest(image="a.png", audio=["1.wav", "2.wav"], bbox=[[0, 0, 10, 10], [0, 10, 10, 20]],
                    audio_type="para", sampling={"steps": 8, "seed": 1})
    gen = ok.to_generation_request(b"img", [b"a", b"b"])
    assert gen.audio == [b"a", b"b"] and gen.sampling.steps == 8 and gen.sampling.seed == 1
    assert gen.audio_type == "para" and gen.bbox[1] == [0, 10, 10, 20]


def test_runpod_request_models():
    r = RunPodRequest.model_validate(
        {"input": {"action": "generate", "audio_1": "1.wav", "condition_image": "multi1.png", "output_format": "s3"}}
    )
    assert isinstance(r.input, GenerateInput)
    job = r.input.to_job_request()
    assert job.image == "multi1.png" and job.audio == ["1.wav"] and job.output.format == "s3"
    two = RunPodRequest.model_validate(
        {"input": {"audio_1": "1.wav", "audio_2": "2.wav", "condition_image": "m.png", "sample_steps": 4}}
    )
    assert two.input.to_job_request().audio == ["1.wav", "2.wav"]
    assert two.input.to_job_request().sampling.steps == 4
    four = {f"audio_{i}": f"{i}.wav" for i in (1, 2, 3, 4)}
    job = RunPodRequest.model_validate({"input": {**four, "condition_image": "m.png", "speaker_order": [2, 1, 3, 4]}})
    assert job.input.to_job_request().audio == ["1.wav", "2.wav", "3.wav", "4.wav"]
    assert job.input.to_job_request().speaker_order == [2, 1, 3, 4]
    with pytest.raises(InputError) as e:  # speakers numbered without a gap
        RunPodRequest.model_validate({"input": {"audio_1": "1.wav", "audio_3": "3.wav", "condition_image": "m.png"}}
                                     ).input.to_job_request()
    assert e.value.field == "audio_3"
    assert RunPodRequest.model_validate({"input": {"action": "model_check"}}).input.action == "model_check"
    with pytest.raises(ValidationError):
        RunPodRequest.model_validate({"input": {"action": "explode"}})


def test_record_roundtrip_json():
    rec = JobRecord(id="00000000-0000-4000-8000-000000000000", created_at=1.0, updated_at=1.0, request=_req())
    assert JobRecord.model_validate_json(rec.model_dump_json()) == rec


class CountingStore(LocalStore):
    """Counts record reads, to show that a page costs a page of reads."""

    def __init__(self, root):
        super().__init__(root)
        self.record_reads = 0

    def get(self, key):
        if key.startswith("jobs/") and key.endswith(".json"):
            self.record_reads += 1
        return super().get(key)


def test_recent_pages_newest_first_reading_one_page_of_records(tmp_path):
    store = CountingStore(tmp_path)
    jobs = JobStore(store)
    made = []
    for i in range(25):
        rec, _ = jobs.create(_req(), tenant="acme" if i % 5 == 0 else None)
        made.append(rec.id)
        time.sleep(0.002)  # distinct creation stamps
    newest_first = made[::-1]
    store.record_reads = 0
    page, cursor = jobs.recent(limit=10)
    assert [r.id for r in page] == newest_first[:10] and cursor is not None
    assert store.record_reads == 10  # not 25
    page2, cursor2 = jobs.recent(limit=10, after=cursor)
    page3, cursor3 = jobs.recent(limit=10, after=cursor2)
    assert [r.id for r in page2 + page3] == newest_first[10:]
    assert cursor3 is None
    # A tenant's scope holds only its own jobs; the open scope holds them all.
    acme, _ = jobs.recent(tenant="acme", limit=50)
    assert [r.id for r in acme] == [j for j in newest_first if newest_first.index(j) % 5 == 4]
    assert jobs.recent(tenant="nobody")[0] == []
    with pytest.raises(InputError) as e:
        jobs.recent(after="../../etc")
    assert e.value.field == "after" and e.value.status == 400


def test_an_idempotency_key_reserved_by_a_creator_that_died_is_taken_over(tmp_path):
    """A replica reserved the key, then died before writing the job: after the wait, a retry
    with the same key and body makes the job (once), instead of waiting forever."""
    import json

    store = LocalStore(tmp_path)
    jobs = JobStore(store, idempotency_wait_s=0.1)
    fingerprint = jobs._fingerprint(_req(), "generate")
    dead = {"key": "k", "job_id": "00000000-0000-4000-8000-000000000000", "fingerprint": fingerprint}
    assert store.put_if(jobs._idem_key("k"), json.dumps(dead).encode(), if_version=None) is not None
    rec, created = jobs.create(_req(), idempotency_key="k")
    again, created_again = jobs.create(_req(), idempotency_key="k")
    assert created and not created_again and again.id == rec.id != dead["job_id"]
    assert jobs.list_ids() == [rec.id]


def test_conditional_record_writes(tmp_path):
    from deployments.jobs import RecordConflict

    jobs = JobStore(LocalStore(tmp_path))
    rec, _ = jobs.create(_req())
    stale = jobs.get(rec.id)
    rec.state = JobState.IN_PROGRESS
    jobs.save(rec)  # based on the version it was created at
    stale.state = JobState.FAILED
    with pytest.raises(RecordConflict) as e:
        jobs.save(stale)  # based on a version another write replaced
    assert e.value.stored.state == JobState.IN_PROGRESS and jobs.get(rec.id).state == JobState.IN_PROGRESS
    assert not jobs.changed(rec) and jobs.changed(stale)
