"""A job's video output: the final mp4 and, when asked, each chunk as it is finished.

Both generation loops (MultiTalk's :mod:`multitalk.driver`, InfiniteTalk's
:mod:`multitalk.infinitetalk`) write their chunks here. Frames stream into the mp4 encoder
chunk by chunk, so a long video never sits in memory whole. With ``on_chunk``, each
chunk also goes out as a fragmented-MP4 segment (:mod:`multitalk.utils.segments`) as soon
as it is encoded, while later chunks are generated; the final mp4 is the same either way.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch


def chunk_frames(starts: int, frames: int, motion: int, total: int) -> list[int]:
    """Frames each of ``starts`` chunks adds to a video of ``total`` frames: the first all of
    its own, the others all but the ``motion`` frames they continue from, the end cut at
    ``total``; chunks adding none are left out."""
    ends = [min(frames + i * (frames - motion), total) for i in range(starts)]
    return [end - start for start, end in zip([0] + ends[:-1], ends) if end > start]


class VideoOutput:
    """``await write(frames)`` per chunk (``[3, T, H, W]`` in [-1, 1]), then ``await close()``
    for the mp4 bytes; ``abort()`` on failure. ``segment_frames``: the frames of each chunk
    (:func:`chunk_frames`), needed only with ``on_chunk``, which receives each chunk's
    :class:`~multitalk.utils.segments.ChunkSegment` (see ``multitalk.driver.generate``)."""

    def __init__(self, height: int, width: int, total_frames: int, speech: np.ndarray, fps: int,
                 segment_frames: Sequence[int] = (), on_chunk: Optional[Callable[[Any], Any]] = None):
        from .video import Mp4Writer

        self.mp4 = Mp4Writer(height, width, total_frames, speech, fps)
        self.segments = self.feed = None
        if on_chunk is not None:
            from .segments import SegmentedMp4Writer, SegmentFeed

            self.segments = SegmentedMp4Writer(height, width, segment_frames, speech, fps)
            self.feed = SegmentFeed(self.segments, on_chunk)

    @property
    def written(self) -> int:
        return self.mp4.written

    async def write(self, frames: torch.Tensor) -> None:
        await asyncio.to_thread(self.mp4.write, frames)
        if self.segments is not None:
            await asyncio.to_thread(self.segments.write, frames)
            self.feed.after_write()

    async def close(self) -> bytes:
        mp4 = await asyncio.to_thread(self.mp4.close)
        if self.segments is not None:
            await asyncio.to_thread(self.segments.close)
            await self.feed.finish()
        return mp4

    def abort(self) -> None:
        self.mp4.abort()
        if self.segments is not None:
            self.feed.cancel()
            self.segments.abort()
