"""Hardening, storage confinement: references and output keys cannot climb out, SSRF URLs
are refused without a network call, bucket/prefix rules, job records are not inputs.
"""
from __future__ import annotations

import socket

import pytest
from fakes import FakeStages, wait_state
from inputs import app, body, err, face, png, tone, wav  # noqa: F401 - app: a fixture

from deployments.service import JobService, ServiceSettings
from deployments.storage import LocalStore


# --- 2. storage safety / SSRF ------------------------------------------------------------


@pytest.mark.parametrize("ref", ["../../etc/passwd", "/etc/passwd", "%2e%2e/1.wav", "..%2f1.wav", "a\\..\\1.wav",
                                 "a\x00.wav", "C:/x.wav", "~/x.wav", "inputs/../../x.wav", "./1.wav"])
def test_references_cannot_climb_out(app, ref):
    client, *_ = app
    err(client.post("/v1/jobs", json=body(audio=[ref])), 422, "audio[0]")
    err(client.post("/run", json={"input": {"action": "generate", "audio_1": "1.wav", "condition_image": ref}}),
        422, "condition_image")


@pytest.mark.parametrize("key", ["../x", "/abs/x", "%2e%2e/x", "a\\b", "a/../../b"])
def test_output_key_cannot_climb_out(app, key):
    client, *_ = app
    err(client.post("/v1/jobs", json=body(output={"key": key})), 422, "output.key")


@pytest.mark.parametrize("ref", ["http://169.254.169.254/latest/meta-data/iam/security-credentials/",
                                 "https://example.com/a.wav", "file:///etc/passwd", "ftp://h/x", "gopher://h/x"])
def test_ssrf_urls_refused_without_network(app, monkeypatch, ref):
    client, *_ = app
    calls = []

    def no_network(*a, **k):
        calls.append(a)
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    err(client.post("/v1/jobs", json=body(image=ref)), 422, "image", "not accepted")
    err(client.post("/v1/jobs", json=body(audio=[ref])), 422, "audio[0]", "not accepted")
    err(client.post("/run", json={"input": {"action": "generate", "audio_1": ref, "condition_image": "face.png"}}),
        422, "audio_1")
    assert calls == []


def test_s3_buckets_not_configured_refused(app):
    client, *_ = app
    err(client.post("/v1/jobs", json=body(audio=["s3://someone-elses-bucket/a.wav"])), 403, "audio[0]", "bucket")


# --- one confinement check, at submit and when the job runs ----------------------------


@pytest.fixture
def s3_confined(moto_endpoint, tmp_path):
    """An S3 store (bucket ``own``, prefix ``svc``) over a moto server, a second bucket
    ``ext`` with inputs under ``public/``, ``publicity/`` and ``private/``, and a factory of
    services over them."""
    import itertools

    from fakes import make_bucket, fake_generate

    from deployments.storage import S3Store

    n = next(_buckets)
    own, ext = f"own-{n}", f"ext-{n}"
    make_bucket(moto_endpoint, own)
    make_bucket(moto_endpoint, ext)
    store = S3Store(own, endpoint_url=moto_endpoint, prefix="svc")
    media = {"1.wav": wav(tone(1.0)), "face.png": png(face())}
    for folder in ("public", "publicity", "private"):
        for name, data in media.items():
            store.client.put_object(Bucket=ext, Key=f"{folder}/{name}", Body=data)
    store.client.put_object(Bucket=own, Key="other/1.wav", Body=media["1.wav"])
    counter = itertools.count()

    def service(**settings):
        settings = {"persist_interval_s": 0.05, "models_root": str(tmp_path), "exclusive": True,
                    "replica_id": f"r{next(counter)}", **settings}
        return JobService(store=store, stages=FakeStages(), local_store=LocalStore(tmp_path / "local"),
                          settings=ServiceSettings(**settings), generate_fn=fake_generate)

    return own, ext, service


_buckets = iter(range(10**6))


@pytest.mark.parametrize("precheck", [True, False], ids=["precheck", "no-precheck"])
def test_a_bucket_prefix_allow_list_entry_holds_at_submit_and_at_run_time(s3_confined, precheck):
    """``allowed_buckets: [ext/public]`` admits ``s3://ext/public/...`` at submit, with or
    without the media precheck, and the job then reads it (the run-time check is the
    submit-time check); ``publicity/`` (not the folder ``public/``), another prefix of the
    same bucket and the store's own bucket outside its prefix stay refused."""
    import asyncio

    from multitalk.api import InputError

    own, ext, make = s3_confined
    service = make(allowed_buckets=(f"{ext}/public",), precheck_inputs=precheck)
    job = {"image": f"s3://{ext}/public/face.png", "audio": [f"s3://{ext}/public/1.wav"], "frames": 9,
           "sampling": {"steps": 2}}

    async def scenario():
        rec = await service.submit(job)
        done = await service.wait(rec.id, timeout=20)
        refused = {}
        for ref in (f"s3://{ext}/publicity/1.wav", f"s3://{ext}/private/1.wav", f"s3://{own}/other/1.wav"):
            try:
                await service.submit({**job, "audio": [ref]})
            except InputError as e:
                refused[ref] = (e.status, e.field, e.message)
        await service.stop()
        return done, refused

    done, refused = asyncio.run(scenario())
    assert done.state.value == "COMPLETED", done.error
    assert len(refused) == 3 and all(status == 403 and field == "audio[0]" for status, field, _ in refused.values()), refused
    assert "outside the prefixes" in refused[f"s3://{ext}/publicity/1.wav"][2]
    assert "outside this service's prefix" in refused[f"s3://{own}/other/1.wav"][2]


@pytest.mark.parametrize("ref", ["outputs/b/secret.mp4", "inputs/uploads/b/x.wav", "jobs/{other}.json"])
def test_a_job_reads_only_what_its_tenant_may_when_it_runs(tmp_path, ref):
    """A record accepted under an earlier policy (or written by hand) names another tenant's
    output or a job record: the run-time check, the same as at submit, fails the job 403
    naming the field instead of reading it."""
    import asyncio

    from fakes import fake_generate

    from deployments.jobs import JobStore
    from deployments.schemas import JobRequest

    store = LocalStore(tmp_path / "store")
    for key in ("face.png", "1.wav", "outputs/b/secret.mp4", "inputs/uploads/b/x.wav"):
        store.put(key, b"bytes")
    jobs = JobStore(store)
    other, _ = jobs.create(JobRequest(image="face.png", audio=["1.wav"]), tenant="b")
    rec, _ = jobs.create(JobRequest(image="face.png", audio=[ref.format(other=other.id)]), tenant="a")
    service = JobService(store=store, stages=FakeStages(), generate_fn=fake_generate,
                         settings=ServiceSettings(persist_interval_s=0.05, precheck_inputs=False,
                                                  models_root=str(tmp_path)))

    async def scenario():
        await service.start()  # an exclusive start runs every unfinished job of the store
        done = await service.wait(rec.id, timeout=20)
        await service.stop()
        return done

    done = asyncio.run(scenario())
    assert done.state.value == "FAILED" and done.error.status == 403 and done.error.field == "audio[0]", done


def test_job_records_are_not_inputs(app):
    client, service, store = app
    job_id = client.post("/v1/jobs", json=body()).json()["id"]
    wait_state(client, job_id)
    err(client.post("/v1/jobs", json=body(audio=[f"jobs/{job_id}.json"])), 403, "audio[0]")
