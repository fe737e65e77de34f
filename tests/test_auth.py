"""Hardening, API keys and tenants: hashed keys compared in constant time, 401/403,
per-tenant jobs and outputs, handle calls as a tenant, key-file rotation without restart.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time

import pytest
from fakes import VIDEO, wait_state
from inputs import A, G, KEYS, body, err, make, upload

from deployments.auth import KeyRing, parse_keys
from deployments.jobs import JobStore
from deployments.schemas import JobState


# --- 3. auth and tenants -----------------------------------------------------------------


@pytest.fixture
def authed(tmp_path):
    client, service, store = make(tmp_path, keyring=KeyRing(KEYS))
    with client:
        yield client, service, store


def test_keys_parsed_and_hashed():
    ring = KeyRing(KEYS)
    assert ring.tenants() == {"acme", "globex"}
    assert all(len(d) == 32 for _, d in ring.entries)
    assert b"key-acme-1" not in repr(ring.entries).encode()
    assert ring.authenticate("key-acme-1") == "acme" and ring.authenticate("key-acme-") is None
    assert ring.authenticate(None) is None and ring.authenticate("") is None
    hashed = "ops:sha256:" + hashlib.sha256(b"s3cret").hexdigest()
    assert KeyRing(hashed).authenticate("s3cret") == "ops"
    for bad in ("nokey", "acme:", "bad tenant:k", "../x:k"):
        with pytest.raises(ValueError):
            parse_keys(bad)


def test_key_comparison_uses_compare_digest(monkeypatch):
    import hmac as hmac_mod

    seen = []
    real = hmac_mod.compare_digest
    monkeypatch.setattr("deployments.auth.hmac.compare_digest", lambda a, b: seen.append(1) or real(a, b))
    assert KeyRing(KEYS).authenticate("key-globex") == "globex"
    assert len(seen) == 2  # every stored key is compared, whichever matches


def test_401_without_or_with_wrong_key(authed):
    client, *_ = authed
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic a2V5LWFjbWUtMQ=="},
                    {"Authorization": "key-acme-1"}):
        for method, path in (("get", "/v1/jobs"), ("post", "/v1/jobs"), ("get", "/v1/models"), ("post", "/run"),
                             ("get", "/status/x"), ("get", "/openapi.json"), ("get", "/docs"),
                             ("delete", "/v1/jobs/x"), ("get", "/v1/jobs/x/video")):
            r = getattr(client, method)(path, headers=headers)
            e = err(r, 401, "Authorization")
            assert r.headers["www-authenticate"] == "Bearer", (path, e)
    assert client.get("/healthz").status_code == 200  # open for probes
    assert client.get("/").status_code != 401  # the static web page (if present)


def test_tenants_isolated(authed):
    client, service, store = authed
    r = client.post("/v1/jobs", json=body(), headers=A)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    done = wait_state(_Auth(client, A), job_id)
    assert done["state"] == "COMPLETED"
    assert done["result"]["key"] == f"outputs/acme/{job_id}.mp4"
    assert store.get(f"outputs/acme/{job_id}.mp4") == VIDEO
    assert JobStore(store).get(job_id).tenant == "acme"
    # The owner sees it; the other tenant gets 403 on every route.
    assert client.get(f"/v1/jobs/{job_id}/video", headers=A).content == VIDEO
    for method, path in (("get", f"/v1/jobs/{job_id}"), ("get", f"/v1/jobs/{job_id}/video"),
                         ("delete", f"/v1/jobs/{job_id}"), ("get", f"/status/{job_id}"),
                         ("post", f"/cancel/{job_id}")):
        err(getattr(client, method)(path, headers=G), 403, "id")
    assert [j["id"] for j in client.get("/v1/jobs", headers=A).json()["jobs"]] == [job_id]
    assert client.get("/v1/jobs", headers=G).json()["jobs"] == []
    # Another tenant cannot read acme's output as an input either.
    err(client.post("/v1/jobs", json=body(audio=[f"outputs/acme/{job_id}.mp4"]), headers=G), 403, "audio[0]")
    # Idempotency keys are per tenant: the same key from globex is a new job.
    a = client.post("/v1/jobs", json=body(), headers={**A, "Idempotency-Key": "k1"}).json()["id"]
    g = client.post("/v1/jobs", json=body(), headers={**G, "Idempotency-Key": "k1"}).json()["id"]
    assert a != g
    # Uploads land in the tenant's own folder; a custom output key stays under the tenant's prefix.
    r = upload(client, options={"frames": 9, "output": {"key": "mine/clip"}}, headers=G)
    st = wait_state(_Auth(client, G), r.json()["id"])
    assert st["request"]["image"].startswith("inputs/uploads/globex/")
    assert st["result"]["key"] == "outputs/globex/mine/clip.mp4"
    # RunPod routes carry the tenant too.
    r = client.post("/runsync", json={"input": {"action": "generate", "audio_1": "1.wav",
                                                "condition_image": "face.png", "frames": 5}}, headers=G)
    assert r.json()["status"] == "COMPLETED" and r.json()["output"]["video_key"].startswith("outputs/globex/")


def test_handle_calls_take_a_tenant(tmp_path):
    from multitalk.api import InputError
    from deployments.ingress import MultiTalkIngress
    from deployments.schemas import JobRequest

    client, service, store = make(tmp_path)
    ingress = MultiTalkIngress.func_or_class.__new__(MultiTalkIngress.func_or_class)
    ingress.service = service

    async def run():
        st = await ingress.generate(JobRequest.model_validate(body()), tenant="acme", timeout=20)
        assert st.state == JobState.COMPLETED and st.result.key.startswith("outputs/acme/")
        assert (await ingress.status(st.id, tenant="acme")).id == st.id
        with pytest.raises(InputError) as e:
            await ingress.status(st.id, tenant="globex")
        assert e.value.status == 403
        await service.stop()

    asyncio.run(run())


def test_keys_file_rotation_without_restart(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# tenants\nacme:old-key\n")
    ring = KeyRing(keys_file=str(keys), check_interval_s=0)
    client, *_ = make(tmp_path, keyring=ring)
    with client:
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer old-key"}).status_code == 200
        keys.write_text("acme:old-key\nacme:new-key\n")  # 1. add the new key
        os.utime(keys, ns=(time.time_ns() + 10**9,) * 2)
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer new-key"}).status_code == 200
        keys.write_text("acme:sha256:" + hashlib.sha256(b"new-key").hexdigest() + "\n")  # 3. drop the old one
        os.utime(keys, ns=(time.time_ns() + 2 * 10**9,) * 2)
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer old-key"}).status_code == 401
        assert client.get("/v1/jobs", headers={"Authorization": "Bearer new-key"}).status_code == 200


def test_keys_from_env(monkeypatch, tmp_path):
    keys = tmp_path / "k"
    keys.write_text("filetenant:from-file")
    monkeypatch.setenv("MULTITALK_API_KEYS", "envtenant:from-env")
    monkeypatch.setenv("MULTITALK_API_KEYS_FILE", str(keys))
    ring = KeyRing.from_env()
    assert ring.authenticate("from-env") == "envtenant" and ring.authenticate("from-file") == "filetenant"


def test_open_without_keys_logs_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="multitalk.serve"):
        client, *_ = make(tmp_path, keyring=KeyRing.from_env(env={}))
    assert any("no API keys" in r.message for r in caplog.records)
    with client:
        assert client.post("/v1/jobs", json=body()).status_code == 202


class _Auth:
    """A TestClient view that adds auth headers (for wait_state)."""

    def __init__(self, client, headers):
        self.client, self.headers = client, headers

    def get(self, path, **kw):
        return self.client.get(path, headers=self.headers, **kw)
