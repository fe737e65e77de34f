"""Hardening, faults: S3 retries with backoff, stage retries within the job's budget,
deadlines, cancel, graceful shutdown, the served decode call re-sent in place, and the
transient-error classification (deployments/retry.py).
"""
from __future__ import annotations

import asyncio
import http.server
import threading
import time
from unittest.mock import patch

import pytest
from fastapi.testclient import TestClient
from fakes import FakeStages, fake_generate, wait_state
from inputs import body, make

from deployments.routes import create_app
from deployments.auth import KeyRing
from deployments.jobs import JobStore
from deployments.retry import RetryBudget, is_transient
from deployments.schemas import JobState
from deployments.service import JobService, ServiceSettings
from deployments.storage import LocalStore


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
                         settings=ServiceSettings(persist_interval_s=0.05, precheck_inputs=False))
    client = TestClient(create_app(service, keyring=KeyRing()))
    with client:
        st = wait_state(client, client.post("/v1/jobs", json=body()).json()["id"])
    assert st["state"] == "FAILED" and "AccessDenied" in st["error"]["message"], st


def _replica_died() -> Exception:
    from ray.exceptions import ActorDiedError

    return ActorDiedError()


def _input_lost() -> Exception:
    """As when the node holding an encoder's output died: the Diffusion replica cannot fetch
    an input argument."""
    from ray.exceptions import ObjectReconstructionFailedError

    error = RuntimeError("Diffusion: at least one of the input arguments for this task could not be computed")
    error.__cause__ = ObjectReconstructionFailedError("5d674c14" * 7)
    return error


class FlakyStages(FakeStages):
    """The DiT call fails on the first ``failures`` calls with ``error()`` (default: the
    Diffusion replica 'dies'); each failed call is recorded as ``label``."""

    def __init__(self, failures=1, error=_replica_died, label="diffusion-died"):
        super().__init__()
        self.failures, self.error, self.label = failures, error, label
        self.cancel_calls = 0

    def cancel(self):
        self.cancel_calls += 1

    def diffusion_sample(self, job, audio, image, text, on_step=None):
        if self.failures > 0:
            self.failures -= 1

            async def fail():
                raise self.error()
            self.calls.append(self.label)
            return asyncio.ensure_future(fail())
        return super().diffusion_sample(job, audio, image, text, on_step)


def test_a_lost_input_reruns_the_job(tmp_path):
    """Seen in the cluster drill: an encoder's output lived on the node that died, so the
    DiT call could not start (ObjectReconstructionFailedError) and the job FAILED. Re-sending
    the same call cannot bring the object back; re-running the job makes it anew."""
    stages = FlakyStages(1, error=_input_lost, label="diffusion-lost-input")
    client, *_ = make(tmp_path, stages=stages, stage_retry_backoff_s=0.01)
    with client:
        st = wait_state(client, client.post("/v1/jobs", json=body()).json()["id"])
    assert st["state"] == "COMPLETED", st
    assert st["timings"]["stage_retries"] == 1 and stages.calls.count("diffusion-lost-input") == 1
    assert stages.calls.count("audio") == 2  # the encoders ran again: the job was re-run


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


def test_retries_outlast_a_node_death_detection_window():
    """Calls that fail fast while Ray has not yet declared a dead node dead (its replicas
    still routed to) are retried for the whole window, not for a count of quick retries; once
    the window has passed, the next failure ends the job."""
    from ray.exceptions import ActorUnavailableError

    clock = [0.0]
    budget = RetryBudget(retries=100, backoff_s=1.0, max_backoff_s=15.0, window_s=60.0)
    waited = []
    with patch("deployments.retry.time.monotonic", lambda: clock[0]):
        while (delay := budget.next_delay(ActorUnavailableError("unreachable", None))) is not None:
            waited.append(delay)
            clock[0] += delay + 0.5  # the call itself fails after half a second
    assert sum(waited) >= 55 - 0.5 * len(waited)  # Ray's default detection takes up to 55 s
    assert waited[:5] == [1, 2, 4, 8, 15] and max(waited) == 15 and clock[0] > 60
    assert not RetryBudget(window_s=60).next_delay(ValueError("a bug"))  # not transient: never retried


def test_retryable_classification():
    from ray.exceptions import ActorDiedError, RayActorError
    from ray.serve.exceptions import BackPressureError

    assert is_transient(ActorDiedError()) and is_transient(RayActorError())
    wrapped = RuntimeError("x")
    wrapped.__cause__ = ActorDiedError()
    assert is_transient(wrapped)
    assert not is_transient(RuntimeError("kaboom")) and not is_transient(ValueError())
    assert not is_transient(BackPressureError(num_queued_requests=1, max_queued_requests=1))


def test_a_lost_input_is_retried_by_re_running_the_job_not_by_resending_the_call():
    from ray.exceptions import ActorDiedError, ObjectReconstructionFailedError, OwnerDiedError

    lost = RuntimeError("an input argument could not be computed")
    lost.__cause__ = ObjectReconstructionFailedError("ab" * 28)
    assert is_transient(lost) and is_transient(OwnerDiedError("ab" * 28, None, ""))
    assert RetryBudget().next_delay(lost, resend=True) is None  # in place: up to the job
    assert RetryBudget().next_delay(lost) == 1.0  # the job re-runs
    assert RetryBudget().next_delay(ActorDiedError(), resend=True) == 1.0  # a dead replica: re-sent in place


def test_an_input_resolved_by_the_dit_replica_is_lost_only_when_ray_says_it_is_gone():
    """deployments/by_reference.py: an encoder result whose replica stopped answering (what
    Serve's own chaining hung on) becomes a lost input, naming the input; the encoder's own
    error (a bad input, a bug) comes through as it was raised."""
    from ray.exceptions import ActorUnavailableError

    from deployments.by_reference import ByReference, resolve
    from deployments.retry import InputLostError, input_error_in, lost_input
    from multitalk.api import InputError

    def result_raising(exc):
        async def result():
            raise exc
        return ByReference(result(), "audio features")

    with pytest.raises(InputLostError, match="audio features is gone .*ActorUnavailableError") as lost:
        asyncio.run(resolve(result_raising(ActorUnavailableError("its node stopped answering", None))))
    assert lost_input(lost.value) and RetryBudget().next_delay(lost.value, resend=True) is None  # up to the job
    with pytest.raises(InputError) as bad:
        asyncio.run(resolve(result_raising(InputError("audio_1", "not a wav"))))
    assert input_error_in(bad.value).field == "audio_1" and not lost_input(bad.value)
    with pytest.raises(ZeroDivisionError):
        asyncio.run(resolve(result_raising(ZeroDivisionError())))
    assert asyncio.run(resolve("a plain value")) == "a plain value"


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



def test_served_decode_call_is_resent_when_its_replica_died():
    """ServeStages re-sends only the failed chunk's decode call (not the whole job) when the
    VaeDecoder replica died; other errors propagate at once."""
    from ray.exceptions import ActorDiedError

    from deployments.serve_stages import ServeStages
    from multitalk.stages import DecodeRequest

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

        def remote(self, latents, request, **kw):
            self.calls.append(latents)
            return Response(self.outcomes.pop(0))

    class Decoder:
        def __init__(self, outcomes):
            self.decode_chunk = Method(outcomes)

    async def run(outcomes, latents):
        decoder = Decoder(outcomes)
        stages = ServeStages(None, None, None, None, decoder).for_job("job-1")
        try:
            return await stages.vae_decode(latents, DecodeRequest()), decoder.decode_chunk.calls
        except Exception as e:  # noqa: BLE001
            return e, decoder.decode_chunk.calls

    async def streamed_latents():
        return "latents"

    async def scenario():
        died = await run([ActorDiedError(), "frames"], asyncio.ensure_future(streamed_latents()))
        bad = await run([ValueError("bad latents"), "frames"], "latents")
        return died, bad

    (frames, calls), (error, bad_calls) = asyncio.run(scenario())
    assert frames == "frames" and calls == ["latents", "latents"]  # re-sent once, same latents
    assert isinstance(error, ValueError) and bad_calls == ["latents"]  # not retryable: not re-sent
