"""Speech input: decode uploaded audio (or a video's audio track) to 16 kHz mono.

The result follows the official ``generate_multitalk.py`` audio path
(``audio_prepare_single`` / ``loudness_norm`` / ``audio_prepare_multi``): mono float32
at 16 kHz (channel mean, then librosa's default ``soxr_hq`` resampler, as ``librosa.load``
does) loudness-normalised to -23 LUFS with pyloudnorm.

Decoding never leaves files behind: wav/flac/ogg/mp3 are decoded in memory with
libsndfile; anything else (mp4/mov/mkv/m4a/...) goes through the imageio-ffmpeg binary,
reading a private temporary copy (mp4 needs a seekable input when its index is at the
end) that is deleted before returning, with the decoded PCM coming back on a pipe.
"""
from __future__ import annotations

import io
import os
import struct
import subprocess
import tempfile
import warnings
from typing import Literal, Optional

import numpy as np

from multitalk.api import InputError

from .ffmpeg import ffmpeg_exe
from .probe import UnreadableMedia, probe

TARGET_LUFS = -23.0
# Peak below this (about -80 dBFS) counts as "no speech at all".
SILENCE_PEAK = 1e-4
# pyloudnorm's gating block: integrated loudness is undefined for shorter signals.
LOUDNESS_BLOCK_SECONDS = 0.4


def loudness_normalize(speech: np.ndarray, sample_rate: int = 16000, target_lufs: float = TARGET_LUFS) -> np.ndarray:
    """Scale ``speech`` (float, [N] samples) to ``target_lufs`` integrated loudness.

    Same rule as the official ``loudness_norm``: leave the signal unchanged when the
    measured loudness is not finite or its magnitude exceeds 100 LUFS (silence or
    near-silence). Signals shorter than pyloudnorm's 0.4 s gating block cannot be
    measured (the official code would crash there) and are returned unchanged too.
    The output is not clipped (as in the official code), so peaks may exceed 1.0.
    """
    import pyloudnorm

    if speech.shape[0] < int(LOUDNESS_BLOCK_SECONDS * sample_rate) + 1:
        return speech
    meter = pyloudnorm.Meter(sample_rate)
    loudness = meter.integrated_loudness(speech)
    if not np.isfinite(loudness) or abs(loudness) > 100:
        return speech
    with warnings.catch_warnings():
        # pyloudnorm warns about possible clipping; the official code keeps those peaks.
        warnings.simplefilter("ignore")
        return pyloudnorm.normalize.loudness(speech, loudness, target_lufs)


# ---------------------------------------------------------------------------------------
# Decoding


def _wav_truncation(data: bytes) -> Optional[tuple[int, int]]:
    """For a RIFF/WAVE file, (declared data bytes, present data bytes) when the data chunk
    is shorter than its header says, else None.

    libsndfile silently clamps a cut-off WAV to the bytes present, which would turn an
    interrupted upload into a shorter (wrong) speech track; we reject those instead.
    Streaming writers put 0 or 0xFFFFFFFF in the size field: those are not truncation.
    """
    if len(data) < 12 or data[:4] not in (b"RIFF", b"RIFX") or data[8:12] != b"WAVE":
        return None
    endian = "<" if data[:4] == b"RIFF" else ">"
    offset = 12
    while offset + 8 <= len(data):
        chunk_id = data[offset : offset + 4]
        (chunk_size,) = struct.unpack(endian + "I", data[offset + 4 : offset + 8])
        if chunk_id == b"data":
            present = len(data) - (offset + 8)
            if chunk_size in (0, 0xFFFFFFFF):
                return None
            return (chunk_size, present) if chunk_size > present else None
        offset += 8 + chunk_size + (chunk_size & 1)  # chunks are word aligned
    return None


def _decode_with_soundfile(data: bytes, field: str, max_seconds: float):
    """Decode wav/flac/ogg/mp3 in memory. Returns (samples [N, C] float32, rate) or None
    when libsndfile does not recognise the container (the caller then tries ffmpeg)."""
    import soundfile

    try:
        info = soundfile.info(io.BytesIO(data))
    except Exception:
        return None
    if info.samplerate <= 0 or info.channels <= 0:
        return None
    # Header duration first, so a huge file is refused before it is decoded.
    if info.frames > 0 and info.frames / info.samplerate > max_seconds:
        raise InputError(
            field, f"audio is {info.frames / info.samplerate:.1f} s long; the limit is {max_seconds:g} s", 413
        )
    truncated = _wav_truncation(data)
    if truncated is not None:
        declared, present = truncated
        raise InputError(field, f"truncated WAV file: header declares {declared} data bytes, only {present} present")
    try:
        samples, rate = soundfile.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as exc:
        raise InputError(field, f"audio could not be decoded ({exc})") from exc
    return samples, rate


def _decode_with_ffmpeg(data: bytes, field: str, max_seconds: float, sample_rate: int) -> np.ndarray:
    """Decode the first audio stream of any ffmpeg-readable container (mp4/mov/mkv/m4a/
    webm/...) to mono float32 at ``sample_rate``. Returns [N] samples."""
    ffmpeg = ffmpeg_exe()
    with tempfile.TemporaryDirectory(prefix="multitalk-audio-") as tmp:
        source = os.path.join(tmp, "input")
        with open(source, "wb") as handle:
            handle.write(data)
        try:
            info = probe(source)
        except UnreadableMedia:
            raise InputError(field, "not a recognised audio or video file") from None
        if info.first("audio") is None:
            raise InputError(field, "the file has no audio track")
        seconds = info.duration
        if seconds is not None and seconds > max_seconds:
            raise InputError(field, f"audio is {seconds:.1f} s long; the limit is {max_seconds:g} s", 413)
        # -t caps the decode for containers whose header carries no duration; the
        # length is checked again below. ffmpeg's stereo->mono downmix is the channel
        # mean, as librosa's to_mono.
        command = [
            ffmpeg, "-hide_banner", "-loglevel", "error", "-nostdin",
            "-i", source, "-map", "0:a:0", "-vn",
            "-t", f"{max_seconds + 1.0:.3f}",
            "-ac", "1", "-ar", str(sample_rate), "-f", "f32le", "pipe:1",
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, timeout=600)
        if result.returncode != 0:
            tail = result.stderr.decode("utf-8", "replace")[-500:]
            raise InputError(field, f"audio track could not be decoded: {tail.strip()}")
    return np.frombuffer(result.stdout, dtype="<f4").astype(np.float32)


def load_speech(
    data: bytes,
    field: str = "audio_1",
    max_seconds: float = 300.0,
    sample_rate: int = 16000,
) -> np.ndarray:
    """Decode one speaker's audio file to the model's speech input.

    ``data``: file bytes: wav/flac/ogg/mp3, or a video container with an audio track
    (mp4/mov/mkv/...); any sample rate and channel count.
    Returns float32 [N] mono samples at ``sample_rate`` Hz (N = seconds * sample_rate),
    loudness-normalised to -23 LUFS (official ``loudness_norm`` rule).

    Raises ``InputError(field, ...)`` for: empty input, bytes that are not audio,
    undecodable or truncated files, files without an audio track, audio longer than
    ``max_seconds`` (checked on the header duration before decoding where the format
    carries one; status 413), and audio that is empty or silent after decoding.
    """
    if not data:
        raise InputError(field, "empty file")
    decoded = _decode_with_soundfile(data, field, max_seconds)
    if decoded is not None:
        samples, native_rate = decoded
        # librosa.load order: channel mean, then resample.
        speech = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
        if native_rate != sample_rate and speech.shape[0] > 0:
            import librosa

            speech = librosa.resample(speech, orig_sr=native_rate, target_sr=sample_rate, res_type="soxr_hq")
    else:
        speech = _decode_with_ffmpeg(data, field, max_seconds, sample_rate)

    if speech.shape[0] == 0:
        raise InputError(field, "the audio contains no samples")
    if speech.shape[0] > max_seconds * sample_rate:
        raise InputError(
            field, f"audio is longer than the limit of {max_seconds:g} s", 413
        )
    if not np.all(np.isfinite(speech)):
        raise InputError(field, "the audio contains invalid (NaN/inf) samples")
    if float(np.max(np.abs(speech))) < SILENCE_PEAK:
        raise InputError(field, "the audio is silent")
    speech = loudness_normalize(speech.astype(np.float64), sample_rate)
    return np.ascontiguousarray(speech, dtype=np.float32)


def combine_speakers(
    speeches: list[np.ndarray], audio_type: Literal["add", "para"] = "add"
) -> tuple[list[np.ndarray], np.ndarray]:
    """Lay out one to four speakers' speech on a common timeline.

    ``speeches``: per speaker float [N_i] samples (16 kHz). Returns
    ``(per_speaker, mixed)``: each speaker's track on the shared timeline (all the same
    length) and their sum (what ends up in the output video's soundtrack).

    Official ``audio_prepare_multi`` semantics, generalised to more speakers as
    ComfyUI-WanVideoWrapper does:
    - ``add``: each speaker starts when the one before ends: track i = zeros(N_1 + ... +
      N_{i-1}) + s_i + zeros(N_{i+1} + ...) (length N_1 + ... + N_P each).
    - ``para``: all speak at the same time from t=0.
    One speaker: returned unchanged (mixed is the same array).
    """
    from multitalk.api import MAX_SPEAKERS

    if audio_type not in ("add", "para"):
        raise InputError("audio_type", f"must be 'add' or 'para', got {audio_type!r}")
    if len(speeches) == 1:
        return [speeches[0]], speeches[0]
    if not 2 <= len(speeches) <= MAX_SPEAKERS:
        raise InputError("audio", f"1 to {MAX_SPEAKERS} speakers are supported, got {len(speeches)}")
    speeches = [np.asarray(s, dtype=np.float32) for s in speeches]
    lengths = [s.shape[0] for s in speeches]
    if audio_type == "add":
        tracks = [np.concatenate([np.zeros(sum(lengths[:i]), dtype=np.float32), s,
                                  np.zeros(sum(lengths[i + 1:]), dtype=np.float32)])
                  for i, s in enumerate(speeches)]
    else:
        # The official code leaves para tracks at their own lengths (and its sum then
        # only works when they are equal); we zero-pad the shorter ones at the end so all
        # tracks and the mix share one length.
        length = max(lengths)
        tracks = [np.pad(s, (0, length - s.shape[0])) for s in speeches]
    mixed = tracks[0] + tracks[1]
    for track in tracks[2:]:
        mixed = mixed + track
    return tracks, mixed
