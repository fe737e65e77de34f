"""A job's video output: chunks in, each encoded once; the fragmented stream and the final mp4 out.

Both models' chunk loops (:mod:`multitalk.generation.loop`) write their chunks here, as
uint8 frames (``[T, H, W, 3]``, made by the decoder stage). Each chunk goes through x264
once (:class:`multitalk.utils.segments.SegmentedMp4Writer`) and becomes a fragmented-MP4
segment, appended to a stream file on local disk and, with ``on_chunk``, handed to the
caller as soon as it is encoded (a streaming job's chunk results). When the job ends, the
final mp4 is *remuxed* from that stream: the H.264 samples copied (no second x264 pass)
into a normal faststart mp4, with the speech encoded to AAC as a plain mp4 carries it
(an edit list hides the encoder's priming). The mp4 stays a file (:class:`VideoFile`):
a served job uploads it from disk in parts, so no whole video is ever in memory.

Memory stays flat in the job's length: at most one chunk is being encoded while the loop
generates the next; segments are not kept once handed on.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import weakref
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

from .segments import AUDIO_BITRATE, ENCODE_TIMEOUT_S, SPEECH_SAMPLE_RATE, ChunkSegment, SegmentedMp4Writer

# The remux of a finished stream (copying samples, encoding the AAC) of a 10-minute video
# takes seconds; this bounds it.
REMUX_TIMEOUT_S = ENCODE_TIMEOUT_S


class VideoFile:
    """A finished mp4 on local disk. :meth:`release` removes it (and its folder); so does the
    garbage collector once nothing refers to this object."""

    def __init__(self, path: str, folder: str):
        self.path = path
        self._finalizer = weakref.finalize(self, shutil.rmtree, folder, True)

    @property
    def size(self) -> int:
        return os.path.getsize(self.path)

    def read_bytes(self) -> bytes:
        with open(self.path, "rb") as handle:
            return handle.read()

    def release(self) -> None:
        self._finalizer()


def remux_mp4(stream: str, out: str, speech: Optional[np.ndarray], frames: int, fps: int,
              sample_rate: int = SPEECH_SAMPLE_RATE, timeout: float = REMUX_TIMEOUT_S) -> None:
    """The fragmented ``stream``'s H.264 track (copied) and ``speech`` (AAC, cut or
    zero-padded to ``frames / fps`` seconds, as the video keeps all its frames) → a
    faststart mp4 at ``out``."""
    from .ffmpeg import ffmpeg_exe, stderr_tail
    from .video import write_wav

    command = [ffmpeg_exe(), "-y", "-hide_banner", "-nostdin", "-loglevel", "error", "-i", stream]
    if speech is not None:
        samples = np.asarray(speech, dtype=np.float32).reshape(-1)
        target = int(round(frames * sample_rate / fps))  # whole samples: T / fps seconds of speech
        samples = np.pad(samples[:target], (0, max(0, target - samples.shape[0])))
        wav = os.path.join(os.path.dirname(out), "speech.wav")
        write_wav(wav, samples, sample_rate)
        command += ["-i", wav, "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", str(AUDIO_BITRATE)]
    else:
        command += ["-map", "0:v:0"]
    command += ["-c:v", "copy", "-movflags", "+faststart", "-f", "mp4", out]
    done = subprocess.run(command, capture_output=True, timeout=timeout)
    if done.returncode != 0 or not os.path.exists(out):
        raise RuntimeError(f"ffmpeg failed to assemble the mp4 (exit {done.returncode}): {stderr_tail(done.stderr)}")


class ChunkedMp4:
    """The blocking core of :class:`VideoOutput` (and of ``write_mp4``): :meth:`write` encodes
    the chunks its frames complete and appends their segments to the stream file;
    :meth:`finish` remuxes the mp4. ``segment_audio``: the segments carry the speech too
    (for a caller that plays them); the final mp4 always does."""

    def __init__(self, height: int, width: int, segment_frames: Sequence[int], speech: Optional[np.ndarray],
                 fps: int = 25, segment_audio: bool = False, crf: int = 18, preset: str = "medium",
                 sample_rate: int = SPEECH_SAMPLE_RATE):
        self.fps, self.speech, self.sample_rate = fps, speech, sample_rate
        self.folder = tempfile.mkdtemp(prefix="multitalk-video-")
        self.stream_path = os.path.join(self.folder, "stream.mp4")
        self._stream = None
        try:  # whatever was started is cleaned up if a later part fails
            self.writer = SegmentedMp4Writer(height, width, segment_frames, speech if segment_audio else None, fps,
                                             crf, preset, sample_rate)
            self._stream = open(self.stream_path, "wb")
        except BaseException:
            self.abort()
            raise
        self.num_frames = self.writer.num_frames

    @property
    def written(self) -> int:
        return self.writer.written

    def write(self, frames: Union[torch.Tensor, np.ndarray]) -> list[ChunkSegment]:
        segments = self.writer.write(frames)
        for segment in segments:  # the video track alone: the mp4 gets its audio from the speech
            if segment.index == 0:
                self._stream.write(self.writer.video_init)
            self._stream.write(segment.data[:segment.video_bytes])
        return segments

    def finish(self) -> VideoFile:
        """The mp4 (all chunks written); the stream file is removed."""
        self.writer.close()
        self._stream.close()
        out = os.path.join(self.folder, "video.mp4")
        remux_mp4(self.stream_path, out, self.speech, self.writer.written, self.fps, self.sample_rate)
        os.unlink(self.stream_path)
        return VideoFile(out, self.folder)

    def abort(self) -> None:
        """Stop the encoder and remove the files (the job failed or was cancelled)."""
        writer = getattr(self, "writer", None)
        if writer is not None:
            writer.abort()
        if self._stream is not None:
            self._stream.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _frame_count(frames: Union[torch.Tensor, np.ndarray]) -> int:
    uint8 = frames.dtype in (torch.uint8, np.uint8)
    return int(frames.shape[0] if uint8 else frames.shape[1])


class VideoOutput:
    """``await write(frames)`` per chunk (uint8 ``[T, H, W, 3]``, or float ``[3, T, H, W]`` in
    [-1, 1]), then ``await close()`` for the :class:`VideoFile`; ``abort()`` on failure.

    ``segment_frames``: the frames each chunk adds (:meth:`multitalk.generation.planning.ChunkPlan.frames_added`;
    default: one segment of ``total_frames``). ``on_chunk``: called with each chunk's
    :class:`~multitalk.utils.segments.ChunkSegment` as soon as it is encoded, in order (may
    return an awaitable, awaited before the next segment is handed over).

    :meth:`write` returns once the chunk is handed to the encoder, after the previous chunk's
    encode (and its ``on_chunk``) has finished: the encode of chunk *k* overlaps the
    generation of chunk *k + 1*, and at most one chunk's frames wait here.
    """

    def __init__(self, height: int, width: int, total_frames: int, speech: Optional[np.ndarray], fps: int,
                 segment_frames: Sequence[int] = (), on_chunk: Optional[Callable[[ChunkSegment], Any]] = None,
                 crf: int = 18, preset: str = "medium"):
        self.total_frames = total_frames
        self.on_chunk = on_chunk
        self.mp4 = ChunkedMp4(height, width, list(segment_frames) or [total_frames], speech, fps,
                              segment_audio=on_chunk is not None, crf=crf, preset=preset)
        self.written = 0
        self._encoding: Optional[asyncio.Future] = None

    async def write(self, frames: Union[torch.Tensor, np.ndarray]) -> None:
        await self._previous()
        self.written = min(self.total_frames, self.written + _frame_count(frames))
        self._encoding = asyncio.ensure_future(self._encode(frames))

    async def _previous(self) -> None:
        if self._encoding is not None:
            encoding, self._encoding = self._encoding, None
            await encoding

    async def _encode(self, frames) -> None:
        segments = await asyncio.to_thread(self.mp4.write, frames)
        del frames  # encoded: nothing of this chunk's frames is kept
        for segment in segments:
            if self.on_chunk is not None:
                result = self.on_chunk(segment)
                if hasattr(result, "__await__"):
                    await result

    async def close(self) -> VideoFile:
        await self._previous()
        return await asyncio.to_thread(self.mp4.finish)

    def abort(self) -> None:
        if self._encoding is not None:
            self._encoding.cancel()
            self._encoding = None
        self.mp4.abort()
