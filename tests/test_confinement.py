"""Hardening, storage confinement: references and output keys cannot climb out, SSRF URLs
are refused without a network call, bucket/prefix rules, job records are not inputs.
"""
from __future__ import annotations

import socket

import pytest
from fakes import FakeStages, wait_state
from inputs import app, body, err  # noqa: F401 - app: a fixture

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


def test_s3_bucket_prefix_rules(tmp_path):
    from multitalk.api import InputError
    from deployments.storage import S3Store

    store = S3Store("own", prefix="svc", client=object())
    service = JobService(store=store, stages=FakeStages(), local_store=LocalStore(tmp_path),
                         settings=ServiceSettings(allowed_buckets=("ext/public/", "whole")))
    assert service.admission.allowed_for("s3://ext/public/a.wav", "audio_1", None) == ("ext",)
    assert service.admission.allowed_for("s3://ext/private/a.wav", "audio_1", None) == ()
    assert service.admission.allowed_for("s3://whole/any/a.wav", "audio_1", None) == ("whole",)
    for ref in ("s3://own/other-deployment/a.wav", "s3://own/svc/jobs/x.json", "s3://own/svc/outputs/b/x.mp4"):
        with pytest.raises(InputError) as e:
            service.admission.allowed_for(ref, "audio_1", "a")
        assert e.value.status == 403
    assert service.admission.allowed_for("s3://own/svc/inputs/a.wav", "audio_1", "a") == ()


def test_job_records_are_not_inputs(app):
    client, service, store = app
    job_id = client.post("/v1/jobs", json=body()).json()["id"]
    wait_state(client, job_id)
    err(client.post("/v1/jobs", json=body(audio=[f"jobs/{job_id}.json"])), 403, "audio[0]")
