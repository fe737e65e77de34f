"""The front doors clients already speak, driven by those clients unmodified over real HTTP
(uvicorn in a thread) into an in-process JobService with the fake stages (tests/fakes.py):

* RunPod's serverless URLs (``/v2/{endpoint_id}/...``) by the ``runpod`` SDK;
* the OpenAI-style ``/v1/videos`` by the ``openai`` SDK.

The same doors over the real application and a real mp4 are in ``test_serve_s3.py``.
"""
from __future__ import annotations

import time

import pytest
from fakes import FakeStages, VIDEO, http_server, make_client
from fastapi.testclient import TestClient

from deployments.routes import create_app


@pytest.fixture
def runpod_sdk(monkeypatch):
    """The ``runpod`` SDK, pointed at a server by its own setting (``RUNPOD_ENDPOINT_BASE_URL``,
    read into ``runpod.endpoint_url_base`` when the package is imported)."""
    import runpod

    def point_at(base_url: str, api_key: str = "unused-on-an-open-server"):
        monkeypatch.setenv("RUNPOD_ENDPOINT_BASE_URL", f"{base_url}/v2")
        monkeypatch.setattr(runpod, "endpoint_url_base", f"{base_url}/v2")  # imported before the env was set
        monkeypatch.setattr(runpod, "api_key", api_key)
        return runpod

    return point_at


def _serve(tmp_path, **settings):
    stages = FakeStages()
    client, service, store = make_client(tmp_path, stages=stages, **settings)
    return stages, service, store


def test_runpod_sdk_runs_streams_cancels_retries_purges_and_checks_health(tmp_path, runpod_sdk):
    stages, service, store = _serve(tmp_path, max_concurrent_jobs=1)
    with http_server(create_app(service)) as url:
        runpod = runpod_sdk(url)
        endpoint = runpod.Endpoint("multitalk")
        health = endpoint.health()
        assert health["workers"] == {"idle": 1, "running": 0} and health["jobs"]["inQueue"] == 0, health

        generate = {"action": "generate", "audio_1": "1.wav", "condition_image": "multi1.png", "frames": 9,
                    "sample_steps": 2}
        job = endpoint.run(generate)  # the SDK wraps it in {"input": ...}
        output = job.output(timeout=30)
        assert job.status() == "COMPLETED"
        assert output["video_key"] == f"outputs/{job.job_id}.mp4" and output["frames"] == 9, output
        assert store.get(output["video_key"]) == VIDEO
        explored = endpoint.run_sync({"input": {"action": "volume_explore", "max_depth": 1}})
        assert "chinese-wav2vec2-base/config.json" in [f["path"] for f in explored["files"]], explored

        # A streaming job's chunks as partial outputs, then the final output, each once.
        streamed = list(endpoint.run({**generate, "mode": "streaming", "motion_frames": 5}).stream())
        assert [item.get("chunk") for item in streamed] == [0, 1, 2, None], streamed
        assert streamed[1]["segment_key"].endswith(".chunks/00001.m4s") and streamed[1]["frames_so_far"] == 18
        assert streamed[1]["segment_url"].startswith("file://") and streamed[0]["init_url"].endswith("init.mp4")
        assert streamed[-1]["video_key"].endswith(".mp4") and streamed[-1]["frames"] == 9

        # Cancel one mid-diffusion; the second queued behind it is purged; then retried.
        stages.step_delay = 0.1
        slow = endpoint.run({**generate, "sample_steps": 100})
        queued = [endpoint.run(generate) for _ in range(2)]
        deadline = time.monotonic() + 10
        while endpoint.health()["workers"]["running"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        health = endpoint.health()
        assert health["jobs"]["inQueue"] == 2 and health["jobs"]["inProgress"] == 1, health
        assert endpoint.purge_queue() == {"removed": 2, "status": "completed"}
        assert all(q.status() == "CANCELLED" for q in queued)
        cancelled = slow.cancel()
        assert cancelled["status"] == "CANCELLED" and cancelled["id"] == slow.job_id
        assert slow.status() == "CANCELLED"
        stages.step_delay = 0.0
        health = endpoint.health()
        assert health["jobs"]["inQueue"] == 0 and health["jobs"]["completed"] == 2 and health["jobs"]["failed"] == 0, health

        retried = runpod.endpoint.runner.Job("multitalk", queued[0].job_id, endpoint.rp_client)
        r = endpoint.rp_client.post(f"multitalk/retry/{queued[0].job_id}", None)
        assert r == {"id": queued[0].job_id, "status": "IN_QUEUE", "output": None, "error": None,
                     "delayTime": None, "executionTime": None}, r
        assert retried.output(timeout=30)["frames"] == 9 and retried.status() == "COMPLETED"
        assert endpoint.health()["jobs"]["retried"] == 1
        with pytest.raises(Exception, match="409"):  # a completed job is not retried
            endpoint.rp_client.post(f"multitalk/retry/{queued[0].job_id}", None)


def test_runpod_v2_routes_answer_like_the_root_ones_and_check_the_endpoint_id(tmp_path):
    _, service, _ = _serve(tmp_path, runpod_endpoint_id="mt-prod", job_timeout_s=0.3)
    with TestClient(create_app(service)) as client:
        body = {"input": {"action": "generate", "audio_1": "1.wav", "condition_image": "multi1.png", "frames": 9,
                          "sample_steps": 1}}
        done = client.post("/v2/mt-prod/runsync", json=body).json()
        assert done["status"] == "COMPLETED" and done["executionTime"] >= 0 and done["delayTime"] >= 0, done
        assert client.get(f"/status/{done['id']}").json()["output"] == done["output"]  # the root route: same job
        r = client.post("/v2/other/run", json=body)
        assert r.status_code == 404 and r.json()["error"]["field"] == "endpoint_id"
        assert client.get("/v2/mt-prod/health").status_code == 200 and client.get("/v2/x/health").status_code == 404
        r = client.post("/v2/mt-prod/run", content=b"{oops", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "body"
        r = client.post("/v2/mt-prod/run", json={"input": {"action": "generate", "condition_image": "multi1.png"}})
        assert r.status_code == 422 and r.json()["error"]["field"] == "audio_1", r.json()
        # A job past its deadline is TIMED_OUT to RunPod clients (FAILED, status 504, natively).
        service.runner.generate_fn = _never_ends
        late = client.post("/v2/mt-prod/runsync", json=body).json()
        assert late["status"] == "TIMED_OUT" and "deadline" in late["error"], late
        assert client.get(f"/v1/jobs/{late['id']}").json()["error"]["status"] == 504


async def _never_ends(*args, **kwargs):
    import asyncio

    await asyncio.sleep(3600)
