"""Output video: mp4 writing (H.264 + AAC), probing, and colour correction.

Everything goes through the imageio-ffmpeg binary (``imageio_ffmpeg.get_ffmpeg_exe()``)
in subprocesses; raw frames are streamed on stdin, the speech is handed over as a wav in
a private temporary directory that is always removed.

``color_match`` is the official ``match_and_blend_colors`` (wan/utils/multitalk_utils.py)
with its own sRGB <-> CIE LAB conversion (D65 white, 2 degree observer, the same
formulas and constants as skimage's ``rgb2lab`` / ``lab2rgb``).
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
import wave
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from multitalk.api import InputError

from .ffmpeg import (
    AUDIO_STREAM_RE, VIDEO_STREAM_RE, ffmpeg_exe, header_duration, read_header, stderr_tail, stream_fps,
    stream_sample_rate, stream_size,
)  # fmt: skip

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
        else:
            array = frames.detach().to(torch.float32).cpu().numpy()
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


def pipe_frames(process: subprocess.Popen, video: np.ndarray) -> bool:
    """Raw frames into an encoder's stdin; ``False`` if it has died (the caller reports why)."""
    try:
        for frame in video:
            process.stdin.write(frame.tobytes())
        process.stdin.flush()
        return True
    except (BrokenPipeError, OSError):
        return False


def _write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    pcm = np.clip(np.rint(np.asarray(samples, dtype=np.float64) * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(path, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(sample_rate)
        handle.writeframes(pcm.tobytes())


class Mp4Writer:
    """Streams frames into ffmpeg as they are produced, so a long video never sits in
    memory whole; the speech track is known up front and muxed at the end.

    ``num_frames`` frames of ``height`` x ``width`` are expected (the audio is cut or
    zero-padded to ``num_frames / fps`` seconds); :meth:`write` takes float [3, T, H, W]
    in [-1, 1] or uint8 [T, H, W, 3] chunks; :meth:`close` returns the mp4 bytes.
    Output as :func:`write_mp4`.
    """

    def __init__(
        self,
        height: int,
        width: int,
        num_frames: int,
        audio: Optional[np.ndarray] = None,
        fps: int = 25,
        crf: int = 18,
        preset: str = "medium",
        sample_rate: int = SPEECH_SAMPLE_RATE,
    ):
        if num_frames <= 0:
            raise ValueError("no frames to write")
        self.pad_h, self.pad_w = height % 2, width % 2
        self.height, self.width = height + self.pad_h, width + self.pad_w
        self.num_frames, self.written = num_frames, 0
        self._tmp = tempfile.TemporaryDirectory(prefix="multitalk-mp4-")
        tmp = self._tmp.name
        self.output = os.path.join(tmp, "out.mp4")
        self.log_path = os.path.join(tmp, "ffmpeg.log")
        command = [
            ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}", "-framerate", str(fps),
            "-i", "pipe:0",
        ]  # fmt: skip
        if audio is not None:
            samples = np.asarray(audio, dtype=np.float32).reshape(-1)
            # Round to whole samples: T / fps seconds of speech.
            target_samples = int(round(num_frames * sample_rate / fps))
            samples = samples[:target_samples]
            if samples.shape[0] < target_samples:
                samples = np.pad(samples, (0, target_samples - samples.shape[0]))
            wav_path = os.path.join(tmp, "speech.wav")
            _write_wav(wav_path, samples, sample_rate)
            command += ["-i", wav_path, "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "128k"]
        else:
            command += ["-map", "0:v:0"]
        command += [
            "-c:v", "libx264", "-preset", preset, "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-r", str(fps), "-movflags", "+faststart", "-f", "mp4", self.output,
        ]  # fmt: skip
        # stderr goes to a file: a pipe we do not drain while writing stdin could fill
        # up and deadlock both processes on long videos.
        self._log = open(self.log_path, "wb")
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self._log)

    def write(self, frames: Union[torch.Tensor, np.ndarray]) -> None:
        """Append frames; frames beyond ``num_frames`` are dropped."""
        video = encoder_frames(frames, self.num_frames - self.written, self.pad_h, self.pad_w)
        pipe_frames(self._process, video)  # if ffmpeg died early, its log says why (reported by close)
        self.written += len(video)

    def abort(self) -> None:
        """Stop the encoder and remove its files (the job failed or was cancelled)."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._log.close()
        self._tmp.cleanup()

    def close(self, path: Optional[Union[str, os.PathLike]] = None) -> bytes:
        """Finish the file and return its bytes (also written to ``path`` if given)."""
        try:
            try:
                self._process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            return_code = self._process.wait()
            self._log.close()
            if return_code != 0 or not os.path.exists(self.output):
                with open(self.log_path, "rb") as log:
                    tail = stderr_tail(log.read())
                raise RuntimeError(f"ffmpeg failed to encode the mp4 (exit {return_code}): {tail}")
            with open(self.output, "rb") as handle:
                mp4_bytes = handle.read()
        finally:
            if self._process.poll() is None:
                self._process.kill()
            self._tmp.cleanup()
        if path is not None:
            Path(path).write_bytes(mp4_bytes)
        return mp4_bytes


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
    the front (``+faststart``) for progressive playback. Odd sizes are padded by one
    edge-replicated row/column (yuv420p needs even dimensions).
    ``path``: also write the mp4 there. Raises RuntimeError with ffmpeg's stderr tail on
    encoder failure.
    """
    video = frames_to_uint8(frames)
    num_frames, height, width, _ = video.shape
    writer = Mp4Writer(height, width, num_frames, audio, fps, crf, preset, sample_rate)
    writer.write(video)
    return writer.close(path)


# ---------------------------------------------------------------------------------------
# Probing

def probe_mp4(data_or_path: Union[bytes, str, os.PathLike]) -> dict:
    """Describe a video file (mp4 bytes or a path).

    Returns a dict:
    ``video_codec`` (e.g. "h264"), ``fps`` (float, nominal stream rate), ``num_frames``
    (exact count of decoded frames), ``width``, ``height`` (pixels), ``duration``
    (container seconds), ``audio_codec`` ("aac", or None without audio),
    ``audio_sample_rate`` (Hz or None), ``audio_duration`` (seconds of decoded audio
    samples, or None). Raises ValueError when ffmpeg cannot read the file.
    (Parses ffprobe's stream and format sections into one dict; the field-by-field fallbacks are what makes it long.)
    """
    ffmpeg = ffmpeg_exe()
    with tempfile.TemporaryDirectory(prefix="multitalk-probe-") as tmp:
        if isinstance(data_or_path, (bytes, bytearray, memoryview)):
            source = os.path.join(tmp, "input.mp4")
            Path(source).write_bytes(bytes(data_or_path))
        else:
            source = os.fspath(data_or_path)
        text = read_header(source)
        if "Stream #" not in text:
            raise ValueError(f"not a readable media file: {stderr_tail(text, 500)}")

        info: dict = {
            "video_codec": None, "fps": None, "num_frames": 0, "width": None, "height": None,
            "duration": header_duration(text), "audio_codec": None, "audio_sample_rate": None,
            "audio_duration": None,
        }  # fmt: skip
        video = VIDEO_STREAM_RE.search(text)
        if video:
            info["video_codec"] = video.group(1)
            info["width"], info["height"] = stream_size(video.group(2)) or (None, None)
            info["fps"] = stream_fps(video.group(2))
            # Exact frame count: decode everything, passthrough timing so the null muxer
            # neither duplicates nor drops frames, read the final progress report.
            count = subprocess.run(
                [ffmpeg, "-hide_banner", "-nostats", "-loglevel", "error", "-progress", "pipe:1",
                 "-i", source, "-map", "0:v:0", "-fps_mode", "passthrough", "-f", "null", "-"],
                capture_output=True, timeout=600,
            )  # fmt: skip
            frames = re.findall(r"^frame=(\d+)", count.stdout.decode("utf-8", "replace"), flags=re.MULTILINE)
            if count.returncode != 0 or not frames:
                raise ValueError(f"video stream could not be decoded: {stderr_tail(count.stderr, 500)}")
            info["num_frames"] = int(frames[-1])
        audio = AUDIO_STREAM_RE.search(text)
        if audio:
            info["audio_codec"] = audio.group(1)
            info["audio_sample_rate"] = stream_sample_rate(audio.group(2))
            if info["audio_sample_rate"]:
                decoded = subprocess.run(
                    [ffmpeg, "-hide_banner", "-loglevel", "error", "-i", source, "-map", "0:a:0",
                     "-ac", "1", "-f", "s16le", "pipe:1"],
                    capture_output=True, timeout=600,
                )  # fmt: skip
                if decoded.returncode == 0:
                    info["audio_duration"] = len(decoded.stdout) / 2 / info["audio_sample_rate"]
    return info


# ---------------------------------------------------------------------------------------
# Colour correction

# sRGB (linear) -> XYZ, and the D65 2-degree reference white: skimage's constants.
_XYZ_FROM_RGB = np.array(
    [[0.412453, 0.357580, 0.180423], [0.212671, 0.715160, 0.072169], [0.019334, 0.119193, 0.950227]]
)
_RGB_FROM_XYZ = np.linalg.inv(_XYZ_FROM_RGB)
_D65_WHITE = np.array([0.95047, 1.0, 1.08883])
_FLAT_STD = 1e-4


def rgb_to_lab(rgb: np.ndarray, dtype=np.float64) -> np.ndarray:
    """sRGB in [0, 1], [..., 3] -> CIE LAB [..., 3] (L in [0, 100]); skimage ``rgb2lab``.
    Computed in ``dtype`` (skimage keeps float32 input in float32)."""
    rgb = np.asarray(rgb, dtype=dtype)
    linear = np.where(rgb > 0.04045, np.power((rgb + 0.055) / 1.055, 2.4, dtype=dtype), rgb / 12.92)
    xyz = linear @ (_XYZ_FROM_RGB.T / _D65_WHITE).astype(dtype)
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[..., 0], f[..., 1], f[..., 2]
    return np.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], axis=-1).astype(dtype, copy=False)


def lab_to_rgb(lab: np.ndarray, dtype=np.float64) -> np.ndarray:
    """CIE LAB [..., 3] -> sRGB [..., 3] clipped to [0, 1]; skimage ``lab2rgb`` (negative
    Z is set to 0 as skimage does, out-of-gamut colours clipped). Computed in ``dtype``."""
    lab = np.asarray(lab, dtype=dtype)
    fy = (lab[..., 0] + 16.0) / 116.0
    fx = lab[..., 1] / 500.0 + fy
    fz = np.maximum(fy - lab[..., 2] / 200.0, 0.0)
    f = np.stack([fx, fy, fz], axis=-1)
    xyz = np.where(f > 0.2068966, f * f * f, (f - 16.0 / 116.0) / 7.787)
    linear = xyz @ (_RGB_FROM_XYZ * _D65_WHITE).T.astype(dtype)
    # np.power of a negative base gives NaN; those pixels take the linear branch anyway.
    gamma = 1.055 * np.power(np.maximum(linear, 0.0), 1.0 / 2.4, dtype=dtype) - 0.055
    rgb = np.where(linear > 0.0031308, gamma, linear * 12.92)
    return np.clip(rgb, 0.0, 1.0).astype(dtype, copy=False)


def _channel_stats(lab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and population std of [H, W, 3], accumulated in float64."""
    flat = lab.reshape(-1, 3)
    mean = np.array([flat[:, c].mean(dtype=np.float64) for c in range(3)])
    std = np.array([flat[:, c].std(dtype=np.float64) for c in range(3)])
    return mean, std


def color_match(video: torch.Tensor, reference: torch.Tensor, strength: float) -> torch.Tensor:
    """Pull each frame's colour statistics towards a reference image.

    ``video``: [3, T, H, W] in [-1, 1]; ``reference``: [3, H', W'] (or [3, 1, H', W']) in
    [-1, 1], usually the condition image. Official ``match_and_blend_colors``: per frame,
    in LAB space, each channel is shifted/scaled to the reference's mean and standard
    deviation (a constant channel, std < 1e-4, is set to the reference mean), converted back to
    RGB, clipped to [0, 1] and blended ``(1 - strength) * frame + strength * corrected``.
    ``strength`` in [0, 1]; 0 returns ``video`` itself. Returns [3, T, H, W] in [-1, 1]
    with ``video``'s dtype and device.
    """
    if strength == 0.0:
        return video
    if not 0.0 <= strength <= 1.0:
        raise InputError("color_correction", f"must be between 0 and 1, got {strength}")
    if reference.dim() == 4:
        reference = reference[:, 0]
    reference_01 = np.clip((reference.detach().to(torch.float32).cpu().numpy().transpose(1, 2, 0) + 1.0) / 2.0, 0, 1)
    reference_lab = rgb_to_lab(reference_01, np.float32)
    reference_mean, reference_std = _channel_stats(reference_lab)

    source = video.detach().to(torch.float32).cpu().numpy()  # [3, T, H, W]
    corrected = np.empty(source.shape[1:] + (3,), dtype=np.float32)  # [T, H, W, 3]
    # float32 as the official (skimage keeps float32 input in float32); frame by frame
    # keeps the LAB working set to one frame.
    for t in range(source.shape[1]):
        frame_01 = np.clip((source[:, t].transpose(1, 2, 0) + 1.0) / 2.0, 0.0, 1.0)
        lab = rgb_to_lab(frame_01, np.float32)
        mean, std = _channel_stats(lab)
        for channel in range(3):
            # The official tests std == 0 exactly; a flat frame's LAB std can come out
            # as rounding noise there, which it then amplifies into garbage. Anything
            # below 1e-4 LAB units (far below visible) counts as flat.
            if std[channel] < _FLAT_STD:
                lab[..., channel] = reference_mean[channel]
            else:
                lab[..., channel] = (lab[..., channel] - mean[channel]) * (
                    reference_std[channel] / std[channel]
                ) + reference_mean[channel]
        matched = lab_to_rgb(lab, np.float32)
        corrected[t] = (1.0 - strength) * frame_01 + strength * matched
    result = torch.from_numpy(corrected * 2.0 - 1.0).permute(3, 0, 1, 2).contiguous()
    return result.to(device=video.device, dtype=video.dtype)
