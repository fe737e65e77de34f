"""Output video: mp4 writing (H.264 + AAC) and probing.

Encoding goes through the imageio-ffmpeg binary in subprocesses (one x264 run per chunk,
:mod:`multitalk.utils.segments`; the mp4 remuxed from them, :mod:`multitalk.utils.video_output`);
probing reads the file's structure with PyAV (:mod:`multitalk.utils.probe`).

Colour correction lives in :mod:`multitalk.utils.color` (it runs where frames are decoded).
"""
from __future__ import annotations

import os
import tempfile
import wave
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch


SPEECH_SAMPLE_RATE = 16000


# ---------------------------------------------------------------------------------------
# Writing


def frames_to_uint8(frames: Union[torch.Tensor, np.ndarray]) -> np.ndarray:
    """Video frames -> uint8 [T, H, W, 3] RGB.

    Accepts a float tensor/array [3, T, H, W] in [-1, 1] (the VAE output layout) or uint8
    [T, H, W, 3]. Float values are mapped with (x + 1) / 2 * 255, clipped and rounded
    (the official saver truncates instead; rounding avoids its -0.5 level bias).
    """
    if isinstance(frames, torch.Tensor):
        if frames.dtype == torch.uint8:
            array = frames.cpu().numpy()
        else:  # converted where the tensor is (the decoder's device): only uint8 is copied off it
            if frames.dim() != 4 or frames.shape[0] != 3:
                raise ValueError(f"float frames must be [3, T, H, W] in [-1, 1], got {tuple(frames.shape)}")
            scaled = (frames.detach().to(torch.float32) + 1.0) * 127.5
            return scaled.round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu().numpy()
    else:
        array = np.asarray(frames)
    if array.dtype == np.uint8:
        if array.ndim != 4 or array.shape[-1] != 3:
            raise ValueError(f"uint8 frames must be [T, H, W, 3], got {array.shape}")
        return np.ascontiguousarray(array)
    if array.ndim != 4 or array.shape[0] != 3:
        raise ValueError(f"float frames must be [3, T, H, W] in [-1, 1], got {array.shape}")
    scaled = (array.astype(np.float32) + 1.0) * 127.5
    return np.ascontiguousarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8).transpose(1, 2, 3, 0))


def encoder_frames(frames: Union[torch.Tensor, np.ndarray], limit: int, pad_h: int, pad_w: int) -> np.ndarray:
    """At most ``limit`` frames as uint8 ``[T, H, W, 3]``, odd sizes padded by repeating the
    last row/column (H.264's 4:2:0 needs even sizes)."""
    video = frames_to_uint8(frames)[:limit]
    if pad_h or pad_w:
        video = np.pad(video, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    return video


def write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    """Mono 16-bit PCM WAV (what ffmpeg's AAC encoder is fed)."""
    pcm = np.clip(np.rint(np.asarray(samples, dtype=np.float64) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(path, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())


def write_mp4(
    frames: Union[torch.Tensor, np.ndarray],
    audio: Optional[np.ndarray] = None,
    fps: int = 25,
    path: Optional[Union[str, os.PathLike]] = None,
    crf: int = 18,
    preset: str = "medium",
    sample_rate: int = SPEECH_SAMPLE_RATE,
) -> bytes:
    """Encode frames (+ speech) to an mp4 and return its bytes.

    ``frames``: float [3, T, H, W] in [-1, 1] or uint8 [T, H, W, 3].
    ``audio``: float [N] mono speech at ``sample_rate`` Hz (16 kHz), or None for a silent
    video. It is cut to the video's duration T / fps seconds, and zero-padded up to it
    when shorter, so the video keeps all T frames (the official muxer's ``-shortest``
    would drop frames past the end of the speech instead).

    Output: H.264 (libx264, yuv420p, ``crf``), constant ``fps``, AAC audio, moov atom at
    the front (``+faststart``) for progressive playback; the same encoder and remux a job's
    video goes through (:mod:`multitalk.utils.video_output`). Odd sizes are padded by one
    edge-replicated row/column (yuv420p needs even dimensions).
    ``path``: also write the mp4 there. Raises RuntimeError with ffmpeg's stderr tail on
    encoder failure.
    """
    from .video_output import ChunkedMp4

    video = frames_to_uint8(frames)
    num_frames, height, width, _ = video.shape
    if num_frames == 0:
        raise ValueError("no frames to write")
    mp4 = ChunkedMp4(height, width, [num_frames], audio, fps, crf=crf, preset=preset, sample_rate=sample_rate)
    try:
        mp4.write(video)
        result = mp4.finish()
    except BaseException:
        mp4.abort()
        raise
    try:
        data = result.read_bytes()
    finally:
        result.release()
    if path is not None:
        Path(path).write_bytes(data)
    return data


# ---------------------------------------------------------------------------------------
# Probing

def probe_mp4(data_or_path: Union[bytes, str, os.PathLike]) -> dict:
    """Describe a video file (mp4 bytes or a path).

    Returns a dict:
    ``video_codec`` (e.g. "h264"), ``fps`` (float, nominal stream rate), ``num_frames``
    (exact count of decoded frames), ``width``, ``height`` (pixels), ``duration``
    (container seconds), ``audio_codec`` ("aac", or None without audio),
    ``audio_sample_rate`` (Hz or None), ``audio_duration`` (seconds of decoded audio
    samples, or None). Raises ValueError when the file cannot be read.
    """
    from .probe import decoded_counts, probe

    with tempfile.TemporaryDirectory(prefix="multitalk-probe-") as tmp:
        if isinstance(data_or_path, (bytes, bytearray, memoryview)):
            source = os.path.join(tmp, "input.mp4")
            Path(source).write_bytes(bytes(data_or_path))
        else:
            source = os.fspath(data_or_path)
        info = probe(source)
        video, audio = info.first("video"), info.first("audio")
        try:
            frames, audio_seconds = decoded_counts(source)
        except Exception as error:  # noqa: BLE001 - reported as the file being unreadable
            raise ValueError(f"the file could not be decoded: {error}") from None
    return {
        "video_codec": video.codec if video else None, "fps": video.fps if video else None, "num_frames": frames,
        "width": video.width if video else None, "height": video.height if video else None,
        "duration": info.duration, "audio_codec": audio.codec if audio else None,
        "audio_sample_rate": audio.sample_rate if audio else None, "audio_duration": audio_seconds,
    }
