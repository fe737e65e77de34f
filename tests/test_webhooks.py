"""Webhooks: the final status POSTed once to a local receiver, signed (Standard Webhooks,
verified by the ``standardwebhooks`` library's own verifier; the deprecated header too),
retried after an error, delivered by the next replica when its owner stopped mid-delivery,
and refused at submit for a host the server does not allow."""
from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import threading
import time

import pytest
from fakes import make_client, wait_state
from standardwebhooks import Webhook, WebhookVerificationError

from deployments.webhook_signing import standard_secret
from deployments.webhooks import DELIVERY_HEADER, SIGNATURE_HEADER, Webhooks, WebhookSettings, sign

SECRET = "s3cret-for-open-service"  # a plain secret (the old form); whsec_ secrets below


class Receiver(http.server.BaseHTTPRequestHandler):
    """Records every POST; answers 500 to the first ``fail`` of them."""

    fail = 0
    received: list = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append({"headers": dict(self.headers), "body": body})
        status = 500 if len(type(self).received) <= type(self).fail else 200
        self.send_response(status)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    Receiver.received, Receiver.fail = [], 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", Receiver
    server.shutdown()


@pytest.fixture
def client(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITALK_WEBHOOK_SECRETS", f"*:{SECRET}")
    hooks = {"allowed_hosts": ["127.0.0.1"], "allow_private": True, "backoff_s": 0.05}
    client, service, store = make_client(tmp_path, webhooks=hooks)
    with client:
        yield client, service


def _verify(delivery: dict, secret: str = SECRET) -> dict:
    """Both signatures: the Standard Webhooks one with the library's own verifier (given the
    secret's whsec_ form, as a receiver holds it) and the deprecated header."""
    payload = Webhook(standard_secret(secret)).verify(delivery["body"], delivery["headers"])
    t, mac = (part.split("=", 1)[1] for part in delivery["headers"][SIGNATURE_HEADER].split(","))
    expected = hmac.new(secret.encode(), f"{t}.".encode() + delivery["body"], hashlib.sha256).hexdigest()
    assert hmac.compare_digest(mac, expected), "bad signature"
    assert payload == json.loads(delivery["body"])
    return payload


def _wait_delivered(client, job_id, timeout=20.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = client.get(f"/v1/jobs/{job_id}").json()
        if st.get("webhook") and (st["webhook"]["delivered_at"] or st["webhook"]["attempts"] >= 5):
            return st
        time.sleep(0.05)
    raise AssertionError(f"webhook of {job_id} not settled: {st.get('webhook')}")


def test_delivered_once_with_a_valid_signature(client, receiver):
    client, service = client
    url, rx = receiver
    job = {"image": "multi1.png", "audio": ["1.wav"], "frames": 9, "sampling": {"steps": 2}, "webhook": url}
    job_id = client.post("/v1/jobs", json=job).json()["id"]
    assert wait_state(client, job_id)["state"] == "COMPLETED"
    st = _wait_delivered(client, job_id)
    assert st["webhook"]["status_code"] == 200 and st["webhook"]["attempts"] == 1
    time.sleep(0.3)  # nothing more arrives
    assert len(rx.received) == 1
    payload = _verify(rx.received[0])
    assert payload["id"] == job_id and payload["state"] == "COMPLETED" and payload["result"]["frames"] == 9
    assert rx.received[0]["headers"][DELIVERY_HEADER] == job_id
    assert rx.received[0]["headers"]["webhook-id"] == f"msg_{job_id}_1"
    assert st["webhook"]["ended_at"] and not service.store.exists(f"jobs/active/{job_id}")  # nothing left to do


def test_retried_after_a_receiver_error_and_runpod_shape(client, receiver):
    client, service = client
    url, rx = receiver
    rx.fail = 2
    body = {"input": {"action": "generate", "audio_1": "1.wav", "condition_image": "multi1.png", "frames": 5,
                      "sample_steps": 1}, "webhook": url}
    job_id = client.post("/run", json=body).json()["id"]
    st = _wait_delivered(client, job_id)
    assert st["webhook"]["delivered_at"] and st["webhook"]["attempts"] == 3, st["webhook"]
    assert len(rx.received) == 3
    payload = _verify(rx.received[-1])  # RunPod jobs get the /status shape
    assert payload["id"] == job_id and payload["status"] == "COMPLETED" and payload["output"]["frames"] == 5


def test_a_delivery_cut_off_by_a_stop_is_made_by_the_next_replica(tmp_path, monkeypatch, receiver):
    """The replica stops (or dies) while its receiver is still failing: the finished job
    stays on the list of unfinished work, and the next replica delivers the webhook once,
    without running the job again."""
    monkeypatch.setenv("MULTITALK_WEBHOOK_SECRETS", f"*:{SECRET}")
    url, rx = receiver
    rx.fail = 10**6
    hooks = {"allowed_hosts": ["127.0.0.1"], "allow_private": True, "backoff_s": 0.05, "attempts": 1000}
    client, service, store = make_client(tmp_path, webhooks=hooks)
    with client:
        job_id = client.post("/v1/jobs", json={"image": "multi1.png", "audio": ["1.wav"], "frames": 9,
                                               "sampling": {"steps": 2}, "webhook": url}).json()["id"]
        assert wait_state(client, job_id)["state"] == "COMPLETED"
        deadline = time.monotonic() + 10
        while len(rx.received) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
    before = service.jobs.get(job_id)
    assert len(rx.received) >= 2 and before.webhook.ended_at is None and before.webhook.delivered_at is None
    assert store.exists(f"jobs/active/{job_id}")  # finished, but its delivery is unfinished work
    tried = len(rx.received)
    rx.fail = 0
    client, service, store = make_client(tmp_path, webhooks=hooks)  # the next replica, same store
    with client:
        st = _wait_delivered(client, job_id)
        time.sleep(0.3)  # nothing more arrives
    assert len(rx.received) == tried + 1 and st["webhook"]["status_code"] == 200 and st["webhook"]["ended_at"]
    payload = _verify(rx.received[-1])
    assert payload["id"] == job_id and payload["state"] == "COMPLETED" and payload["result"] == before.result.model_dump(
        mode="json")  # the status the job finished with: not run again
    after = service.jobs.get(job_id)
    assert after.attempts == before.attempts and after.started_at == before.started_at
    assert rx.received[-1]["headers"][DELIVERY_HEADER] == job_id and not store.exists(f"jobs/active/{job_id}")
    client, service, store = make_client(tmp_path, webhooks=hooks)  # and a third start sends nothing
    with client:
        client.get("/healthz")
        time.sleep(0.3)
    assert len(rx.received) == tried + 1


def test_refused_at_submit_for_disallowed_hosts(tmp_path, monkeypatch):
    monkeypatch.setenv("MULTITALK_WEBHOOK_SECRETS", f"*:{SECRET}")
    client, service, _ = make_client(tmp_path, webhooks={"allowed_hosts": ["hooks.example.com", "127.0.0.1"]})
    job = {"image": "multi1.png", "audio": ["1.wav"], "frames": 9}
    with client:
        for url, status, text in [
            ("http://evil.example.org/x", 403, "allow-list"),
            ("http://127.0.0.1:9/x", 403, "private or loopback"),  # allow-listed, but loopback is not allowed
            ("file:///etc/passwd", 422, "http(s)"),
            ("http://user:pw@hooks.example.com/x", 422, "credentials"),
        ]:
            r = client.post("/v1/jobs", json={**job, "webhook": url})
            assert r.status_code == status and r.json()["error"]["field"] == "webhook", (url, r.text)
            assert text in r.json()["error"]["message"], r.json()
        r = client.post("/run", json={"input": {"action": "generate", "audio_1": "1.wav",
                                                "condition_image": "multi1.png"}, "webhook": "http://evil.example.org/"})
        assert r.status_code == 403 and r.json()["error"]["field"] == "webhook"
    # Without an allow-list no webhook is accepted; without a secret for the tenant neither.
    hooks = Webhooks(WebhookSettings(), env={})
    with pytest.raises(Exception, match="not enabled"):
        hooks.check("https://hooks.example.com/x", None)
    hooks = Webhooks(WebhookSettings(allowed_hosts=("hooks.example.com",)), env={},
                     resolve=lambda host: ["93.184.216.34"])
    with pytest.raises(Exception, match="signing secret"):
        hooks.check("https://hooks.example.com/x", "acme")


def test_signature_is_hmac_of_timestamp_and_body():
    value = sign("k", b'{"a":1}', timestamp=1700000000)
    assert value == "t=1700000000,v1=" + hmac.new(b"k", b'1700000000.{"a":1}', hashlib.sha256).hexdigest()


# --- the transport: connect where checked, resolve off the loop, secrets that rotate -------


class Lookups:
    """``socket.getaddrinfo`` for test names: ``answers(n)`` gives the address of the n-th
    lookup of the name (from 1); every other name resolves for real. Records, per lookup,
    whether it ran on a thread with a running event loop."""

    def __init__(self, name, answers):
        import socket

        self.name, self.answers, self.real = name, answers, socket.getaddrinfo
        self.calls: list[bool] = []

    def __call__(self, host, port, *args, **kw):
        import asyncio
        import socket

        if host != self.name:
            return self.real(host, port, *args, **kw)
        try:
            asyncio.get_running_loop()
            on_loop = True
        except RuntimeError:
            on_loop = False
        self.calls.append(on_loop)
        address = self.answers(len(self.calls))
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port or 0))]


def test_a_host_that_rebinds_to_loopback_is_never_contacted_there(tmp_path, monkeypatch, receiver):
    """The allow-listed name answers a public address to the first two lookups (the check
    at submit and the check before the POST) and loopback afterwards, as an attacker's DNS
    with a zero TTL does. The POST goes to the address that was checked (unreachable here:
    no network), the next attempt's check sees loopback and ends the delivery; the
    receiver on loopback is never contacted, and no lookup blocks the event loop."""
    import socket

    url, rx = receiver
    port = url.split(":")[2].split("/")[0]
    lookups = Lookups("hooks.rebind.test", lambda n: "93.184.216.34" if n <= 2 else "127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", lookups)
    monkeypatch.setenv("MULTITALK_WEBHOOK_SECRETS", f"*:{SECRET}")
    hooks = {"allowed_hosts": ["hooks.rebind.test"], "attempts": 2, "backoff_s": 0.05, "timeout_s": 1.0}
    client, service, _ = make_client(tmp_path, webhooks=hooks)
    with client:
        job = {"image": "multi1.png", "audio": ["1.wav"], "frames": 9, "sampling": {"steps": 2},
               "webhook": f"http://hooks.rebind.test:{port}/hook"}
        job_id = client.post("/v1/jobs", json=job).json()["id"]
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            st = client.get(f"/v1/jobs/{job_id}").json()
            if (st.get("webhook") or {}).get("ended_at") or rx.received:
                break
            time.sleep(0.05)
    assert rx.received == [], "the webhook was POSTed to loopback"
    assert st["webhook"]["delivered_at"] is None and st["webhook"]["ended_at"], st["webhook"]
    assert "private or loopback" in st["webhook"]["error"], st["webhook"]
    assert len(lookups.calls) == 3  # one at submit, one per attempt: the client never resolved again
    assert not any(lookups.calls), "a lookup blocked the event loop"


def test_the_post_goes_to_the_checked_address_under_the_hosts_name(tmp_path, monkeypatch, receiver):
    import socket

    url, rx = receiver
    port = url.split(":")[2].split("/")[0]
    lookups = Lookups("hooks.pinned.test", lambda n: "127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", lookups)
    monkeypatch.setenv("MULTITALK_WEBHOOK_SECRETS", f"*:{SECRET}")
    hooks = {"allowed_hosts": ["hooks.pinned.test"], "allow_private": True, "backoff_s": 0.05}
    client, service, _ = make_client(tmp_path, webhooks=hooks)
    with client:
        job = {"image": "multi1.png", "audio": ["1.wav"], "frames": 9, "sampling": {"steps": 2},
               "webhook": f"http://hooks.pinned.test:{port}/hook"}
        st = _wait_delivered(client, client.post("/v1/jobs", json=job).json()["id"])
    assert st["webhook"]["status_code"] == 200 and len(rx.received) == 1
    assert rx.received[0]["headers"]["Host"] == f"hooks.pinned.test:{port}"
    assert len(lookups.calls) == 2 and not any(lookups.calls)


def test_the_secrets_file_is_closed_and_read_again_when_it_changes(tmp_path, receiver):
    """Rotation without a restart: the file is read (and closed) at start, and again once
    it changed; deliveries after the change are signed with the new secret."""
    import asyncio
    import gc
    import os
    import warnings

    from deployments.webhooks import WebhookInfo

    url, rx = receiver
    secrets = tmp_path / "webhook-secrets"
    secrets.write_text("*:old-secret\n")
    settings = WebhookSettings(allowed_hosts=("127.0.0.1",), allow_private=True, secrets_file=str(secrets))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hooks = Webhooks(settings, env={})
        gc.collect()

    async def noop(info):
        return None

    def deliver():
        return asyncio.run(hooks.deliver(WebhookInfo(url=url), {"id": "j"}, None, "j", noop))

    assert deliver().status_code == 200
    secrets.write_text("*:new-secret\n")
    os.utime(secrets, ns=(time.time_ns() + 10**9,) * 2)
    time.sleep(1.1)  # the file is checked at most once a second
    assert deliver().status_code == 200
    for delivery, secret in zip(rx.received, ("old-secret", "new-secret")):
        t, mac = (part.split("=", 1)[1] for part in delivery["headers"][SIGNATURE_HEADER].split(","))
        assert mac == hmac.new(secret.encode(), f"{t}.".encode() + delivery["body"], hashlib.sha256).hexdigest(), \
            f"not signed with {secret}"
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_standard_webhooks_per_tenant_whsec_secret_and_replay_with_another_id(tmp_path, monkeypatch, receiver):
    """A tenant's ``whsec_`` secret: its delivery verifies with the standardwebhooks library;
    the same delivery replayed with a changed ``webhook-id`` (a receiver deduping on the id
    would take it as new) is rejected by that verifier, as is another tenant's secret."""
    import base64
    import os

    acme = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    other = "whsec_" + base64.b64encode(os.urandom(24)).decode()
    monkeypatch.setenv("MULTITALK_API_KEYS", "acme:key-acme,other:key-other")
    monkeypatch.setenv("MULTITALK_WEBHOOK_SECRETS", f"acme:{acme},other:{other}")
    url, rx = receiver
    hooks = {"allowed_hosts": ["127.0.0.1"], "allow_private": True, "backoff_s": 0.05}
    client, service, store = make_client(tmp_path, webhooks=hooks)
    auth = {"Authorization": "Bearer key-acme"}
    with client:
        job = {"image": "multi1.png", "audio": ["1.wav"], "frames": 9, "sampling": {"steps": 1}, "webhook": url}
        job_id = client.post("/v1/jobs", json=job, headers=auth).json()["id"]
        deadline = time.monotonic() + 20
        while not rx.received:
            assert time.monotonic() < deadline, "no delivery"
            time.sleep(0.02)
    delivery = rx.received[0]
    headers = {k.lower(): v for k, v in delivery["headers"].items()}
    assert headers["webhook-id"] == f"msg_{job_id}_1" and headers["webhook-signature"].startswith("v1,")
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 60
    payload = Webhook(acme).verify(delivery["body"], headers)
    assert payload["id"] == job_id and payload["state"] == "COMPLETED"
    replayed = {**headers, "webhook-id": f"msg_{job_id}_2"}
    with pytest.raises(WebhookVerificationError):
        Webhook(acme).verify(delivery["body"], replayed)
    with pytest.raises(WebhookVerificationError):
        Webhook(acme).verify(delivery["body"].replace(b"COMPLETED", b"FAILED"), headers)  # a changed body
    with pytest.raises(WebhookVerificationError):
        Webhook(other).verify(delivery["body"], headers)  # another tenant's secret
    stale = {**headers, "webhook-timestamp": str(int(time.time()) - 3600)}
    with pytest.raises(WebhookVerificationError):
        Webhook(acme).verify(delivery["body"], stale)  # an old delivery replayed as it was
