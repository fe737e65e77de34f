"""Fuzzing the input loaders and the HTTP submit route with hypothesis.

Random bytes and mutations of the real sample inputs (truncated, bytes flipped, spliced)
go through ``load_speech`` / ``load_image`` and through ``POST /v1/jobs`` (multipart, with
the media decoded at submit): the only acceptable outcomes are success, InputError, or a
4xx answer. Never a 5xx, never another exception. Example counts are capped so the whole
module runs in well under a minute on 2 cores.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from multitalk.api import InputError
from multitalk.utils.audio import load_speech
from multitalk.utils.image import load_image

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def _seed_audio() -> list[bytes]:
    out = []
    real = FIXTURES / "multi1" / "1.wav"  # 1.8 s, 44.1 kHz stereo
    if real.is_file():
        out.append(real.read_bytes())
    t = np.arange(16000) / 16000
    tone = (0.2 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    for fmt in ("WAV", "FLAC"):
        buf = io.BytesIO()
        soundfile.write(buf, tone, 16000, format=fmt)
        out.append(buf.getvalue())
    return out


def _seed_images() -> list[bytes]:
    real = FIXTURES / "multi1" / "multi1.png"
    if real.is_file():
        # A crop of the real picture keeps each example fast (the full one is 3.7 MP).
        base = Image.open(real).convert("RGB").crop((600, 200, 856, 392))
    else:
        base = Image.fromarray(np.random.default_rng(0).integers(0, 256, (192, 256, 3), dtype=np.uint8))
    out = []
    for fmt, img in (("PNG", base), ("JPEG", base), ("PNG", base.convert("RGBA")), ("GIF", base.convert("P"))):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out


AUDIO, IMAGES = _seed_audio(), _seed_images()


@st.composite
def mutated(draw, seeds):
    data = bytearray(draw(st.sampled_from(seeds)))
    kind = draw(st.sampled_from(["truncate", "flip", "splice", "header", "random"]))
    if kind == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif kind == "flip":
        for _ in range(draw(st.integers(1, 16))):
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
    elif kind == "splice":
        other = draw(st.sampled_from(AUDIO + IMAGES))
        i, j = draw(st.integers(0, len(data))), draw(st.integers(0, len(other)))
        data = data[:i] + other[j:]
    elif kind == "header":  # damage only the first bytes (magic, sizes, chunk tables)
        for _ in range(draw(st.integers(1, 6))):
            i = draw(st.integers(0, min(63, len(data) - 1)))
            data[i] = draw(st.integers(0, 255))
    else:
        data = bytearray(draw(st.binary(max_size=2048)))
    return bytes(data)


FAST = settings(max_examples=40, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FAST
@given(mutated(AUDIO))
def test_fuzz_audio_loader(data):
    try:
        speech = load_speech(data, field="audio_1", max_seconds=30)
    except InputError as e:
        assert e.field == "audio_1" and e.status in (413, 422) and e.message
    else:
        assert speech.ndim == 1 and np.isfinite(speech).all()


@FAST
@given(mutated(IMAGES))
def test_fuzz_image_loader(data):
    try:
        image = load_image(data, max_pixels=4_000_000)
    except InputError as e:
        assert e.field == "condition_image" and e.status in (413, 422) and e.message
    else:
        assert image.mode == "RGB"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from deployments.auth import KeyRing
    from fakes import FakeStages, fake_generate

    from deployments.routes import create_app
    from deployments.service import JobService, ServiceSettings
    from deployments.storage import LocalStore

    tmp = tmp_path_factory.mktemp("fuzz")
    service = JobService(store=LocalStore(tmp / "store"), stages=FakeStages(), generate_fn=fake_generate,
                         settings=ServiceSettings(precheck_inputs=True, max_queued_jobs=10_000, persist_interval_s=0.5,
                                                  limits={"max_image_pixels": 4_000_000, "max_audio_seconds": 30}))
    with TestClient(create_app(service, keyring=KeyRing()), raise_server_exceptions=True) as c:
        yield c


def _post(client, image: bytes, audio: bytes, options: str = '{"frames": 5, "sampling": {"steps": 1}}'):
    return client.post("/v1/jobs", files=[("image", ("i.png", image)), ("audio", ("a.wav", audio))],
                       data={"request": options})


HTTP = settings(max_examples=25, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])


@HTTP
@given(audio=mutated(AUDIO))
def test_fuzz_http_audio(client, audio):
    r = _post(client, IMAGES[0], audio)
    assert r.status_code == 202 or 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 202:
        assert r.json()["error"]["field"] in ("audio[0]", "audio"), r.json()


@HTTP
@given(image=mutated(IMAGES))
def test_fuzz_http_image(client, image):
    r = _post(client, image, AUDIO[-1])
    assert r.status_code == 202 or 400 <= r.status_code < 500, (r.status_code, r.text)
    if r.status_code != 202:
        assert r.json()["error"]["field"] == "image", r.json()


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.one_of(
    st.binary(max_size=512),
    st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                 lambda c: st.lists(c, max_size=4) | st.dictionaries(st.sampled_from(
                     ["image", "audio", "frames", "bbox", "prompt", "sampling", "output", "input", "action",
                      "audio_1", "condition_image", "size", "mode"]), c, max_size=6),
                 max_leaves=12).map(lambda v: json.dumps(v).encode()),
))
def test_fuzz_http_json_bodies(client, body):
    for route in ("/v1/jobs", "/run"):
        r = client.post(route, content=body, headers={"content-type": "application/json"})
        assert r.status_code < 500, (route, body, r.status_code, r.text)
