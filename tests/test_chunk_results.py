"""Chunk-by-chunk results in the service (fake driver, no model): each chunk the driver hands
over is stored and listed at once, served as one stream while the job runs, and kept
readable when the job fails late."""
from __future__ import annotations

import asyncio

from fakes import VIDEO, FakeStages, make_client, wait_state

from multitalk.api import GenerationResult, Progress
from multitalk.utils.segments import ChunkSegment


def chunked_driver(fail_after: int = None, chunks: int = 3):
    """Hands over ``chunks`` segments (failing after ``fail_after`` of them, if given)."""

    async def generate(request, stages, progress=None, limits=None, on_chunk=None):
        emit = progress or (lambda p: None)
        for i in range(chunks):
            emit(Progress("diffusion", step=i + 1, total_steps=chunks, chunk=i + 1, total_chunks=chunks))
            await asyncio.sleep(0.05)
            if on_chunk is not None:
                await on_chunk(ChunkSegment(i, b"INIT", f"SEG{i}".encode(), 12, 12 * (i + 1), 0.48 * i, 0.48))
            if fail_after is not None and i + 1 == fail_after:
                raise RuntimeError("the GPU fell over")
        return GenerationResult(VIDEO, 12 * chunks, 25, 64, 48, chunks, True)

    return generate


def _client(tmp_path, driver):
    client, service, store = make_client(tmp_path)
    service.runner.generate_fn = driver
    return client, store


def test_a_job_that_fails_late_keeps_its_finished_chunks_readable(tmp_path):
    client, store = _client(tmp_path, chunked_driver(fail_after=2))
    with client:
        job_id = client.post("/v1/jobs", json={"image": "multi1.png", "audio": ["1.wav"], "mode": "streaming",
                                               "frames": 17, "motion_frames": 5}).json()["id"]
        st = wait_state(client, job_id)
        assert st["state"] == "FAILED" and "fell over" in st["error"]["message"]
        assert [c["index"] for c in st["chunks"]] == [0, 1] and st["chunks"][1]["frames_so_far"] == 24
        assert st["chunks"][0]["key"] == f"outputs/{job_id}.chunks/00000.m4s"
        r = client.get(f"/v1/jobs/{job_id}/video")
        assert r.status_code == 200 and r.content == b"INITSEG0SEG1"  # init + the segments, in order
        assert r.headers["x-multitalk-chunks"] == "2/3" and r.headers["content-type"] == "video/mp4"
        playlist = client.get(f"/v1/jobs/{job_id}/chunks/index.m3u8").text
        assert "#EXT-X-ENDLIST" in playlist and "00001.m4s" in playlist  # ended: VOD
        assert client.get(f"/v1/jobs/{job_id}/chunks/00001.m4s").content == b"SEG1"
        assert client.get(f"/v1/jobs/{job_id}/chunks/00002.m4s").status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/chunks/..%2Fx").status_code == 404
    assert store.get(f"outputs/{job_id}.chunks/init.mp4") == b"INIT"


def test_clip_jobs_have_no_chunk_stream_and_completed_jobs_serve_the_mp4(tmp_path):
    client, store = _client(tmp_path, chunked_driver())
    with client:
        clip = client.post("/v1/jobs", json={"image": "multi1.png", "audio": ["1.wav"], "frames": 17}).json()["id"]
        st = wait_state(client, clip)
        assert st["state"] == "COMPLETED" and st["chunks"] == []  # one chunk: nothing to stream
        stream = client.post("/v1/jobs", json={"image": "multi1.png", "audio": ["1.wav"], "mode": "streaming",
                                               "frames": 17, "motion_frames": 5}).json()["id"]
        st = wait_state(client, stream)
        assert len(st["chunks"]) == 3
        r = client.get(f"/v1/jobs/{stream}/video")
        assert r.content == VIDEO and "x-multitalk-chunks" not in r.headers  # finished: the final mp4


def test_a_queued_job_has_no_video_yet(tmp_path):
    stages = FakeStages()
    client, service, _ = make_client(tmp_path, stages=stages, max_concurrent_jobs=1)
    stages.step_delay = 0.2
    with client:
        first = client.post("/v1/jobs", json={"image": "multi1.png", "audio": ["1.wav"], "frames": 9,
                                              "sampling": {"steps": 50}}).json()["id"]
        queued = client.post("/v1/jobs", json={"image": "multi1.png", "audio": ["1.wav"], "frames": 9}).json()["id"]
        assert client.get(f"/v1/jobs/{queued}/video").status_code == 409
        assert client.get(f"/v1/jobs/{queued}/chunks/index.m3u8").status_code == 409
        client.delete(f"/v1/jobs/{first}")
