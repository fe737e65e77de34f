"""The front doors clients already speak, driven by those clients unmodified over real HTTP
(uvicorn in a thread) into an in-process JobService with the fake stages (tests/fakes.py):

* RunPod's serverless URLs (``/v2/{endpoint_id}/...``) by the ``runpod`` SDK;
* the OpenAI-style ``/v1/videos`` by the ``openai`` SDK.

The same doors over the real application and a real mp4 are in ``test_serve_s3.py``.
"""
from __future__ import annotations

import time

import pytest
from fakes import VIDEO, FakeStages, http_server, make_client, mp4_generate, tiny_mp4
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


def test_openai_sdk_creates_polls_downloads_lists_and_deletes(tmp_path):
    """The unmodified ``openai`` SDK against ``/v1``: an image uploaded as ``input_reference``
    and the speech as vLLM-Omni's ``audio_reference`` object (a store key, then a second
    speaker as a data: URL), polled to completed, the mp4 and its thumbnail downloaded,
    listed page by page, deleted."""
    import base64
    import warnings

    from openai import NotFoundError, OpenAI, UnprocessableEntityError

    from multitalk.utils.video import probe_mp4

    _, service, store = _serve(tmp_path)
    service.runner.generate_fn = mp4_generate
    warnings.simplefilter("ignore", DeprecationWarning)  # the SDK marks the hosted API as retired
    with http_server(create_app(service)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused-on-an-open-server", max_retries=0)
        wav2 = "data:audio/wav;base64," + base64.b64encode(b"RIFF-second-speaker").decode()
        video = client.videos.create(
            prompt="two people talking", input_reference=("face.png", b"\x89PNG-upload", "image/png"),
            seconds="0.36", size="832x480",
            extra_body={"audio_reference": {"audio_url": "1.wav"}, "audio_reference_2": {"audio_url": wav2},
                        "audio_type": "para", "num_inference_steps": 2})
        assert video.object == "video" and video.status in ("queued", "in_progress") and video.model == "multitalk"
        assert video.size == "multitalk-480" and video.seconds == "0.36"
        deadline = time.monotonic() + 20
        while (video := client.videos.retrieve(video.id)).status not in ("completed", "failed"):
            assert time.monotonic() < deadline and 0 <= video.progress <= 100
            time.sleep(0.05)
        assert video.status == "completed" and video.progress == 100 and video.completed_at >= video.created_at
        assert video.seconds == "0.36" and video.size == "32x32"
        job = service.jobs.get(video.id).request  # the native job it became (finished: read from the store)
        assert job.image.startswith("inputs/uploads/") and job.audio[0] == "1.wav" and job.audio_type == "para"
        assert store.get(job.audio[1]) == b"RIFF-second-speaker" and job.frames == 9 and job.size == "multitalk-480"
        assert job.sampling.steps == 2 and job.mode == "clip"

        mp4 = client.videos.download_content(video.id).read()
        info = probe_mp4(mp4)
        assert info["video_codec"] == "h264" and info["audio_codec"] == "aac" and info["num_frames"] == 9, info
        jpeg = client.videos.download_content(video.id, variant="thumbnail").read()
        assert jpeg[:2] == b"\xff\xd8" and store.exists(f"outputs/{video.id}.thumbnail.jpg")
        from PIL import Image
        import io

        assert Image.open(io.BytesIO(jpeg)).size == (32, 32)

        second = client.videos.create(prompt="again", extra_body={"image_reference": {"image_url": "multi1.png"},
                                                                  "audio_reference": {"audio_url": "2.wav"}})
        page = client.videos.list(limit=1)
        assert [v.id for v in page.data] == [second.id] and page.has_more
        assert [v.id for v in page.get_next_page().data] == [video.id]
        assert [v.id for v in client.videos.list()] == [second.id, video.id]  # auto-paging

        deleted = client.videos.delete(video.id)
        assert deleted.deleted and deleted.id == video.id and deleted.object == "video.deleted"
        assert not store.exists(f"outputs/{video.id}.mp4") and not store.exists(f"outputs/{video.id}.thumbnail.jpg")
        with pytest.raises(NotFoundError):
            client.videos.retrieve(video.id)
        assert [v.id for v in client.videos.list()] == [second.id]

        # Unknown values: a 4xx naming the field.
        for kwargs, field in [({"size": "1234x567"}, "size"), ({"seconds": "-4"}, "seconds"),
                              ({"model": "sora-2"}, "model")]:
            with pytest.raises(UnprocessableEntityError) as err:
                client.videos.create(prompt="x", input_reference=("f.png", b"PNG", "image/png"),
                                     extra_body={"audio_reference": {"audio_url": "1.wav"}}, **kwargs)
            assert err.value.response.json()["error"]["field"] == field, err.value.body
        with pytest.raises(UnprocessableEntityError) as err:
            client.videos.create(prompt="x", input_reference=("f.png", b"PNG", "image/png"),
                                 extra_body={"audio_reference": {"audio_url": "https://example.com/a.wav"}})
        assert err.value.response.json()["error"]["field"] == "audio_reference.audio_url"
        with pytest.raises(UnprocessableEntityError) as err:
            client.videos.create(prompt="x", extra_body={"audio_reference": {"audio_url": "1.wav"}})
        assert err.value.response.json()["error"]["field"] == "input_reference"
        with pytest.raises(NotFoundError):
            client.videos.list(after="00000000-0000-4000-8000-000000000000")


def test_openai_json_body_sync_and_failures(tmp_path):
    """JSON bodies, /v1/videos/sync answering the mp4, a failed job's error object, and a
    presigned-style URL of the store's own bucket accepted while other web URLs are not."""
    _, service, store = _serve(tmp_path)
    service.runner.generate_fn = mp4_generate
    with TestClient(create_app(service)) as client:
        body = {"prompt": "hi", "input_reference": {"image_url": "multi1.png"},
                "audio_reference": {"audio_url": "1.wav"}, "num_frames": 9}
        r = client.post("/v1/videos/sync", json=body)
        assert r.status_code == 200 and r.headers["content-type"] == "video/mp4" and r.content == tiny_mp4()
        # vLLM-Omni's form: the objects as JSON text fields, answered with the mp4.
        form = {"prompt": "hi", "image_reference": '{"image_url": "multi1.png"}', "audio_reference": '{"audio_url": "1.wav"}',
                "num_frames": "9"}
        r = client.post("/v1/videos/sync", files=[(k, (None, v)) for k, v in form.items()])  # curl -F k=v
        assert r.status_code == 200 and r.content == tiny_mp4(), r.text
        vid = client.get("/v1/videos?limit=1").json()["data"][0]["id"]
        assert client.get(f"/v1/videos/{vid}/content?variant=spritesheet").status_code == 422
        r = client.post("/v1/videos/sync", json={**body, "prompt": "boom"})
        assert r.status_code == 500 and "kaboom" in r.json()["error"]["message"]
        failed = client.get("/v1/videos").json()["data"][0]
        assert failed["status"] == "failed" and failed["error"]["code"] == "generation_failed", failed
        r = client.post("/v1/videos", json={**body, "prompt": "bad-audio"})
        deadline = time.monotonic() + 10
        while (v := client.get(f"/v1/videos/{r.json()['id']}").json())["status"] != "failed":
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert v["error"] == {"code": "invalid_input", "message": "could not decode audio", "param": "audio_reference"}
        assert client.get(f"/v1/videos/{v['id']}/content").status_code == 409
        for bad, field in [({"num_frames": 10}, "num_frames"), ({"fps": 30}, "fps"), ({"width": 640}, "width"),
                           ({"seconds": "4", "num_frames": 9}, "num_frames"), ({"mystery": 1}, "mystery")]:
            r = client.post("/v1/videos", json={**body, **bad})
            assert r.status_code == 422 and r.json()["error"]["field"] == field, (bad, r.json())
        r = client.post("/v1/videos", json={**body, "seconds": "4", "num_frames": None, "size": "multitalk-64"})
        assert r.status_code == 200 and client.get(f"/v1/jobs/{r.json()['id']}").json()["request"]["frames"] == 101
        long = client.post("/v1/videos", json={**body, "seconds": "12", "num_frames": None}).json()
        job = client.get(f"/v1/jobs/{long['id']}").json()["request"]
        assert job["mode"] == "streaming" and job["max_frames"] == 301
        # An http(s) URL is read only as an object of a bucket the input rules allow (with
        # the service's credentials), never fetched from the web.
        r = client.post("/v1/videos", json={**body, "audio_reference": {
            "audio_url": "https://multitalk-in.s3.eu-west-1.amazonaws.com/1.wav?X-Amz-Signature=abc"}})
        assert r.status_code == 403 and r.json()["error"]["field"] == "audio_reference", r.json()
        assert "bucket 'multitalk-in' is not one this service reads from" in r.json()["error"]["message"]


def test_openai_video_reference_on_an_infinitetalk_server(tmp_path):
    """On an InfiniteTalk server a video to dub comes as ``video_reference`` (an object or a
    file part), or as a video file given as ``input_reference``; the native job is a dub."""
    _, service, store = _serve(tmp_path, model="infinitetalk")
    store.put("clip.mp4", b"\x00\x00\x00\x18ftypisom-source")
    with TestClient(create_app(service)) as client:
        speech = {"audio_reference": {"audio_url": "1.wav"}}
        r = client.post("/v1/videos", json={"video_reference": {"video_url": "clip.mp4"}, **speech,
                                            "model": "infinitetalk", "size": "960x960"})
        assert r.status_code == 200, r.text
        job = client.get(f"/v1/jobs/{r.json()['id']}").json()["request"]
        assert job["video"] == "clip.mp4" and job["image"] is None and job["size"] == "infinitetalk-720"
        r = client.post("/v1/videos", files=[("input_reference", ("dub.mp4", b"\x00\x00\x00\x18ftypisom", "video/mp4")),
                                             ("audio_reference", (None, '{"audio_url": "1.wav"}'))])
        assert r.status_code == 200, r.text
        assert client.get(f"/v1/jobs/{r.json()['id']}").json()["request"]["video"].startswith("inputs/uploads/")
        r = client.post("/v1/videos", json={"video_reference": {"video_url": "clip.mp4"},
                                            "input_reference": {"image_url": "multi1.png"}, **speech})
        assert r.status_code == 422 and r.json()["error"]["field"] == "video_reference"
        r = client.post("/v1/videos", json={"input_reference": {"image_url": "multi1.png"}, **speech,
                                            "model": "multitalk"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "model"
        assert "video_reference" in client.get("/openapi.json").json()["components"]["schemas"]["VideoCreate"][
            "properties"]
