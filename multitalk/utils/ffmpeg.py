"""The ffmpeg binary (imageio-ffmpeg's) and what its ``-i`` banner says about a file.

``ffmpeg -i FILE`` with no output prints the container and stream header to stderr and
exits 1: the one probe the audio, video and source-video readers share, parsed here once.
"""
from __future__ import annotations

import re
import subprocess
from typing import Optional, Union

VIDEO_STREAM_RE = re.compile(r"Stream #\d+:\d+[^\n]*?: Video: (\w+)([^\n]*)")
AUDIO_STREAM_RE = re.compile(r"Stream #\d+:\d+[^\n]*?: Audio: (\w+)([^\n]*)")
_SIZE_RE = re.compile(r"[ ,](\d{1,5})x(\d{1,5})[ ,\n\[]")
_FPS_RE = re.compile(r"([\d.]+)(k?) fps")
_RATE_RE = re.compile(r"(\d+) Hz")
_DURATION_RE = re.compile(r"Duration:\s*(\d+):(\d+):(\d+(?:\.\d+)?)")


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def stderr_tail(stderr: Union[bytes, str], limit: int = 2000) -> str:
    """The last ``limit`` characters of an ffmpeg log, for error messages."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    return text[-limit:].strip()


def read_header(path: str, timeout: float = 120) -> str:
    """The banner ``ffmpeg -i path`` prints (nothing is decoded)."""
    probe = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", path], capture_output=True,
                           timeout=timeout)
    return probe.stderr.decode("utf-8", "replace")


def header_duration(header: str) -> Optional[float]:
    """The container's ``Duration:`` in seconds, or None when the header gives none."""
    match = _DURATION_RE.search(header)
    if match is None:
        return None
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def stream_size(details: str) -> Optional[tuple[int, int]]:
    """``(width, height)`` from a stream line's details (the text after the codec name)."""
    match = _SIZE_RE.search(details + "\n")
    return (int(match.group(1)), int(match.group(2))) if match else None


def stream_fps(details: str) -> Optional[float]:
    """The nominal frame rate from a video stream line's details (``25 fps``, ``1k fps``)."""
    match = _FPS_RE.search(details)
    return float(match.group(1)) * (1000.0 if match.group(2) else 1.0) if match else None


def stream_sample_rate(details: str) -> Optional[int]:
    """The sample rate in Hz from an audio stream line's details."""
    match = _RATE_RE.search(details)
    return int(match.group(1)) if match else None
