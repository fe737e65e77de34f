"""The ffmpeg binary (imageio-ffmpeg's) every encode and decode subprocess runs, and the tail
of its log for error messages. What a file holds is read by structure, with PyAV
(:mod:`multitalk.utils.probe`), not parsed out of ffmpeg's ``-i`` banner."""
from __future__ import annotations

from typing import Union


def ffmpeg_exe() -> str:
    """Path of the ffmpeg binary bundled with imageio-ffmpeg."""
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def stderr_tail(stderr: Union[bytes, str], limit: int = 2000) -> str:
    """The last ``limit`` characters of an ffmpeg log, for error messages."""
    text = stderr.decode("utf-8", "replace") if isinstance(stderr, bytes) else stderr
    return text[-limit:].strip()
