"""End to end on a local Ray: the real graph from ``pipeline_graph.build_app``.

One Ray start for the module. ``test_graph_with_fake_stages`` runs the whole serving
path (HTTP -> ingress -> five stage deployments -> store) with stand-in stage classes
and driver defined here (selected through the app's ``stage_classes`` / ``ingress.driver``
args), so it needs no model. ``test_tiny_model`` runs the real library on tiny weights and
is skipped until ``multitalk.stages`` / ``multitalk.driver`` exist.

Ray workers import this module by name (``test_serve_e2e``): the fixture puts ``tests/``
and the repository root on their PYTHONPATH.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from conftest import local_serve

pytestmark = [pytest.mark.serve, pytest.mark.slow, pytest.mark.timeout(600)]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VIDEO = b"\x00\x00\x00\x18ftypmp42fake-video-from-ray"


# --- stand-ins, instantiated inside the stage replicas ---------------------------------


class _FakeStage:
    def __init__(self, root):
        self.root = Path(root)

    @classmethod
    def from_pretrained(cls, models_root, device="cpu", dtype=None):
        assert Path(models_root).is_dir(), models_root
        return cls(models_root)


class FakeAudioStage(_FakeStage):
    def encode(self, speeches):
        return [len(s) for s in speeches]


class FakeImageStage(_FakeStage):
    def encode(self, cond_pixels, frames):
        return {"ref": len(cond_pixels), "frames": frames}


class FakeTextStage(_FakeStage):
    def encode(self, prompt, negative_prompt):
        return {"prompt": prompt}


class FakeDiffusionStage(_FakeStage):
    lip_sync = False

    def sample(self, job, audio, image, text, on_step=None):
        try:
            for i in range(job["steps"]):
                time.sleep(job.get("delay", 0.0))
                if on_step:
                    on_step(i + 1, job["steps"])
        except Exception as e:  # the replica's StageCancelled: leave a trace for the test
            (self.root / f"stopped-{job['tag']}").write_text(type(e).__name__)
            raise
        assert audio == [8] and image["ref"] == 9 and text == {"prompt": job["tag"]}, (audio, image, text)
        return {"latents": job["steps"]}


class FakeDecodeStage(_FakeStage):
    def decode_chunk(self, latents, request):
        from multitalk.stages import DecodedChunk

        return DecodedChunk({"frames": latents})


async def fake_driver(request, stages, progress=None, limits=None, on_chunk=None):
    """Calls the stages like multitalk.driver.generate: the encoders' handles go
    un-awaited into the DiT call (chained by Serve), the DiT result into the decoder."""
    from multitalk.api import GenerationResult, Progress
    from multitalk.stages import DecodeRequest

    emit = progress or (lambda p: None)
    await stages.prepare()
    emit(Progress(stage="encode"))
    audio = stages.audio_encode([request.audio[0]])
    text = stages.text_encode(request.prompt, "")
    image = stages.image_encode(request.image, request.frames)
    steps = request.sampling.steps
    job = {"steps": steps, "delay": 0.15 if request.prompt.startswith("slow") else 0.02, "tag": request.prompt}
    latents = stages.diffusion_sample(
        job, audio, image, text, lambda i, n: emit(Progress(stage="diffusion", step=i, total_steps=n))
    )
    assert await audio == [len(request.audio[0])]  # handles may be awaited again
    await latents
    emit(Progress(stage="decode", step=steps, total_steps=steps))
    decoded = await stages.vae_decode(latents, DecodeRequest())
    assert decoded.frames == {"frames": {"latents": steps}} and decoded.motion is None, decoded
    return GenerationResult(video=VIDEO, num_frames=request.frames or 81, fps=25, width=32, height=32,
                            chunks=1, lip_sync=stages.lip_sync, timings={"diffusion": 0.1})


# --- stand-ins for the real chunk loop (multitalk.driver's MultiTalkLoop): no model, the real
# contract of each stage at the request's real shapes ---------------------------------


class LoopAudioStage(_FakeStage):
    def encode(self, speeches):
        import torch

        gone = self.root / "audio-gone-once"  # the test's cue: this call's replica 'vanishes'
        try:
            gone.unlink()
        except FileNotFoundError:
            return torch.zeros(len(speeches), 4, 1, 1)
        from ray.exceptions import ActorUnavailableError

        # What the caller sees of a replica whose node stopped answering: the result of this
        # call, which travels un-awaited into the DiT call, is this error.
        raise ActorUnavailableError("its node stopped answering (test)", None)


class LoopImageStage(_FakeStage):
    def encode(self, cond_pixels, frames):
        return {"frames": frames, "conditioned_on": int(cond_pixels.shape[1])}


class LoopTextStage(_FakeStage):
    def encode(self, prompt, negative_prompt):
        return prompt


class LoopDiffusionStage(_FakeStage):
    lip_sync = True

    def sample(self, job, audio, image, text, on_step=None):
        import torch

        # Chunk 0 is conditioned on the reference image, every later one on the previous chunk's
        # motion frames, which the image encoder received from the decoder through the object store.
        assert image["conditioned_on"] == (1 if job.audio_start == 0 else 5), image
        try:
            for i in range(job.steps):
                time.sleep(0.2 if text.startswith("slow") else 0.0)
                if on_step:
                    on_step(i + 1, job.steps)
        except Exception as e:  # the replica's StageCancelled: leave a trace for the test
            (self.root / f"stopped-{text}").write_text(type(e).__name__)
            raise
        h, w = job.latent_hw
        return torch.full((16, 1 + (job.frames - 1) // 4, h, w), float(job.seed))


class LoopDecodeStage(_FakeStage):
    def decode_chunk(self, latents, request):
        """``DecodeStage.decode_chunk``'s contract: uint8 frames at 8x the latents, float motion frames."""
        import numpy as np
        import torch

        from multitalk.stages import DecodedChunk

        _, n_t, h, w = latents.shape
        count = 1 + 4 * (n_t - 1) - request.first if request.count is None else request.count
        frames = np.full((count, 8 * h, 8 * w, 3), int(latents[0, 0, 0, 0]) % 256, np.uint8)
        motion = torch.zeros(3, request.motion_frames, 8 * h, 8 * w) if request.motion_frames else None
        return DecodedChunk(frames, motion)


async def watching_driver(request, stages, progress=None, limits=None, on_chunk=None):
    """``multitalk.driver.generate``, watched from inside the ingress: each time a chunk's
    frames arrive, how many chunks' frames are still alive (weak references) and how many
    calls the job's tracker holds. Reported in the result's timings."""
    import weakref

    from multitalk.driver import generate

    refs, alive, tracked = [], [], []
    decode = stages.vae_decode

    def watched(latents, wanted):
        task = decode(latents, wanted)

        def arrived(t):
            if not t.cancelled() and t.exception() is None:
                refs.append(weakref.ref(t.result().frames))
                alive.append(sum(r() is not None for r in refs))
                tracked.append(len(stages.calls))

        task.add_done_callback(arrived)
        return task

    stages.vae_decode = watched  # this job's view only
    result = await generate(request, stages, progress, limits, on_chunk)
    result.timings.update(chunks_decoded=len(refs), most_frames_alive=max(alive), most_calls_tracked=max(tracked),
                          calls_tracked_after=len(stages.calls))
    return result


# --- fixtures --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def serve_env(tmp_path_factory):
    with local_serve(tmp_path_factory.mktemp("serve"), num_cpus=2, namespace="serve") as env:
        yield env


def _wait(url, job_id, timeout=120, states=("COMPLETED", "FAILED", "CANCELLED")):
    import requests

    seen_steps = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()
        if body["progress"]["stage"] == "diffusion":
            seen_steps.add(body["progress"]["step"])
        if body["state"] in states:
            return body, seen_steps
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not reach {states}: {body}")


def test_graph_with_fake_stages(serve_env):
    import requests
    from ray import serve

    from deployments.schemas import JobRequest
    from pipeline_graph import build_app

    url, tmp = serve_env
    models, store_dir = tmp / "models", tmp / "store"
    models.mkdir()
    store_dir.mkdir()
    (store_dir / "1.wav").write_bytes(b"RIFF-one")
    (store_dir / "multi1.png").write_bytes(b"PNG-image")
    mod = "test_serve_e2e"
    app = build_app({
        "models_root": str(models),
        "device": "cpu",
        "stage_classes": {
            "audio": f"{mod}:FakeAudioStage", "image": f"{mod}:FakeImageStage", "text": f"{mod}:FakeTextStage",
            "diffusion": f"{mod}:FakeDiffusionStage", "decode": f"{mod}:FakeDecodeStage",
        },
        "store": {"local_root": str(store_dir)},
        "ingress": {"driver": f"{mod}:fake_driver", "persist_interval_s": 0.1, "precheck_inputs": False,
                    "limits": {"max_steps": 200}},
    })
    serve.run(app, name="multitalk", route_prefix="/")
    try:
        body = {"image": "multi1.png", "audio": ["1.wav"], "prompt": "slow", "frames": 5, "sampling": {"steps": 12}}
        r = requests.post(f"{url}/v1/jobs", json=body, timeout=30)
        assert r.status_code == 202, r.text
        status, steps = _wait(url, r.json()["id"])
        assert status["state"] == "COMPLETED", status
        assert len(steps) >= 2, f"per-step progress not visible: {steps}"  # streamed from the Diffusion replica
        assert status["result"]["key"] == f"outputs/{status['id']}.mp4"
        assert status["result"]["lip_sync"] is False  # asked from the Diffusion replica
        assert requests.get(f"{url}/v1/jobs/{status['id']}/video", timeout=30).content == VIDEO
        assert (store_dir / "jobs" / f"{status['id']}.json").is_file()

        # Bad input through Serve keeps its 4xx + field.
        r = requests.post(f"{url}/v1/jobs", json={**body, "audio": ["../../etc/passwd"]}, timeout=30)
        assert r.status_code == 422 and r.json()["error"]["field"] == "audio[0]", r.text

        # Python handle (as another Ray app would use it).
        handle = serve.get_app_handle("multitalk")
        final = handle.generate.remote(
            JobRequest(image="multi1.png", audio=["1.wav"], prompt="handle", frames=5, sampling={"steps": 3})
        ).result(timeout_s=120)
        assert final.state.value == "COMPLETED" and final.result.frames == 5

        # Cancel mid-diffusion: the sampler thread in the Diffusion replica stops too.
        r = requests.post(f"{url}/v1/jobs", json={**body, "prompt": "slow-cancel", "sampling": {"steps": 200}},
                          timeout=30)
        job_id = r.json()["id"]
        _wait_for_progress(url, job_id, "step", 2, timeout=60)
        _cancel_and_see_the_sampler_stop(url, job_id, models / "stopped-slow-cancel")

        # The CLI client: multipart upload of local files, progress, download.
        from multitalk.client import submit

        (tmp / "up.wav").write_bytes(b"RIFF-one")
        (tmp / "up.png").write_bytes(b"PNG-image")
        final = submit(url, str(tmp / "up.png"), str(tmp / "up.wav"), prompt="client", wait=True,
                       out=str(tmp / "client.mp4"), progress=False, poll_interval=0.1,
                       options={"frames": 5, "sampling": {"steps": 3}})
        assert final["state"] == "COMPLETED" and (tmp / "client.mp4").read_bytes() == VIDEO

        # RunPod contract through Serve.
        r = requests.post(f"{url}/runsync", json={"input": {"action": "generate", "audio_1": "1.wav",
                                                            "condition_image": "multi1.png", "frames": 5,
                                                            "sample_steps": 2, "output_format": "s3"}}, timeout=120)
        assert r.json()["status"] == "COMPLETED", r.json()
        assert r.json()["output"]["video_key"].startswith("outputs/")
    finally:
        serve.delete("multitalk")


def test_tiny_model(serve_env, fixtures_dir, embedded_cache):
    """The real library on tiny random weights (skipped until it lands)."""
    import requests
    from ray import serve

    from pipeline_graph import build_app

    url, tmp = serve_env
    store_dir = tmp / "store-tiny"
    store_dir.mkdir()
    (store_dir / "1.wav").write_bytes((fixtures_dir / "single" / "1.wav").read_bytes())
    (store_dir / "single1.png").write_bytes((fixtures_dir / "single" / "single1.png").read_bytes())
    app = build_app({"device": "cpu", "dtype": "float32", "cache_dir": embedded_cache,
                     # stage_options reach the stages' from_pretrained (an unknown option would fail start-up)
                     "stage_options": {"diffusion": {"batch_guidance": True}},
                     "store": {"local_root": str(store_dir)}, "ingress": {"persist_interval_s": 0.2}})
    serve.run(app, name="multitalk-tiny", route_prefix="/")
    try:
        body = {"image": "single1.png", "audio": ["1.wav"], "prompt": "a person talking", "frames": 5,
                "size": "multitalk-128", "sampling": {"steps": 2}}
        r = requests.post(f"{url}/v1/jobs", json=body, timeout=60)
        assert r.status_code == 202, r.text
        status, _ = _wait(url, r.json()["id"], timeout=480)
        assert status["state"] == "COMPLETED", status
        video = requests.get(f"{url}/v1/jobs/{status['id']}/video", timeout=60).content
        assert video[4:8] == b"ftyp"
        assert status["result"]["lip_sync"] is True and status["progress"]["total_steps"] == 2
        assert {"encode", "diffusion", "decode", "mux"} <= set(status["timings"]), status["timings"]
        models = requests.get(f"{url}/v1/models", timeout=60).json()
        assert models["kind"] == "multitalk" and models["ready"], models
        # What the running Diffusion replica was built with: the config's lever reached it.
        loaded = serve.get_deployment_handle("Diffusion", app_name="multitalk-tiny").loaded_with.remote().result()
        assert loaded["options"] == {"batch_guidance": True} and loaded["stage"] == "diffusion", loaded
        assert loaded["class"] == "multitalk.stages:DiffusionStage"
    finally:
        serve.delete("multitalk-tiny")


@pytest.fixture(scope="module")
def loop_app(serve_env, fixtures_dir):
    """The real chunk loop and ServeStages over Serve with the model-free ``Loop*`` stages;
    yields ``(url, models_dir)`` (the stages' root, where they leave their traces)."""
    from ray import serve

    from pipeline_graph import build_app

    url, tmp = serve_env
    models, store_dir = tmp / "models-long", tmp / "store-long"
    models.mkdir()
    store_dir.mkdir()
    (store_dir / "1.wav").write_bytes((fixtures_dir / "single" / "1.wav").read_bytes())
    (store_dir / "single1.png").write_bytes((fixtures_dir / "single" / "single1.png").read_bytes())
    mod = "test_serve_e2e"
    app = build_app({
        "models_root": str(models), "device": "cpu",
        "stage_classes": {name: f"{mod}:Loop{cls}Stage" for name, cls in (
            ("audio", "Audio"), ("image", "Image"), ("text", "Text"), ("diffusion", "Diffusion"), ("decode", "Decode"))},
        "store": {"local_root": str(store_dir)},
        "ingress": {"driver": f"{mod}:watching_driver", "persist_interval_s": 0.1, "stage_retry_backoff_s": 0.2},
    })
    serve.run(app, name="multitalk-long", route_prefix="/")
    try:
        yield url, models
    finally:
        serve.delete("multitalk-long")


LOOP_JOB = {"image": "single1.png", "audio": ["1.wav"], "prompt": "long", "mode": "streaming", "frames": 17,
            "motion_frames": 5, "size": "multitalk-64", "sampling": {"steps": 2}}


def test_an_encoder_result_lost_on_its_way_to_the_dit_reruns_the_job(loop_app):
    """Seen in the cluster drill: an encoder's node stopped answering after taking the call,
    so its result (handed un-awaited to the DiT call) was an ActorUnavailableError. Chained
    as a Serve argument, Ray Serve's router blamed the DiT replica and re-routed the DiT call
    forever: the job hung at "encode". The DiT replica now resolves its inputs itself, and
    a lost one re-runs the job."""
    import requests

    url, models = loop_app
    (models / "audio-gone-once").write_text("")
    r = requests.post(f"{url}/v1/jobs", json={**LOOP_JOB, "frames": 9, "prompt": "gone"}, timeout=30)
    assert r.status_code == 202, r.text
    status, _ = _wait(url, r.json()["id"], timeout=90)
    assert status["state"] == "COMPLETED", status
    assert not (models / "audio-gone-once").exists()  # the failure did happen
    assert status["timings"]["stage_retries"] == 1, status["timings"]


def test_a_long_served_job_holds_one_chunk_at_a_time_and_stops_when_cancelled(loop_app):
    """A 22-chunk streaming job holds at most two chunks' frames at any time (the one just
    decoded and the one being encoded), its tracker a bounded number of calls and none at
    the end; the motion frames reach the next chunk's encoder from the decoder. Cancelled
    mid-job, the running sampler stops."""
    import requests

    from multitalk.utils.video import probe_mp4

    url, models = loop_app
    body = LOOP_JOB
    r = requests.post(f"{url}/v1/jobs", json=body, timeout=30)
    assert r.status_code == 202, r.text
    status, _ = _wait(url, r.json()["id"], timeout=300)
    assert status["state"] == "COMPLETED", status
    timings = status["timings"]
    assert status["result"]["chunks"] == timings["chunks_decoded"] >= 20, timings
    assert timings["most_frames_alive"] <= 2 and timings["most_calls_tracked"] <= 2, timings
    assert timings["calls_tracked_after"] == 0, timings
    assert len(status["chunks"]) == status["result"]["chunks"]  # every chunk stored as it was encoded
    video = requests.get(f"{url}/v1/jobs/{status['id']}/video", timeout=60).content
    assert probe_mp4(video)["num_frames"] == status["result"]["frames"]

    r = requests.post(f"{url}/v1/jobs", json={**body, "prompt": "slow-long", "sampling": {"steps": 4}}, timeout=30)
    job_id = r.json()["id"]
    _wait_for_progress(url, job_id, "chunk", 3, timeout=120)
    _cancel_and_see_the_sampler_stop(url, job_id, models / "stopped-slow-long")


def _wait_for_progress(url: str, job_id: str, field: str, at_least: int, timeout: float) -> None:
    """Until the job's ``progress[field]`` reaches ``at_least`` (a running job to cancel)."""
    import requests

    deadline = time.monotonic() + timeout
    while requests.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()["progress"][field] < at_least:
        assert time.monotonic() < deadline, f"progress {field} below {at_least} after {timeout} s"
        time.sleep(0.05)


def _cancel_and_see_the_sampler_stop(url: str, job_id: str, marker) -> None:
    """DELETE answers CANCELLED, and the sampler thread in the Diffusion replica stops too
    (the test's slow stage writes ``marker`` with the exception that stopped it)."""
    import requests

    assert requests.delete(f"{url}/v1/jobs/{job_id}", timeout=60).json()["state"] == "CANCELLED"
    deadline = time.monotonic() + 30
    while not marker.exists():
        assert time.monotonic() < deadline, "the sampler kept running after the cancel"
        time.sleep(0.1)
    assert marker.read_text() == "StageCancelled"
