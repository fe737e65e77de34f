"""Results chunk by chunk: every finished chunk of a streaming job, stored as it is encoded.

A streaming job's chunks land in the store beside its mp4 key (``outputs/<id>.mp4``)::

    outputs/<id>.chunks/init.mp4     the fragmented MP4's init segment (with the first chunk)
    outputs/<id>.chunks/00000.m4s    one media segment per chunk, in order
    ...

The job's status lists them (``chunks``) as they arrive. ``init.mp4`` followed by the
segments so far is a fragmented MP4 that plays in a plain ``<video>`` element:
``GET /v1/jobs/{id}/video`` serves exactly that while the job runs, and keeps serving it if
the job fails late, so no finished chunk is lost. The same segments also make an HLS
playlist (``GET /v1/jobs/{id}/chunks/index.m3u8``) for HLS players.

Why fragmented MP4 first: one progressive stream plays in every browser without a player
library, and it is the same bytes an HLS (fMP4) or DASH player would fetch; HLS alone
would need hls.js in most browsers. Why segments in the store rather than one growing
object: S3 objects cannot be appended to, and each segment is written once, then only read.
When the job completes, the final mp4 (faststart, one moov) replaces the stream in the
``video`` route; the segments stay, for players that started on them.
"""
from __future__ import annotations

import asyncio
from typing import Any, Callable

from pydantic import BaseModel

from .storage import Store

INIT_NAME = "init.mp4"


class ChunkInfo(BaseModel):
    """One finished chunk: ``frames`` of its own, ``frames_so_far`` in the video up to it,
    ``start``/``duration`` in seconds, ``key`` of its segment in the store."""

    index: int
    frames: int
    frames_so_far: int
    start: float
    duration: float
    key: str


def chunks_prefix(video_key: str) -> str:
    """``outputs/<id>.mp4`` → ``outputs/<id>.chunks/``."""
    return (video_key[: -len(".mp4")] if video_key.endswith(".mp4") else video_key) + ".chunks/"


def segment_name(index: int) -> str:
    return f"{index:05d}.m4s"


class ChunkRecorder:
    """The driver's ``on_chunk`` for one job: puts each segment (and, first, the init) into
    ``store`` under ``prefix``, appends its :class:`ChunkInfo` to ``chunks`` and calls
    ``changed()`` so that the job's record is written at the next heartbeat."""

    def __init__(self, store: Store, prefix: str, chunks: list[ChunkInfo], changed: Callable[[], Any]):
        self.store, self.prefix, self.chunks, self.changed = store, prefix, chunks, changed

    async def __call__(self, segment) -> None:
        if segment.index == 0:
            await asyncio.to_thread(self.store.put, self.prefix + INIT_NAME, segment.init, "video/mp4")
        key = self.prefix + segment_name(segment.index)
        await asyncio.to_thread(self.store.put, key, segment.data, "video/iso.segment")
        self.chunks.append(ChunkInfo(index=segment.index, frames=segment.frames, frames_so_far=segment.frames_so_far,
                                     start=round(segment.start, 3), duration=round(segment.duration, 3), key=key))
        self.changed()


def stored_prefix(chunks: list[ChunkInfo]) -> str:
    """The store prefix the recorded chunks were written under."""
    return chunks[0].key.rsplit("/", 1)[0] + "/"


def partial_video(store: Store, chunks: list[ChunkInfo]):
    """The finished chunks as one fragmented MP4 stream: the init, then each segment."""
    yield store.get(stored_prefix(chunks) + INIT_NAME)
    for chunk in chunks:
        yield store.get(chunk.key)


# --- consuming the results as a stream (RunPod's /stream/{id}) -----------------------
# RunPod's /stream answers only what was produced since the previous call, so how far a
# job's results were read is kept beside its record (any ingress replica may answer the
# next call). Two concurrent readers may both get an item; none is skipped.


def stream_cursor_key(job_id: str) -> str:
    return f"jobs/{job_id}.stream"


def read_stream_cursor(store: Store, job_id: str) -> int:
    from .storage import NotFound

    try:
        return int(store.get(stream_cursor_key(job_id)) or b"0")
    except (NotFound, ValueError):
        return 0


def write_stream_cursor(store: Store, job_id: str, position: int) -> None:
    store.put(stream_cursor_key(job_id), str(int(position)).encode(), "text/plain")
