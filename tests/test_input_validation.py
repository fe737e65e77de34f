"""Hardening, input validation over HTTP: bad audio, image, bbox, frames, prompt, action or
JSON; body caps (one test starts a real uvicorn server on loopback to show that an
oversized body is refused from its Content-Length before any of it is sent).
"""
from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest
import numpy as np
from PIL import Image
from fakes import wait_state
from inputs import RATE, app, body, bomb_png, err, face, make, png, tone, upload, wav  # noqa: F401 - app: a fixture

from deployments.auth import BodyLimitMiddleware
from deployments.service import ServiceSettings


# --- 1. input validation -----------------------------------------------------------------


def test_audio_not_audio(app):
    client, *_ = app
    err(upload(client, audio=[b"this is not audio at all " * 40]), 422, "audio[0]", "not a recognised audio")


def test_audio_empty_and_silent(app):
    client, *_ = app
    err(upload(client, audio=[b""]), 422, "audio[0]", "empty")
    err(upload(client, audio=[wav(np.zeros(2 * RATE, np.float32))]), 422, "audio[0]", "silent")


def test_audio_over_default_cap_413(app):
    client, service, _ = app
    assert service.settings.limits.max_audio_seconds == 300
    e = err(upload(client, audio=[wav(np.zeros(301 * 8000, np.float32), 8000, subtype="PCM_U8")]), 413, "audio[0]")
    assert "limit is 300" in e["message"]


def test_audio_cap_configurable(tmp_path):
    client, *_ = make(tmp_path, limits={"max_audio_seconds": 1.0})
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
    client, *_ = make(tmp_path, limits={"max_image_pixels": 1_000_000})
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
    err(client.post("/v1/jobs", json=body(audio=["1.wav", "2.wav", "1.wav", "2.wav", "1.wav"])), 422, "audio")
    # Two or more speakers without bbox: boxes from the faces; this noise image has none.
    err(client.post("/v1/jobs", json=body(audio=["1.wav", "2.wav", "1.wav"])), 422, "bbox", "no face")
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
    import uvicorn
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
