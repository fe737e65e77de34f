"""Hardening (issue 7): input validation over HTTP, storage confinement / SSRF, API keys and
tenants, faults (S3 retries, stage retries, deadlines, cancel, graceful shutdown), overload.

Fast: FastAPI TestClient on ``create_app(service)`` with the fake stages of test_ingress,
and real media decoded by the library at submit (``precheck_inputs``). One test starts a
real uvicorn server on loopback to show that an oversized body is refused from its
Content-Length before any of it is sent.
"""
from __future__ import annotations

import asyncio
import concurrent.futures as cf
import hashlib
import http.server
import io
import json
import logging
import os
import socket
import threading
import time

import numpy as np
import pytest
import soundfile
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from deployments.auth import BodyLimitMiddleware, KeyRing, parse_keys  # noqa: E402
from deployments.ingress import create_app  # noqa: E402
from deployments.jobs import JobStore  # noqa: E402
from deployments.schemas import JobState  # noqa: E402
from deployments.service import JobService, ServiceSettings, retryable  # noqa: E402
from deployments.storage import LocalStore  # noqa: E402
from test_ingress import VIDEO, FakeStages, fake_generate, wait_state  # noqa: E402

RATE = 16000


# --- media -------------------------------------------------------------------------------


def tone(seconds=2.0, rate=RATE, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.2 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def wav(samples, rate=RATE, fmt="WAV", subtype=None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def png(image: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def face(w=256, h=192, mode="RGB") -> Image.Image:
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(noise).convert(mode)


def bomb_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\0" * (width // 8 + 1) * 16)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# --- app ---------------------------------------------------------------------------------


def make(tmp_path, stages=None, keyring=None, generate_fn=fake_generate, **settings):
    store = LocalStore(tmp_path / "store")
    for name, data in {"1.wav": wav(tone()), "2.wav": wav(tone(2.5)), "face.png": png(face())}.items():
        if not store.exists(name):
            store.put(name, data)
    settings = {"persist_interval_s": 0.05, "precheck_inputs": True, "models_root": str(tmp_path), **settings}
    service = JobService(store=store, stages=stages or FakeStages(), settings=ServiceSettings(**settings),
                         generate_fn=generate_fn)
    return TestClient(create_app(service, keyring=keyring or KeyRing())), service, store


def body(**kw):
    return {"image": "face.png", "audio": ["1.wav"], "prompt": "hi", "frames": 9, "sampling": {"steps": 2}, **kw}


def upload(client, image=None, audio=None, options=None, headers=None):
    files = [("image", ("face.png", png(face()) if image is None else image))]
    for a in (audio if audio is not None else [wav(tone())]):
        files.append(("audio", ("a.wav", a)))
    return client.post("/v1/jobs", files=files, data={"request": json.dumps(options or {"frames": 9})},
                       headers=headers or {})


def err(r, status, field=None, text=None):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    if field is not None:
        assert e["field"] == field, e
    if text is not None:
        assert text in e["message"], e
    return e


# --- 1. input validation -----------------------------------------------------------------


@pytest.fixture
def app(tmp_path):
    client, service, store = make(tmp_path)
    with client:
        yield client, service, store


def test_audio_not_audio(app):
    client, *_ = app
    err(upload(client, audio=[b"this is not audio at all " * 40]), 422, "audio[0]", "not a recognised audio")


def test_audio_empty_and_silent(app):
    client, *_ = app
    err(upload(client, audio=[b""]), 422, "audio[0]", "empty")
    err(upload(client, audio=[wav(np.zeros(2 * RATE, np.float32))]), 422, "audio[0]", "silent")


def test_audio_over_default_cap_413(app):
    client, service, _ = app
    assert service.settings.max_audio_seconds == 300
    e = err(upload(client, audio=[wav(np.zeros(301 * 8000, np.float32), 8000, subtype="PCM_U8")]), 413, "audio[0]")
    assert "limit is 300" in e["message"]


def test_audio_cap_configurable(tmp_path):
    client, *_ = make(tmp_path, max_audio_seconds=1.0)
    with client:
        err(upload(client), 413, "audio[0]", "limit is 1 s")


def test_audio_odd_rates_channels_and_video_container_accepted(app):
    client, *_ = app
    from multitalk.utils.video import write_mp4

    for audio in (wav(tone(2.0, 11025, channels=2), 11025, subtype="PCM_16"),
                  wav(tone(2.0, 44100, channels=6), 44100),
                  wav(tone(2.0, 22050), 22050, fmt="FLAC")):
        r = upload(client, audio=[audio])
        assert r.status_code == 202, r.text
    mp4 = write_mp4(np.zeros((50, 32, 32, 3), np.uint8), tone(2.0))
    r = upload(client, audio=[mp4])
    assert r.status_code == 202, r.text
    assert wait_state(client, r.json()["id"])["state"] == "COMPLETED"


def test_image_bad_files(app):
    client, *_ = app
    err(upload(client, image=b"no image here, just text" * 10), 422, "image", "not a recognised image")
    full = png(face())
    err(upload(client, image=full[: len(full) // 2]), 422, "image", "truncated")
    err(upload(client, image=bomb_png(20000, 20000)), 413, "image", "too many pixels")
    err(upload(client, image=png(face(200, 40))), 422, "image", "at least 64")


def test_image_bomb_below_pil_limit_hits_our_cap(tmp_path):
    client, *_ = make(tmp_path, max_image_pixels=1_000_000)
    with client:
        err(upload(client, image=bomb_png(4000, 4000)), 413, "image", "limit is 1000000")


@pytest.mark.parametrize("mode", ["RGBA", "P", "CMYK", "I;16"])
def test_image_modes_converted(app, mode):
    client, *_ = app
    if mode == "I;16":
        image = Image.fromarray(np.tile(np.linspace(0, 65535, 128).astype(np.uint16), (96, 1)))
    else:
        image = face(128, 96, mode)
    r = upload(client, image=png(image, "TIFF" if mode == "CMYK" else "PNG"))
    assert r.status_code == 202, r.text


def test_bbox_errors(app):
    client, *_ = app
    err(client.post("/v1/jobs", json=body(bbox=[[0, 0, 500, 100]])), 422, "bbox", "outside")
    err(client.post("/v1/jobs", json=body(bbox=[[100, 10, 20, 50]])), 422, "bbox", "r0 < r1")
    err(client.post("/v1/jobs", json=body(bbox=[[0, 0, 50, 50], [0, 60, 50, 120]])), 422, "bbox", "one box per")
    r = client.post("/v1/jobs", json=body(audio=["1.wav", "2.wav"], bbox=[[0, 0, 190, 120], [0, 130, 190, 250]]))
    assert r.status_code == 202, r.text


def test_speakers_prompt_frames(app):
    client, *_ = app
    err(client.post("/v1/jobs", json=body(audio=["1.wav", "2.wav", "1.wav"])), 422, "audio")
    err(client.post("/v1/jobs", json=body(prompt="x" * 2001)), 422, "prompt", "limit is 2000")
    err(client.post("/v1/jobs", json=body(prompt="x" * 4001)), 422, "prompt")
    err(client.post("/v1/jobs", json=body(frames=80)), 422, "frames", "4n+1")
    err(client.post("/v1/jobs", json=body(frames=1)), 422, "frames")
    err(client.post("/v1/jobs", json=body(frames=205)), 422, "frames", "between 5 and 201")
    # Longer clip than the audio: the library's own message, at submit.
    err(client.post("/v1/jobs", json=body(frames=81)), 422, "audio", "send longer audio")


def test_runpod_unknown_action_and_malformed_json(app):
    client, *_ = app
    e = err(client.post("/run", json={"input": {"action": "dance"}}), 422)
    assert "action" in e["field"] or "dance" in e["message"] or "tag" in e["message"], e
    for route in ("/run", "/runsync", "/v1/jobs"):
        err(client.post(route, content=b'{"input": ', headers={"content-type": "application/json"}), 400, "body")
    err(client.post("/run", json=["not", "an", "object"]), 422)
    r = client.post("/v1/jobs", files=[("image", ("f.png", png(face())))], data={"request": "{oops"})
    err(r, 400, "request")


def test_oversized_body_413_from_content_length(tmp_path):
    client, service, store = make(tmp_path, max_body_bytes=10_000)
    with client:
        r = upload(client, audio=[wav(tone(1.0))])  # ~32 kB
        err(r, 413, "body", "larger than 10000")
        assert not store.list("inputs/uploads/")  # nothing was read into the store
        r = client.post("/v1/jobs", json=body(prompt="y" * 20_000))
        err(r, 413, "body")
    assert ServiceSettings().max_body_bytes == 50 * 1024 * 1024


def test_oversized_chunked_body_stops_at_the_cap():
    """No Content-Length: the middleware counts and stops reading past the cap."""
    sent = []

    async def app(scope, receive, send):
        while True:
            msg = await receive()
            if not msg.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"read it all"})

    async def receive():
        sent.append(1)
        return {"type": "http.request", "body": b"x" * 1000, "more_body": len(sent) < 1000}

    out = []

    async def send(msg):
        out.append(msg)

    from deployments.auth import BodyTooLarge

    mw = BodyLimitMiddleware(app, max_bytes=5_000)
    with pytest.raises(BodyTooLarge):
        asyncio.run(mw({"type": "http", "path": "/v1/jobs", "headers": []}, receive, send))
    assert len(sent) == 6  # 6 kB of the 1 MB body were read, then it stopped


def test_oversized_body_refused_before_it_is_sent(tmp_path):
    """Real HTTP on loopback: headers only, Content-Length 10 GB -> 413 at once."""
    uvicorn = pytest.importorskip("uvicorn")
    client, service, _ = make(tmp_path)
    server = uvicorn.Server(uvicorn.Config(client.app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        port = server.servers[0].sockets[0].getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 10000000000\r\n\r\n")
            reply = s.recv(4096).decode()
        assert reply.startswith("HTTP/1.1 413"), reply
    finally:
        server.should_exit = True
        thread.join(timeout=10)


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
    assert service._allowed_for("s3://ext/public/a.wav", "audio_1", None) == ("ext",)
    assert service._allowed_for("s3://ext/private/a.wav", "audio_1", None) == ()
    assert service._allowed_for("s3://whole/any/a.wav", "audio_1", None) == ("whole",)
    for ref in ("s3://own/other-deployment/a.wav", "s3://own/svc/jobs/x.json", "s3://own/svc/outputs/b/x.mp4"):
        with pytest.raises(InputError) as e:
            service._allowed_for(ref, "audio_1", "a")
        assert e.value.status == 403
    assert service._allowed_for("s3://own/svc/inputs/a.wav", "audio_1", "a") == ()


def test_job_records_are_not_inputs(app):
    client, service, store = app
    job_id = client.post("/v1/jobs", json=body()).json()["id"]
    wait_state(client, job_id)
    err(client.post("/v1/jobs", json=body(audio=[f"jobs/{job_id}.json"])), 403, "audio[0]")


# --- 3. auth and tenants -----------------------------------------------------------------


KEYS = "acme:key-acme-1,globex:key-globex"
A = {"Authorization": "Bearer key-acme-1"}
G = {"Authorization": "Bearer key-globex"}


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


# --- 4. faults ---------------------------------------------------------------------------


class _FlakyS3(http.server.BaseHTTPRequestHandler):
    """Minimal S3 endpoint: answers 500 to the first ``fail`` GETs, then the object;
    403 AccessDenied for keys containing 'denied'."""

    fail = 2
    requests: list = []

    def log_message(self, *a):
        pass

    def do_GET(self):
        type(self).requests.append(self.path)
        if "denied" in self.path:
            payload = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            self.send_response(403)
        elif type(self).fail > 0:
            type(self).fail -= 1
            payload = b"<Error><Code>InternalError</Code><Message>try again</Message></Error>"
            self.send_response(500)
        else:
            payload = b"object-bytes"
            self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def flaky_s3(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    _FlakyS3.fail, _FlakyS3.requests = 2, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyS3)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_s3_transient_errors_retried_with_backoff(flaky_s3):
    from deployments.storage import S3Store

    store = S3Store("bucket", endpoint_url=flaky_s3)
    assert store.client.meta.config.retries["mode"] == "standard"
    t0 = time.monotonic()
    assert store.get("inputs/a.wav") == b"object-bytes"
    assert len(_FlakyS3.requests) == 3  # failed twice, then succeeded
    assert time.monotonic() - t0 > 0.0


def test_s3_permanent_error_fails_fast_and_fails_the_job(flaky_s3, tmp_path):
    from botocore.exceptions import ClientError

    from deployments.storage import S3Store

    store = S3Store("bucket", endpoint_url=flaky_s3)
    with pytest.raises(ClientError):
        store.get("inputs/denied.wav")
    assert len(_FlakyS3.requests) == 1  # not retried

    class DeniedStore(LocalStore):
        def get(self, key):
            if key.endswith(".wav"):
                store.get("inputs/denied.wav")
            return super().get(key)

    local = DeniedStore(tmp_path / "s")
    local.put("1.wav", b"x")
    local.put("face.png", b"x")
    service = JobService(store=local, stages=FakeStages(), generate_fn=fake_generate,
                         settings=ServiceSettings(persist_interval_s=0.05))
    client = TestClient(create_app(service, keyring=KeyRing()))
    with client:
        st = wait_state(client, client.post("/v1/jobs", json=body()).json()["id"])
    assert st["state"] == "FAILED" and "AccessDenied" in st["error"]["message"], st


class FlakyStages(FakeStages):
    """Diffusion replica 'dies' on the first ``failures`` calls."""

    def __init__(self, failures=1):
        super().__init__()
        self.failures = failures
        self.cancel_calls = 0

    def cancel(self):
        self.cancel_calls += 1

    def diffusion_sample(self, job, audio, image, text, on_step=None):
        if self.failures > 0:
            self.failures -= 1
            from ray.exceptions import ActorDiedError

            async def die():
                raise ActorDiedError()
            self.calls.append("diffusion-died")
            return asyncio.ensure_future(die())
        return super().diffusion_sample(job, audio, image, text, on_step)


def test_stage_retry_then_success(tmp_path):
    stages = FlakyStages(failures=1)
    client, *_ = make(tmp_path, stages=stages, stage_retry_backoff_s=0.01)
    with client:
        st = wait_state(client, client.post("/v1/jobs", json=body()).json()["id"])
    assert st["state"] == "COMPLETED", st
    assert st["timings"]["stage_retries"] == 1 and stages.calls.count("diffusion-died") == 1


def test_stage_retries_exhausted_fail_with_reason(tmp_path):
    stages = FlakyStages(failures=10)
    client, *_ = make(tmp_path, stages=stages, stage_retry_backoff_s=0.01, max_stage_retries=2)
    with client:
        st = wait_state(client, client.post("/v1/jobs", json=body()).json()["id"])
    assert st["state"] == "FAILED" and "ActorDiedError" in st["error"]["message"], st
    assert stages.calls.count("diffusion-died") == 3  # 1 + 2 retries


def test_retryable_classification():
    from ray.exceptions import ActorDiedError, RayActorError
    from ray.serve.exceptions import BackPressureError

    assert retryable(ActorDiedError()) and retryable(RayActorError())
    wrapped = RuntimeError("x")
    wrapped.__cause__ = ActorDiedError()
    assert retryable(wrapped)
    assert not retryable(RuntimeError("kaboom")) and not retryable(ValueError())
    assert not retryable(BackPressureError(num_queued_requests=1, max_queued_requests=1))


def test_job_deadline(tmp_path):
    stages = FlakyStages(failures=0)
    stages.step_delay = 0.2
    client, service, store = make(tmp_path, stages=stages, job_timeout_s=0.5)
    with client:
        st = wait_state(client, client.post("/v1/jobs", json=body(sampling={"steps": 100})).json()["id"])
    assert st["state"] == "FAILED" and "deadline exceeded" in st["error"]["message"] and st["error"]["status"] == 504
    assert stages.cancelled == ["diffusion"] and stages.cancel_calls >= 1  # the stages were freed


def test_cancel_frees_the_stages(tmp_path):
    stages = FlakyStages(failures=0)
    stages.step_delay = 0.1
    client, *_ = make(tmp_path, stages=stages)
    with client:
        job_id = client.post("/v1/jobs", json=body(sampling={"steps": 100})).json()["id"]
        deadline = time.monotonic() + 10
        while "diffusion" not in stages.calls:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert client.delete(f"/v1/jobs/{job_id}").json()["state"] == "CANCELLED"
    assert stages.cancelled == ["diffusion"] and stages.cancel_calls == 1


def test_graceful_shutdown_requeues_running_jobs(tmp_path):
    stages = FlakyStages(failures=0)
    stages.step_delay = 0.2
    client, service, store = make(tmp_path, stages=stages)
    with client:
        job_id = client.post("/v1/jobs", json=body(sampling={"steps": 100})).json()["id"]
        wait_state(client, job_id, states=("IN_PROGRESS",))
    # The ingress stopped (lifespan shutdown): the job is queued again, unowned, nothing lost.
    rec = JobStore(store).get(job_id)
    assert rec.state == JobState.IN_QUEUE and rec.owner is None, rec
    assert job_id in [k.rsplit("/", 1)[1] for k in store.list("jobs/active/")]
    assert stages.cancel_calls == 1
    # A restarted ingress runs it.
    client2, *_ = make(tmp_path)
    with client2:
        st = wait_state(client2, job_id)
    assert st["state"] == "COMPLETED" and JobStore(store).get(job_id).attempts == 2


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


def test_served_decode_call_is_resent_when_its_replica_died():
    """ServeStages re-sends only the failed chunk's decode call (not the whole job) when the
    VaeDecoder replica died; other errors propagate at once."""
    from ray.exceptions import ActorDiedError

    from deployments.stages import ServeStages

    class Response:
        def __init__(self, outcome):
            self.outcome = outcome

        def __await__(self):
            async def run():
                if isinstance(self.outcome, BaseException):
                    raise self.outcome
                return self.outcome
            return run().__await__()

        def cancel(self):
            pass

    class Method:
        def __init__(self, outcomes):
            self.outcomes, self.calls = list(outcomes), []

        def remote(self, latents, **kw):
            self.calls.append(latents)
            return Response(self.outcomes.pop(0))

    class Decoder:
        def __init__(self, outcomes):
            self.decode = Method(outcomes)

    async def run(outcomes, latents):
        decoder = Decoder(outcomes)
        stages = ServeStages(None, None, None, None, decoder).for_job("job-1")
        try:
            return await stages.vae_decode(latents), decoder.decode.calls
        except Exception as e:  # noqa: BLE001
            return e, decoder.decode.calls

    async def streamed_latents():
        return "latents"

    async def scenario():
        died = await run([ActorDiedError(), "frames"], asyncio.ensure_future(streamed_latents()))
        bad = await run([ValueError("bad latents"), "frames"], "latents")
        return died, bad

    (frames, calls), (error, bad_calls) = asyncio.run(scenario())
    assert frames == "frames" and calls == ["latents", "latents"]  # re-sent once, same latents
    assert isinstance(error, ValueError) and bad_calls == ["latents"]  # not retryable: not re-sent


def test_per_tenant_queue_limit(tmp_path):
    """One busy tenant cannot fill the replica's queue: beyond its own limit it gets 429
    with Retry-After, naming the tenant, while another tenant still gets in."""
    stages = FakeStages()
    stages.step_delay = 0.3  # jobs stay unfinished while we submit
    client, service, _ = make(tmp_path, stages=stages, keyring=KeyRing(KEYS), max_queued_jobs_per_tenant=2,
                              max_queued_jobs=10, retry_after_s=7)
    G = {"Authorization": "Bearer key-globex"}
    with client:
        for _ in range(2):
            assert client.post("/v1/jobs", json=body(sampling={"steps": 20}), headers=A).status_code == 202
        r = client.post("/v1/jobs", json=body(), headers=A)
        assert r.status_code == 429 and r.headers["retry-after"] == "7"
        assert "acme" in r.json()["error"]["message"] and "limit" in r.json()["error"]["message"]
        assert client.post("/v1/jobs", json=body(), headers=G).status_code == 202  # others are not blocked
        for job_id in list(service.tasks):
            client.delete(f"/v1/jobs/{job_id}", headers=A if service.records[job_id].tenant == "acme" else G)
