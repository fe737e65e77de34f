"""Ingress routes over an in-process JobService with fake stages (no Ray, no model).

The fake driver (tests/fakes.py) stands in for ``multitalk.driver.generate``: it calls the
stages the way the real driver does and reports progress, so routing, persistence,
progress, cancellation and error mapping are tested without any model.
"""
from __future__ import annotations

import json
import time

import pytest
from fakes import VIDEO, FakeStages, job_body, make_client, wait_state

from deployments.jobs import JobStore
from deployments.schemas import JobRequest, JobState
from deployments.service import ServiceSettings
from deployments.storage import LocalStore


def test_submit_json_and_follow(tmp_path):
    client, service, store = make_client(tmp_path)
    with client:
        r = client.post("/v1/jobs", json=job_body())
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        assert r.json()["status_url"] == f"/v1/jobs/{job_id}"
        body = wait_state(client, job_id)
        assert body["state"] == "COMPLETED", body
        assert body["progress"]["stage"] == "done" and body["progress"]["total_steps"] == 3
        assert {"queue", "fetch_inputs", "generate", "upload", "diffusion", "total"} <= set(body["timings"])
        res = body["result"]
        assert res["key"] == f"outputs/{job_id}.mp4" and res["frames"] == 9
        assert res["url"].startswith("file://") and res["video_url"] == f"/v1/jobs/{job_id}/video"
        assert abs(res["duration"] - 9 / 25) < 1e-6
        assert store.get(f"outputs/{job_id}.mp4") == VIDEO
        video = client.get(f"/v1/jobs/{job_id}/video")
        assert video.status_code == 200 and video.content == VIDEO
        assert video.headers["content-type"] == "video/mp4"
        assert body["request"]["image"] == "inputs/multi1.png" or body["request"]["image"] == "multi1.png"
    # The record on disk says the same.
    rec = JobStore(store).get(job_id)
    assert rec.state == JobState.COMPLETED and rec.result.key == f"outputs/{job_id}.mp4"


def test_submit_multipart_upload(tmp_path):
    client, service, store = make_client(tmp_path)
    with client:
        r = client.post(
            "/v1/jobs",
            files=[("image", ("face.png", b"\x89PNGupload")), ("audio", ("a.wav", b"RIFFa")),
                   ("audio", ("b.wav", b"RIFFb"))],
            data={"request": json.dumps({"prompt": "two", "frames": 5, "sampling": {"steps": 2},
                                         "audio_type": "para"})},
        )
        assert r.status_code == 202, r.text
        body = wait_state(client, r.json()["id"])
        assert body["state"] == "COMPLETED", body
        req = body["request"]
        assert req["image"].startswith("inputs/uploads/") and req["image"].endswith(".png")
        assert len(req["audio"]) == 2 and req["audio_type"] == "para"
        assert store.get(req["audio"][1]) == b"RIFFb"


def test_bad_inputs(tmp_path):
    client, service, store = make_client(tmp_path)
    with client:
        r = client.post("/v1/jobs", json=job_body(audio=["missing.wav"]))
        assert r.status_code == 404
        assert r.json()["error"]["field"] == "audio[0]" and "missing.wav" in r.json()["error"]["message"]
        r = client.post("/v1/jobs", json=job_body(image="../../etc/passwd"))
        assert r.status_code == 422 and r.json()["error"]["field"] == "image"
        r = client.post("/v1/jobs", json=job_body(image="%2e%2e/x.png"))
        assert r.status_code == 422 and r.json()["error"]["field"] == "image"
        r = client.post("/v1/jobs", json=job_body(frames=80))
        assert r.status_code == 422 and r.json()["error"]["field"] == "frames"
        r = client.post("/v1/jobs", json=job_body(sampling={"steps": 0}))
        assert r.status_code == 422 and r.json()["error"]["field"] == "sampling.steps"
        r = client.post("/v1/jobs", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["field"] == "body"
        r = client.post("/v1/jobs", files=[("image", ("a.png", b"x"))], data={"request": "{}"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "audio"
        assert client.get("/v1/jobs/not-a-job").status_code == 404
        assert client.get("/v1/jobs/00000000-0000-4000-8000-000000000000").status_code == 404
        # A failure inside the pipeline on an input: the job fails naming the field.
        r = client.post("/v1/jobs", json=job_body(prompt="bad-audio"))
        body = wait_state(client, r.json()["id"])
        assert body["state"] == "FAILED"
        assert body["error"]["field"] == "audio[0]" and body["error"]["status"] == 422
        r = client.post("/v1/jobs", json=job_body(prompt="boom"))
        body = wait_state(client, r.json()["id"])
        assert body["state"] == "FAILED" and "kaboom" in body["error"]["message"]
        assert client.get(f"/v1/jobs/{r.json()['id']}/video").status_code == 409


def test_idempotent_submit(tmp_path):
    client, service, store = make_client(tmp_path)
    with client:
        h = {"Idempotency-Key": "abc-123"}
        a = client.post("/v1/jobs", json=job_body(), headers=h)
        b = client.post("/v1/jobs", json=job_body(), headers=h)
        assert a.status_code == b.status_code == 202 and a.json()["id"] == b.json()["id"]
        c = client.post("/v1/jobs", json=job_body(frames=13), headers=h)
        assert c.status_code == 409
        wait_state(client, a.json()["id"])
        assert len(JobStore(store).list_ids()) == 1


def test_cancel_running_job(tmp_path):
    stages = FakeStages()
    stages.step_delay = 0.2
    client, service, store = make_client(tmp_path, stages=stages)
    with client:
        job_id = client.post("/v1/jobs", json=job_body(sampling={"steps": 200})).json()["id"]
        wait_state(client, job_id, states=("IN_PROGRESS",))
        deadline = time.monotonic() + 10
        while "diffusion" not in stages.calls and time.monotonic() < deadline:
            time.sleep(0.02)
        r = client.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["state"] == "CANCELLED"
        assert stages.cancelled == ["diffusion"]  # the in-flight stage call was cancelled
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "CANCELLED"
        assert client.delete(f"/v1/jobs/{job_id}").json()["state"] == "CANCELLED"  # idempotent
    assert JobStore(store).get(job_id).state == JobState.CANCELLED


def test_finished_jobs_leave_the_runner(tmp_path):
    """Once a job's final record is saved the runner forgets it (its maps hold running jobs
    only); the job is answered from the store, also by runsync and cancel."""
    client, service, store = make_client(tmp_path)
    with client:
        ids = [client.post("/v1/jobs", json=job_body(prompt=f"job {i}")).json()["id"] for i in range(6)]
        assert all(wait_state(client, job_id)["state"] == "COMPLETED" for job_id in ids)
        runner = service.runner
        deadline = time.monotonic() + 10
        while (runner.records or runner.tasks or runner.done) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not runner.records and not runner.tasks and not runner.done
        assert client.get(f"/v1/jobs/{ids[0]}").json()["result"]["key"] == f"outputs/{ids[0]}.mp4"
        assert client.delete(f"/v1/jobs/{ids[1]}").json()["state"] == "COMPLETED"
        r = client.post("/runsync", json={"input": {"action": "generate", "audio_1": "1.wav",
                                                    "condition_image": "multi1.png", "frames": 9}})
        assert r.json()["status"] == "COMPLETED" and not runner.records
    assert JobStore(store).get(ids[0]).state == JobState.COMPLETED


def test_overload_429(tmp_path):
    stages = FakeStages()
    stages.step_delay = 0.2
    client, service, store = make_client(tmp_path, stages=stages, max_queued_jobs=1, retry_after_s=7)
    with client:
        first = client.post("/v1/jobs", json=job_body(sampling={"steps": 100}))
        assert first.status_code == 202
        second = client.post("/v1/jobs", json=job_body())
        assert second.status_code == 429 and second.headers["retry-after"] == "7"
        assert "error" in second.json()
        client.delete(f"/v1/jobs/{first.json()['id']}")


def test_runpod_contract(tmp_path):
    client, service, store = make_client(tmp_path)
    with client:
        gen = {"input": {"action": "generate", "audio_1": "1.wav", "condition_image": "multi1.png",
                         "output_format": "s3", "frames": 5, "sample_steps": 2}}
        r = client.post("/run", json=gen)
        assert r.status_code == 200 and set(r.json()) >= {"id", "status"}
        assert r.json()["status"] in ("IN_QUEUE", "IN_PROGRESS")
        job_id = r.json()["id"]
        deadline = time.monotonic() + 20
        while (s := client.get(f"/status/{job_id}").json())["status"] != "COMPLETED":
            assert time.monotonic() < deadline and s["status"] != "FAILED", s
            time.sleep(0.02)
        out = s["output"]
        assert out["video_key"] == f"outputs/{job_id}.mp4" and out["video_url"] and out["frames"] == 5

        r = client.post("/runsync", json={"input": {**gen["input"], "output_format": "local"}})
        assert r.json()["status"] == "COMPLETED", r.json()
        assert r.json()["output"]["local_path"].endswith(".mp4")

        r = client.post("/runsync", json={"input": {"action": "model_check"}})
        assert r.json()["status"] == "COMPLETED"
        assert r.json()["output"]["components"]["audio_encoder"]["found"] is True
        r = client.post("/run", json={"input": {"action": "volume_explore"}})
        assert r.json()["status"] == "COMPLETED"
        files = [f["path"] for f in r.json()["output"]["files"]]
        assert "chinese-wav2vec2-base/config.json" in files
        r = client.post("/runsync", json={"input": {"action": "volume_explore", "path": "chinese-wav2vec2-base"}})
        assert [f["path"] for f in r.json()["output"]["files"]] == ["config.json"]
        r = client.post("/runsync", json={"input": {"action": "volume_explore", "path": "../.."}})
        assert r.json()["status"] == "FAILED" and r.json()["error"].startswith("path:")

        # Errors name the RunPod fields.
        r = client.post("/run", json={"input": {"action": "generate", "audio_1": "nope.wav",
                                                "condition_image": "multi1.png"}})
        assert r.status_code == 404 and r.json()["error"]["field"] == "audio_1"
        r = client.post("/run", json={"input": {"action": "generate", "condition_image": "multi1.png"}})
        assert r.status_code == 422 and "audio_1" in r.json()["error"]["field"]
        r = client.post("/run", json={"input": {"action": "dance"}})
        assert r.status_code == 422
        r = client.post("/runsync", json={"input": {"action": "generate", "audio_1": "1.wav",
                                                    "condition_image": "multi1.png", "prompt": "bad-audio",
                                                    "frames": 5}})
        assert r.json()["status"] == "FAILED" and r.json()["error"].startswith("audio_1:")
        assert client.get("/status/00000000-0000-4000-8000-000000000000").status_code == 404


def test_restart_requeues_unfinished_jobs(tmp_path):
    store = LocalStore(tmp_path / "store")
    store.put("1.wav", b"RIFF")
    store.put("multi1.png", b"PNG")
    jobs = JobStore(store)
    running, _ = jobs.create(JobRequest.model_validate(job_body()))
    running.state, running.owner, running.heartbeat_at = JobState.IN_PROGRESS, "old-replica", time.time()
    jobs.save(running)
    queued, _ = jobs.create(JobRequest.model_validate(job_body()))
    done, _ = jobs.create(JobRequest.model_validate(job_body()))
    done.state = JobState.COMPLETED
    jobs.save(done)

    client, service, _ = make_client(tmp_path)  # same store folder: a restarted ingress
    with client:
        for job_id in (running.id, queued.id):
            body = wait_state(client, job_id)
            assert body["state"] == "COMPLETED", body
        assert client.get(f"/v1/jobs/{done.id}").json()["state"] == "COMPLETED"
    assert JobStore(store).get(running.id).attempts == 1
    assert JobStore(store).get(done.id).result is None  # finished jobs are not re-run


def test_misc_routes(tmp_path):
    client, service, store = make_client(tmp_path)
    with client:
        assert client.get("/healthz").json()["status"] == "ok"
        models = client.get("/v1/models").json()
        assert models["components"]["audio_encoder"]["found"] and not models["ready"]
        assert models["kind"] == "incomplete"
        spec = client.get("/openapi.json").json()
        for path in ("/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/video", "/v1/models", "/healthz",
                     "/run", "/runsync", "/status/{job_id}"):
            assert path in spec["paths"], path
        assert "JobRequest" in spec["components"]["schemas"]
        assert "multipart/form-data" in spec["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]


def test_serve_config_and_app_builder():
    """The embedded config parses as a Serve config and names the graph's deployments."""
    import pipeline_graph
    from deployments.launcher import load_serve_config

    schema = load_serve_config(None, host="0.0.0.0", port=9123)
    assert schema.http_options.host == "0.0.0.0" and schema.http_options.port == 9123
    app_cfg = schema.applications[0]
    assert app_cfg.import_path == "pipeline_graph:build_app"
    names = {d.name for d in app_cfg.deployments}
    assert names == {"MultiTalkIngress", "AudioEncoder", "ImageEncoder", "TextEncoder", "Diffusion", "VaeDecoder",
                 "Speech"}
    app = pipeline_graph.build_app(app_cfg.args)  # binds only: nothing loads
    assert app is not None and pipeline_graph.app is not None
    with pytest.raises(ValueError):
        pipeline_graph.build_app({"modelsroot": "/typo"})
    with pytest.raises(ValueError):
        ServiceSettings.from_dict({"max_queued_job": 1})
