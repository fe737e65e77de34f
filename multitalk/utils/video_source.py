"""Source videos for video-to-video (InfiniteTalk dubbing): probe, checks, and frames
decoded one at a time.

Everything runs through the imageio-ffmpeg binary. Its decoders cover H.264, HEVC, VP8,
VP9, AV1 (libdav1d and the native one), MPEG-4 part 2 and the other codecs of a stock
ffmpeg, so AV1 needs no conversion first (the official converts AV1 to H.264 because its
reader, decord, cannot decode it).

:class:`VideoSource` checks the upload from its header before anything is decoded whole
(bytes, duration, frame size, and that the first frame decodes), then runs one ffmpeg
process that decodes the video stream sequentially, converted to 25 fps (ffmpeg's ``fps``
filter: a frame is repeated or dropped by timestamp; a 25 fps source passes unchanged),
with the container's rotation applied. Frames are read off its pipe as they are asked for
and all but the one asked for are dropped, so memory stays at one frame whatever the length;
decoding stops where the last frame asked for lies, however long the source runs on.

Asking for a frame past the end of the source gives its last frame: the official
``extract_specific_frames`` does that (``vr[-1]``), so a source shorter than the audio is
held on its last frame for the chunks past its end.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from multitalk.api import InputError

from .ffmpeg import ffmpeg_exe
from .probe import UnreadableMedia, probe

VIDEO_FIELD = "condition_video"
SOURCE_FPS = 25
# ffmpeg demuxers that read still images: such an upload belongs in condition_image.
_IMAGE_DEMUXERS = re.compile(r"(_pipe|^image2)$")



@dataclass
class VideoLimits:
    """Caps on a source video, checked from its header before it is decoded."""

    max_bytes: int = 1 << 30
    max_seconds: float = 600.0
    max_pixels: int = 3840 * 2160  # per frame (4K UHD)
    min_side: int = 64


@dataclass
class VideoInfo:
    """What the container says: ``codec``, ``width`` x ``height`` as decoded (rotation
    applied), nominal ``fps`` (None if absent), ``duration`` seconds (None if unknown),
    FFmpeg's demuxer names ``container``."""

    codec: str
    width: int
    height: int
    fps: Optional[float]
    duration: Optional[float]
    container: str


def probe_video(path: str, field: str = VIDEO_FIELD) -> VideoInfo:
    """Read a video's container and streams (:func:`multitalk.utils.probe.probe`: headers and
    the first frame). Raises :class:`InputError` naming ``field`` for a file that is not a
    video, a still image, and a file with no video stream."""
    try:
        info = probe(path)
    except UnreadableMedia:
        raise InputError(field, "not a video file (its format was not recognised)") from None
    video = info.first("video")
    if video is None:
        raise InputError(field, "the file has no video stream" + (" (only audio)" if info.first("audio") else ""))
    if any(_IMAGE_DEMUXERS.search(n) for n in info.container.split(",")):
        raise InputError(field, f"is a still image ({video.codec}): send it as condition_image for image-to-video")
    if not video.width or not video.height:
        raise InputError(field, f"the {video.codec} video stream has no frame size in its header")
    # width x height as displayed: ffmpeg applies the display rotation when it decodes.
    return VideoInfo(codec=video.codec, width=video.width, height=video.height, fps=video.fps,
                     duration=info.duration, container=info.container)


def check_video(info: VideoInfo, limits: VideoLimits, field: str = VIDEO_FIELD) -> None:
    """The caps that need only the header; :class:`InputError` naming ``field`` (413 for too much)."""
    if info.duration is not None and info.duration > limits.max_seconds:
        raise InputError(field, f"the video lasts {info.duration:.1f} s; the limit is {limits.max_seconds:.0f} s", 413)
    pixels = info.width * info.height
    if pixels > limits.max_pixels:
        raise InputError(field, f"the video is {info.width}x{info.height} = {pixels} pixels a frame; "
                                f"the limit is {limits.max_pixels}", 413)
    if min(info.width, info.height) < limits.min_side:
        raise InputError(field, f"the video is {info.width}x{info.height}; each side must be at least "
                                f"{limits.min_side} pixels")


class VideoSource:
    """Frames of an uploaded video at 25 fps, decoded as they are asked for.

    ``VideoSource(data)`` checks the upload (see the module docstring) and decodes frame 0;
    :meth:`frame` returns uint8 ``[H, W, 3]`` RGB. Frames are meant to be asked for in
    increasing order (an earlier one restarts the decoder). Use as a context manager, or
    call :meth:`close`.
    """

    def __init__(self, data: bytes, limits: VideoLimits = VideoLimits(), field: str = VIDEO_FIELD,
                 fps: int = SOURCE_FPS):
        if not data:
            raise InputError(field, "empty file")
        if len(data) > limits.max_bytes:
            raise InputError(field, f"the video is {len(data)} bytes; the limit is {limits.max_bytes}", 413)
        self.field, self.fps = field, fps
        self._tmp = tempfile.TemporaryDirectory(prefix="multitalk-source-")
        self.path = os.path.join(self._tmp.name, "source")
        self._process: Optional[subprocess.Popen] = None
        try:
            with open(self.path, "wb") as handle:
                handle.write(data)
            self.info = probe_video(self.path, field)
            check_video(self.info, limits, field)
            self._frame_bytes = self.info.width * self.info.height * 3
            self._next = 0  # index of the next frame the pipe gives
            self._last: Optional[np.ndarray] = None  # the last frame read
            self.ended = False  # the pipe ran dry: ``_next`` frames in all
            self.frame(0)  # an unreadable stream fails here, before any model work
        except BaseException:
            self.close()
            raise

    @property
    def frames_read(self) -> int:
        return self._next

    def _start(self) -> None:
        self._stop()
        self._log = open(os.path.join(self._tmp.name, "ffmpeg.log"), "wb")
        command = [
            ffmpeg_exe(), "-nostdin", "-hide_banner", "-loglevel", "error", "-i", self.path,
            "-map", "0:v:0", "-an", "-sn", "-vf", f"fps={self.fps}", "-f", "rawvideo", "-pix_fmt", "rgb24", "pipe:1",
        ]  # fmt: skip
        # stderr goes to a file: an undrained pipe could fill up and stall the decoder.
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self._log, stdin=subprocess.DEVNULL)
        self._next, self._last, self.ended = 0, None, False

    def _read_one(self) -> Optional[np.ndarray]:
        raw = self._process.stdout.read(self._frame_bytes)
        if len(raw) < self._frame_bytes:
            self.ended = True
            self._process.wait()
            if self._next == 0:
                self._log.flush()
                with open(self._log.name, "rb") as log:
                    tail = log.read()[-500:].decode("utf-8", "replace").strip()
                raise InputError(self.field, f"the {self.info.codec} video stream could not be decoded"
                                             + (f": {tail}" if tail else ""))
            return None
        self._next += 1
        return np.frombuffer(raw, np.uint8).reshape(self.info.height, self.info.width, 3)

    def frame(self, index: int) -> np.ndarray:
        """Frame ``index`` at 25 fps; past the end, the last frame (official behaviour)."""
        if index < 0:
            raise ValueError(f"frame index must be >= 0, got {index}")
        if self._last is None or index < self._next - 1:
            self._start()
        while not self.ended and self._next <= index:
            frame = self._read_one()
            if frame is not None:
                self._last = frame
        if self.ended:
            self._stop()
        return self._last

    def _stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.kill()
            self._process.wait()
            self._process.stdout.close()
            self._log.close()
            self._process = None

    def close(self) -> None:
        self._stop()
        self._tmp.cleanup()

    def __enter__(self) -> "VideoSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
