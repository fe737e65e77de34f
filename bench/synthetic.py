"""Synthetic inputs for the benches (no fixtures needed)."""
from __future__ import annotations

import io

import numpy as np


def speech_wav(seconds: float, seed: int = 0) -> bytes:
    """Speech-like test audio: noise bursts under a syllable-rate envelope, as 16 kHz wav bytes."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16000)) / 16000
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 0.7 * t))
    signal = (rng.standard_normal(t.shape) * 0.1 + np.sin(2 * np.pi * 180 * t) * 0.2) * envelope
    buf = io.BytesIO()
    sf.write(buf, signal.astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def noise_png(height: int = 360, width: int = 640, seed: int = 1) -> bytes:
    """A random RGB image as PNG bytes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray((rng.random((height, width, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
