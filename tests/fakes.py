"""Test doubles shared by the test modules (no test imports another test module).

* :class:`FakeStages`: the driver's ``Stages`` protocol without a model; handles are
  asyncio tasks that may be passed un-awaited into later calls, like the real ones.
* :func:`fake_generate`: shaped like ``multitalk.driver.generate`` (the same stage calls,
  the same progress events), so routing, persistence, progress, cancellation and error
  mapping are tested without any model.
* :func:`make_client`: a TestClient over an in-process JobService with these fakes.
* :func:`http_server`: the same app served over real HTTP (uvicorn in a thread), for the
  client libraries users have (the ``runpod`` and ``openai`` SDKs, schemathesis).
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time

from fastapi.testclient import TestClient

from deployments.routes import create_app
from deployments.service import JobService, ServiceSettings
from deployments.storage import LocalStore
from multitalk.api import GenerationResult, InputError, Progress
from multitalk.utils.segments import ChunkSegment

VIDEO = b"\x00\x00\x00\x18ftypmp42fake-video"


class FakeStages:
    """The driver's ``Stages`` protocol: methods return awaitables (tasks) that may be
    passed un-awaited into later calls. Records calls; the DiT can be slowed down.
    One object serves every job (``for_job`` returns it), so tests see all calls."""

    lip_sync = True

    def __init__(self):
        self.calls: list[str] = []
        self.cancelled: list[str] = []
        self.cancel_calls = 0
        self.step_delay = 0.0

    def for_job(self, job_id=None, retries=None):
        return self

    async def prepare(self):
        return None

    def cancel(self):
        self.cancel_calls += 1

    @staticmethod
    async def _value(v):
        return await v if hasattr(v, "__await__") else v

    def _task(self, name, fn):
        self.calls.append(name)
        return asyncio.ensure_future(fn())

    def audio_encode(self, speeches):
        async def run():
            return [len(s) for s in speeches]
        return self._task("audio", run)

    def image_encode(self, cond_pixels, frames):
        async def run():
            return len(cond_pixels)
        return self._task("image", run)

    def text_encode(self, prompt, negative_prompt):
        async def run():
            return prompt
        return self._task("text", run)

    def diffusion_sample(self, job, audio, image, text, on_step=None):
        async def run():
            await self._value(audio), await self._value(image), await self._value(text)
            try:
                for i in range(job["steps"]):
                    await asyncio.sleep(self.step_delay)
                    if on_step:
                        on_step(i + 1, job["steps"])
            except asyncio.CancelledError:
                self.cancelled.append("diffusion")
                raise
            return "latents"
        return self._task("diffusion", run)

    def vae_decode(self, latents):
        async def run():
            assert await self._value(latents) == "latents"
            return "frames"
        return self._task("decode", run)


async def fake_generate(request, stages, progress=None, limits=None, on_chunk=None):
    """Shaped like multitalk.driver.generate (same stage calls, same progress events)."""
    if request.prompt == "bad-audio":
        raise InputError("audio_1", "could not decode audio")
    if request.prompt == "boom":
        raise RuntimeError("kaboom")
    emit = progress or (lambda p: None)
    await stages.prepare()
    emit(Progress(stage="encode"))
    audio = stages.audio_encode([b"x"] * len(request.audio))
    text = stages.text_encode(request.prompt, "")
    image = stages.image_encode(request.image or request.video, request.frames)  # video: InfiniteTalk
    steps = request.sampling.steps
    latents = stages.diffusion_sample(
        {"steps": steps}, audio, image, text,
        lambda i, n: emit(Progress(stage="diffusion", step=i, total_steps=n)),
    )
    await asyncio.gather(audio, text, image)
    await latents
    emit(Progress(stage="decode", step=steps, total_steps=steps))
    await stages.vae_decode(latents)
    if on_chunk is not None and request.mode == "streaming":  # three chunks, stored as they "finish"
        for i in range(3):
            emit(Progress(stage="decode", step=steps, total_steps=steps, chunk=i, total_chunks=3))
            await on_chunk(ChunkSegment(i, b"fake-init", b"fake-segment-%d" % i, 9, 9 * (i + 1), 0.36 * i, 0.36))
    return GenerationResult(video=VIDEO, num_frames=request.frames or 81, fps=25, width=64, height=48,
                            chunks=1, lip_sync=stages.lip_sync, timings={"diffusion": 0.01})


def make_client(tmp_path, stages=None, **settings):
    store = LocalStore(tmp_path / "store")
    for name, data in {"1.wav": b"RIFFone", "2.wav": b"RIFFtwo", "multi1.png": b"\x89PNG"}.items():
        if not store.exists(name):
            store.put(name, data)
    models = tmp_path / "models"
    (models / "chinese-wav2vec2-base").mkdir(parents=True, exist_ok=True)
    (models / "chinese-wav2vec2-base" / "config.json").write_text('{"model_type": "wav2vec2"}')
    # Fake media bytes: no decoding precheck; limits high enough for the long fake jobs.
    limits = {"max_steps": 200, **settings.pop("limits", {})}
    settings = {"persist_interval_s": 0.05, "models_root": str(models), "precheck_inputs": False,
                "limits": limits, **settings}
    service = JobService(store=store, stages=stages or FakeStages(), settings=ServiceSettings(**settings),
                         generate_fn=fake_generate)
    return TestClient(create_app(service)), service, store


def wait_state(client, job_id, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/v1/jobs/{job_id}").json()
        if body["state"] in states:
            return body
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} stuck in {body['state']}")


def job_body(**kw):
    return {"image": "multi1.png", "audio": ["1.wav"], "prompt": "hi", "frames": 9,
            "sampling": {"steps": 3}, **kw}




def make_bucket(endpoint: str, name: str) -> None:
    """Create an S3 bucket on a moto endpoint (the ``moto_endpoint`` fixture)."""
    import boto3

    boto3.client("s3", region_name="eu-west-1", endpoint_url=endpoint).create_bucket(
        Bucket=name, CreateBucketConfiguration={"LocationConstraint": "eu-west-1"}
    )


@contextlib.contextmanager
def http_server(app):
    """``app`` served on a free loopback port by uvicorn in a thread (lifespan on); yields the
    base URL."""
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


_MP4: list = []


def tiny_mp4() -> bytes:
    """A real 9-frame 32x32 mp4 (H.264 + AAC of a tone), made once per process."""
    if not _MP4:
        import numpy as np

        from multitalk.utils.video import write_mp4

        t = np.arange(int(9 / 25 * 16000)) / 16000
        frames = np.zeros((9, 32, 32, 3), np.uint8)
        frames[:, :, :16] = (200, 40, 40)
        _MP4.append(write_mp4(frames, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), preset="ultrafast"))
    return _MP4[0]


async def mp4_generate(request, stages, progress=None, limits=None, on_chunk=None):
    """:func:`fake_generate`, answering a real (tiny) mp4: for routes that decode the video."""
    result = await fake_generate(request, stages, progress, limits, on_chunk)
    result.video, result.num_frames, result.width, result.height = tiny_mp4(), 9, 32, 32
    return result
