"""Synthetic media and request helpers for the HTTP hardening tests (test_input_validation,
test_confinement, test_auth, test_faults, test_overload).

Real media decoded by the library at submit (``precheck_inputs``), over a FastAPI
TestClient on ``create_app(service)`` with the fake stages of tests/fakes.py.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import soundfile
from fakes import FakeStages, fake_generate
from fastapi.testclient import TestClient
from PIL import Image

from deployments.auth import KeyRing
from deployments.routes import create_app
from deployments.service import JobService, ServiceSettings
from deployments.storage import LocalStore

RATE = 16000


# --- media -------------------------------------------------------------------------------


def tone(seconds=2.0, rate=RATE, channels=1):
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.2 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def wav(samples, rate=RATE, fmt="WAV", subtype=None) -> bytes:
    buf = io.BytesIO()
    soundfile.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def png(image: Image.Image, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def face(w=256, h=192, mode="RGB") -> Image.Image:
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return Image.fromarray(noise).convert(mode)


def bomb_png(width: int, height: int) -> bytes:
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    idat = zlib.compress(b"\0" * (width // 8 + 1) * 16)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


# --- app ---------------------------------------------------------------------------------


def make(tmp_path, stages=None, keyring=None, generate_fn=fake_generate, **settings):
    store = LocalStore(tmp_path / "store")
    for name, data in {"1.wav": wav(tone()), "2.wav": wav(tone(2.5)), "face.png": png(face())}.items():
        if not store.exists(name):
            store.put(name, data)
    limits = {"max_steps": 200, **settings.pop("limits", {})}  # long fake jobs for the cancel/deadline tests
    settings = {"persist_interval_s": 0.05, "precheck_inputs": True, "models_root": str(tmp_path),
                "limits": limits, **settings}
    service = JobService(store=store, stages=stages or FakeStages(), settings=ServiceSettings(**settings),
                         generate_fn=generate_fn)
    return TestClient(create_app(service, keyring=keyring or KeyRing())), service, store


def body(**kw):
    return {"image": "face.png", "audio": ["1.wav"], "prompt": "hi", "frames": 9, "sampling": {"steps": 2}, **kw}


def upload(client, image=None, audio=None, options=None, headers=None):
    files = [("image", ("face.png", png(face()) if image is None else image))]
    for a in (audio if audio is not None else [wav(tone())]):
        files.append(("audio", ("a.wav", a)))
    return client.post("/v1/jobs", files=files, data={"request": json.dumps(options or {"frames": 9})},
                       headers=headers or {})


def err(r, status, field=None, text=None):
    assert r.status_code == status, (r.status_code, r.text)
    e = r.json()["error"]
    if field is not None:
        assert e["field"] == field, e
    if text is not None:
        assert text in e["message"], e
    return e



KEYS = "acme:key-acme-1,globex:key-globex"
A = {"Authorization": "Bearer key-acme-1"}
G = {"Authorization": "Bearer key-globex"}


@pytest.fixture
def app(tmp_path):
    client, service, store = make(tmp_path)
    with client:
        yield client, service, store
