"""Chunk-by-chunk video: one ffmpeg encoding the stream, cut into one fMP4 segment per chunk.

A streaming job produces its video chunk by chunk; :class:`SegmentedMp4Writer` lets each
finished chunk be played while later ones are still being generated:

* one continuous ffmpeg (the imageio-ffmpeg binary) encodes the frames to H.264 as they
  are written, with a keyframe forced at the first frame of every chunk;
* the speech, known up front, is encoded to AAC once at the start;
* as soon as the last frame of a chunk leaves the encoder, the chunk becomes one
  :class:`ChunkSegment`: a ``moof`` + ``mdat`` fragment of its video frames and one of the
  AAC frames that start within its time, after the shared *init* (``ftyp`` + ``moov``);
* ``init + segment 0 + ... + segment k`` is a playable fragmented MP4 of chunks ``0..k``;
  each segment also decodes on its own after the init (it starts with a keyframe), so the
  segments form an HLS (fMP4, version 7) media playlist as they are (:func:`hls_playlist`).

Why the fragments are written here rather than by ffmpeg's muxers: ffmpeg's ``hls`` and
``dash`` muxers close a segment only when they see the *next* segment's first keyframe —
after the next chunk has been generated, so the first chunk would play one chunk late —
and its fragmented ``mp4`` muxer holds every last packet until the next one arrives (it
needs the next timestamp for the last sample's duration), and miscomputes durations when
the other track's packet is what flushes it. So ffmpeg writes FLV (each frame a whole
tag, written the moment it is encoded, with the ``avcC`` decoder configuration up front),
x264 runs with ``-tune zerolatency`` (no lookahead, no B-frames: a frame leaves the
encoder as soon as it enters), and this module lays the samples into ISO BMFF boxes with
exact constant-rate timestamps. Audio priming: the AAC encoder delays its output by one
frame (1024 samples) and a fragmented ``moov`` has no edit list to hide that, so the speech
is fed 1024 samples late and decoded sample ``i`` is speech sample ``i``.

The fMP4 does not replace the final mp4 (:class:`multitalk.utils.video.Mp4Writer`), which
stays a normal faststart file: zerolatency has no B-frames and no lookahead, so at the same
CRF the stream is larger (``bench/first_chunk.py`` prints the ratio), and a plain
``moov``-first mp4 is what every player and editor reads.
"""
from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch

SPEECH_SAMPLE_RATE = 16000
AAC_FRAME = 1024  # samples per AAC-LC frame
AUDIO_BITRATE = 128000
VIDEO_TIMESCALE = 12800  # ticks per second (512 per frame at 25 fps, as ffmpeg's mp4 muxer)


@dataclass
class ChunkSegment:
    """One chunk's part of the fragmented MP4.

    ``init``: ``ftyp`` + ``moov`` (identical for every segment of a video); ``data``: the
    chunk's ``moof`` + ``mdat`` fragments; ``frames``: its video frames;
    ``frames_so_far``: video frames in segments ``0..index``; ``start`` / ``duration`` in
    seconds. ``init + data(0) + ... + data(index)`` plays the video so far.
    """

    index: int
    init: bytes
    data: bytes
    frames: int
    frames_so_far: int
    start: float
    duration: float


def hls_playlist(segments: Sequence[ChunkSegment], ended: bool, init_uri: str = "init.mp4",
                 segment_uri: str = "segment_{index}.m4s") -> str:
    """An HLS media playlist (fMP4 segments, ``EXT-X-MAP`` = the init) of ``segments``.

    ``ended``: the job is finished (type ``VOD``, ``EXT-X-ENDLIST``); otherwise the type is
    ``EVENT`` (segments are only ever appended) and players reload it for more.
    ``segment_uri`` is formatted with ``index``.
    """
    target = max([1] + [int(-(-s.duration // 1)) for s in segments])
    lines = ["#EXTM3U", "#EXT-X-VERSION:7", f"#EXT-X-PLAYLIST-TYPE:{'VOD' if ended else 'EVENT'}",
             f"#EXT-X-TARGETDURATION:{target}", "#EXT-X-MEDIA-SEQUENCE:0", "#EXT-X-INDEPENDENT-SEGMENTS",
             f'#EXT-X-MAP:URI="{init_uri}"']
    for segment in segments:
        lines += [f"#EXTINF:{segment.duration:.3f},", segment_uri.format(index=segment.index)]
    if ended:
        lines.append("#EXT-X-ENDLIST")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- MP4 boxes
def _box(kind: str, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return (8 + len(body)).to_bytes(4, "big") + kind.encode("latin-1") + body


def _full_box(kind: str, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, bytes([version]) + flags.to_bytes(3, "big"), *payload)


def _u(value: int, size: int) -> bytes:
    return int(value).to_bytes(size, "big")


_MATRIX = b"".join(_u(v, 4) for v in (0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000))
SYNC_SAMPLE = 0x02000000  # sample_depends_on = 2 (an I frame / any audio frame)
NON_SYNC_SAMPLE = 0x01010000  # depends on others, is_non_sync_sample


def _track(track_id: int, handler: str, timescale: int, sample_entry: bytes, width: int = 0, height: int = 0) -> bytes:
    video = handler == "vide"
    tkhd = _full_box("tkhd", 0, 3, _u(0, 8), _u(track_id, 4), _u(0, 4), _u(0, 4), _u(0, 8), _u(0, 4),
                     _u(0 if video else 0x0100, 2), _u(0, 2), _MATRIX, _u(width << 16, 4), _u(height << 16, 4))
    mdhd = _full_box("mdhd", 0, 0, _u(0, 8), _u(timescale, 4), _u(0, 4), _u(0x55C4, 2), _u(0, 2))  # 'und'
    hdlr = _full_box("hdlr", 0, 0, _u(0, 4), handler.encode(), _u(0, 12),
                     (b"VideoHandler" if video else b"SoundHandler") + b"\0")
    media_header = _full_box("vmhd", 0, 1, _u(0, 8)) if video else _full_box("smhd", 0, 0, _u(0, 4))
    dinf = _box("dinf", _full_box("dref", 0, 0, _u(1, 4), _full_box("url ", 0, 1)))
    stbl = _box("stbl", _full_box("stsd", 0, 0, _u(1, 4), sample_entry), _full_box("stts", 0, 0, _u(0, 4)),
                _full_box("stsc", 0, 0, _u(0, 4)), _full_box("stsz", 0, 0, _u(0, 8)), _full_box("stco", 0, 0, _u(0, 4)))
    return _box("trak", tkhd, _box("mdia", mdhd, hdlr, _box("minf", media_header, dinf, stbl)))


def _avc1(avcc: bytes, width: int, height: int) -> bytes:
    return _box("avc1", _u(0, 6), _u(1, 2), _u(0, 16), _u(width, 2), _u(height, 2), _u(0x480000, 4),
                _u(0x480000, 4), _u(0, 4), _u(1, 2), _u(0, 32), _u(0x18, 2), _u(0xFFFF, 2), _box("avcC", avcc))


def _descriptor(tag: int, body: bytes) -> bytes:
    if len(body) > 127:
        raise ValueError("descriptor too long")
    return bytes([tag, len(body)]) + body


def _mp4a(audio_config: bytes, sample_rate: int, channels: int, bitrate: int) -> bytes:
    decoder = _descriptor(0x04, bytes([0x40, 0x15]) + _u(0, 3) + _u(bitrate, 4) + _u(bitrate, 4)
                          + _descriptor(0x05, audio_config))
    esds = _full_box("esds", 0, 0, _descriptor(0x03, _u(1, 2) + b"\0" + decoder + _descriptor(0x06, b"\x02")))
    return _box("mp4a", _u(0, 6), _u(1, 2), _u(0, 8), _u(channels, 2), _u(16, 2), _u(0, 4),
                _u(sample_rate << 16, 4), esds)


def _init_segment(tracks: list[tuple[int, str, int, bytes, int, int]]) -> bytes:
    """``ftyp`` + ``moov`` for fragmented tracks ``(id, handler, timescale, sample entry, w, h)``."""
    ftyp = _box("ftyp", b"iso6", _u(0, 4), b"iso6iso5mp41")
    mvhd = _full_box("mvhd", 0, 0, _u(0, 8), _u(1000, 4), _u(0, 4), _u(0x10000, 4), _u(0x0100, 2), _u(0, 10),
                     _MATRIX, _u(0, 24), _u(len(tracks) + 1, 4))
    traks = [_track(*t) for t in tracks]
    mvex = _box("mvex", *[_full_box("trex", 0, 0, _u(t[0], 4), _u(1, 4), _u(0, 12)) for t in tracks])
    return ftyp + _box("moov", mvhd, *traks, mvex)


def _fragment(sequence: int, track_id: int, decode_time: int, duration: int,
              samples: list[tuple[bytes, int, int]]) -> bytes:
    """One ``moof`` + ``mdat`` of one track: ``samples`` are ``(data, flags, composition offset)``."""
    with_offsets = any(offset for _, _, offset in samples)
    flags = 0x000001 | 0x000200 | 0x000400 | (0x000800 if with_offsets else 0)  # data offset, size, flags (, cto)
    entries = b"".join(_u(len(data), 4) + _u(sample_flags, 4) + (_u(offset & 0xFFFFFFFF, 4) if with_offsets else b"")
                       for data, sample_flags, offset in samples)

    def moof(data_offset: int) -> bytes:
        tfhd = _full_box("tfhd", 0, 0x020000 | 0x000008, _u(track_id, 4), _u(duration, 4))  # base is moof; duration
        tfdt = _full_box("tfdt", 1, 0, _u(decode_time, 8))
        trun = _full_box("trun", 1 if with_offsets else 0, flags, _u(len(samples), 4), _u(data_offset, 4), entries)
        return _box("moof", _full_box("mfhd", 0, 0, _u(sequence, 4)), _box("traf", tfhd, tfdt, trun))

    header = moof(0)
    return moof(len(header) + 8) + _box("mdat", *[data for data, _, _ in samples])


# --------------------------------------------------------------------------- AAC, encoded up front
@dataclass
class _EncodedAudio:
    config: bytes  # AudioSpecificConfig
    frames: list[bytes]  # raw AAC frames of AAC_FRAME samples each
    sample_rate: int
    channels: int


def _encode_audio(samples: np.ndarray, sample_rate: int, bitrate: int) -> _EncodedAudio:
    """The whole speech track → raw AAC-LC frames (ffmpeg, ADTS parsed here)."""
    from .ffmpeg import ffmpeg_exe, stderr_tail
    from .video import _write_wav

    with tempfile.TemporaryDirectory(prefix="multitalk-aac-") as tmp:
        wav = os.path.join(tmp, "speech.wav")
        _write_wav(wav, samples, sample_rate)
        done = subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", wav, "-c:a", "aac",
                               "-b:a", str(bitrate), "-f", "adts", "pipe:1"], capture_output=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"ffmpeg failed to encode the audio: {stderr_tail(done.stderr)}")
    adts, frames, pos, header = done.stdout, [], 0, None
    while pos + 7 <= len(adts):
        if adts[pos] != 0xFF or adts[pos + 1] & 0xF0 != 0xF0:
            raise ValueError(f"not an ADTS frame at byte {pos}")
        header_size = 7 if adts[pos + 1] & 1 else 9
        length = ((adts[pos + 3] & 3) << 11) | (adts[pos + 4] << 3) | (adts[pos + 5] >> 5)
        header = adts[pos:pos + 7]
        frames.append(adts[pos + header_size:pos + length])
        pos += length
    if header is None:
        raise RuntimeError("ffmpeg produced no audio")
    profile, rate_index = header[2] >> 6, (header[2] >> 2) & 0xF
    channels = ((header[2] & 1) << 2) | (header[3] >> 6)
    config = _u(((profile + 1) << 11) | (rate_index << 7) | (channels << 3), 2)
    return _EncodedAudio(config, frames, sample_rate, channels)


# --------------------------------------------------------------------------- the writer
class SegmentedMp4Writer:
    """Frames in (chunk by chunk), one fMP4 segment per chunk out, as soon as it is complete.

    Args:
        height, width: frame size (odd sizes padded by one edge row/column, as the mp4).
        segment_frames: video frames of each segment (chunk), in order; their sum is the
            video's length (frames written past it are dropped).
        audio: float [N] mono speech at ``sample_rate`` (cut or zero-padded to the video's
            duration), or ``None``.
        on_segment: called with each :class:`ChunkSegment` from the reader thread as it
            completes (keep it short), or use :meth:`wait_segment`.
    """

    def __init__(self, height: int, width: int, segment_frames: Sequence[int], audio: Optional[np.ndarray] = None,
                 fps: int = 25, crf: int = 18, preset: str = "medium", sample_rate: int = SPEECH_SAMPLE_RATE,
                 on_segment: Optional[Callable[[ChunkSegment], None]] = None, audio_bitrate: int = AUDIO_BITRATE):
        from .ffmpeg import ffmpeg_exe

        counts = [int(n) for n in segment_frames]
        if not counts or min(counts) <= 0:
            raise ValueError(f"segment_frames must be positive frame counts, got {segment_frames!r}")
        self.pad_h, self.pad_w = height % 2, width % 2
        self.height, self.width, self.fps = height + self.pad_h, width + self.pad_w, fps
        self.ends = [int(e) for e in np.cumsum(counts)]
        self.num_frames, self.written = self.ends[-1], 0
        self.on_segment, self.audio_bitrate = on_segment, audio_bitrate
        self.segments: list[ChunkSegment] = []
        self.init: Optional[bytes] = None
        self._frames: list[tuple[bytes, bool, int]] = []  # (AVCC sample, keyframe, composition offset in ms)
        self._avcc: Optional[bytes] = None
        self._sequence = 0
        self._error: Optional[BaseException] = None
        self._eof = False
        self._done = threading.Condition()
        self._audio: Optional[_EncodedAudio] = None
        self._audio_thread = None
        if audio is not None:  # encoded beside the first chunk's generation, needed by the first segment
            self._audio_thread = threading.Thread(target=self._prepare_audio, args=(audio, sample_rate, audio_bitrate),
                                                  name="fmp4-audio", daemon=True)
            self._audio_thread.start()
        keyframes = "+".join(f"eq(n,{start})" for start in [0] + self.ends[:-1])
        command = [
            ffmpeg_exe(), "-y", "-hide_banner", "-loglevel", "error",
            "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{self.width}x{self.height}", "-framerate", str(fps),
            "-i", "pipe:0", "-map", "0:v:0",
            "-c:v", "libx264", "-preset", preset, "-tune", "zerolatency", "-crf", str(crf), "-pix_fmt", "yuv420p",
            "-force_key_frames", f"expr:{keyframes}", "-flush_packets", "1", "-f", "flv", "pipe:1",
        ]  # fmt: skip
        self._tmp = tempfile.TemporaryDirectory(prefix="multitalk-fmp4-")
        self.log_path = os.path.join(self._tmp.name, "ffmpeg.log")
        self._log = open(self.log_path, "wb")
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log)
        self._reader = threading.Thread(target=self._read, name="fmp4-reader", daemon=True)
        self._reader.start()

    def _prepare_audio(self, audio: np.ndarray, sample_rate: int, bitrate: int) -> None:
        try:
            samples = np.asarray(audio, dtype=np.float32).reshape(-1)
            target = int(round(self.num_frames * sample_rate / self.fps))
            samples = np.pad(samples[:target], (0, max(0, target - samples.shape[0])))
            # The encoder's first frame is priming (AAC_FRAME samples of delay), which a
            # fragmented moov has no edit list to hide: feed the speech that much later, so
            # decoded sample i is speech sample i.
            encoded = _encode_audio(samples[AAC_FRAME:], sample_rate, bitrate)
            needed = -(-target // AAC_FRAME)
            encoded.frames = encoded.frames[:needed]
            self._audio = encoded
        except BaseException as error:
            with self._done:
                self._error = error
                self._done.notify_all()

    # ------------------------------------------------------------------ input
    def write(self, frames: Union[torch.Tensor, np.ndarray]) -> None:
        """Append frames (float [3, T, H, W] in [-1, 1] or uint8 [T, H, W, 3])."""
        from .video import encoder_frames, pipe_frames

        video = encoder_frames(frames, self.num_frames - self.written, self.pad_h, self.pad_w)
        pipe_frames(self._process, video)  # if ffmpeg died, wait_segment/close report why
        self.written += len(video)

    @property
    def segments_written(self) -> int:
        """Segments whose frames have all been written (they complete shortly after)."""
        return sum(1 for end in self.ends if end <= self.written)

    # ------------------------------------------------------------------ output
    def wait_segment(self, index: int, timeout: Optional[float] = None) -> ChunkSegment:
        """Block until segment ``index`` is complete; raises if the encoder failed."""
        with self._done:
            if not self._done.wait_for(lambda: len(self.segments) > index or self._error or self._eof, timeout):
                raise TimeoutError(f"segment {index} not complete after {timeout}s")
            if len(self.segments) > index:
                return self.segments[index]
            raise RuntimeError(f"segment {index} was never completed: {self._failure()}")

    def forget(self, index: int) -> None:
        """Drop segment ``index``'s bytes once they are handed on (its metadata stays, for
        :meth:`playlist`), so a long video's stream does not pile up here."""
        with self._done:
            self.segments[index] = dataclasses.replace(self.segments[index], data=b"")

    def close(self) -> list[ChunkSegment]:
        """Finish the stream; returns all segments (complete by now; forgotten ones without data)."""
        try:
            try:
                self._process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            code = self._process.wait()
            self._reader.join()
            self._log.close()
            if code != 0 or self._error is not None or len(self.segments) != len(self.ends):
                raise RuntimeError(f"fragmented mp4 incomplete (ffmpeg exit {code}, {len(self.segments)} of "
                                   f"{len(self.ends)} segments): {self._failure()}")
            return list(self.segments)
        finally:
            self.abort()

    def abort(self) -> None:
        """Stop the encoder and remove its files (the job failed or was cancelled)."""
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        if not self._log.closed:
            self._log.close()
        with self._done:
            self._eof = True
            self._done.notify_all()
        self._tmp.cleanup()

    def playlist(self, ended: bool, **uris) -> str:
        """The HLS playlist of the segments complete so far (see :func:`hls_playlist`)."""
        return hls_playlist(list(self.segments), ended, **uris)

    def _failure(self) -> str:
        from .ffmpeg import stderr_tail

        if self._error is not None:
            return repr(self._error)
        try:
            with open(self.log_path, "rb") as log:
                return stderr_tail(log.read()) or "no error logged"
        except OSError:
            return "no log"

    # ------------------------------------------------------------------ the reader thread
    def _read(self) -> None:
        """Parse ffmpeg's FLV stream: each tag arrives whole as soon as its frame is encoded."""
        try:
            stream, buffer, pos = self._process.stdout, b"", 13  # FLV header (9) + first PreviousTagSize (4)
            while True:
                block = os.read(stream.fileno(), 1 << 16)
                if not block:
                    break
                buffer += block
                while len(buffer) >= pos + 11:
                    size = int.from_bytes(buffer[pos + 1:pos + 4], "big")
                    if len(buffer) < pos + 11 + size + 4:
                        break
                    if buffer[pos] == 9:  # video
                        self._add_video_tag(buffer[pos + 11:pos + 11 + size])
                    pos += 11 + size + 4
                buffer, pos = buffer[pos:], 0
            with self._done:
                self._eof = True
                self._done.notify_all()
        except BaseException as error:  # reported to waiters and by close
            with self._done:
                self._error = error
                self._done.notify_all()

    def _add_video_tag(self, tag: bytes) -> None:
        if tag[0] & 0x0F != 7:
            raise ValueError(f"expected H.264 in FLV, got codec id {tag[0] & 0x0F}")
        packet_type = tag[1]
        if packet_type == 0:
            self._avcc = tag[5:]
        elif packet_type == 1:
            composition = int.from_bytes(tag[2:5], "big", signed=True)
            with self._done:
                self._frames.append((tag[5:], tag[0] >> 4 == 1, composition))
                self._emit_ready()

    def _emit_ready(self) -> None:
        """Build and deliver, in order, every segment whose frames are all in (lock held)."""
        while len(self.segments) < len(self.ends) and len(self._frames) >= self.ends[len(self.segments)]:
            if self._audio_thread is not None:
                self._audio_thread.join()
                if self._error is not None:
                    raise self._error
            if self.init is None:
                self.init = self._make_init()
            self.segments.append(self._make_segment(len(self.segments)))
            self._done.notify_all()
            if self.on_segment is not None:
                self.on_segment(self.segments[-1])

    def _make_init(self) -> bytes:
        if self._avcc is None:
            raise ValueError("no H.264 decoder configuration before the first frame")
        tracks = [(1, "vide", VIDEO_TIMESCALE, _avc1(self._avcc, self.width, self.height), self.width, self.height)]
        if self._audio is not None:
            a = self._audio
            entry = _mp4a(a.config, a.sample_rate, a.channels, self.audio_bitrate)
            tracks.append((2, "soun", a.sample_rate, entry, 0, 0))
        return _init_segment(tracks)

    def _make_segment(self, index: int) -> ChunkSegment:
        first = 0 if index == 0 else self.ends[index - 1]
        end = self.ends[index]
        frame_duration = VIDEO_TIMESCALE // self.fps
        samples = [(data, SYNC_SAMPLE if key else NON_SYNC_SAMPLE, composition * VIDEO_TIMESCALE // 1000)
                   for data, key, composition in self._frames[first:end]]
        if samples[0][1] != SYNC_SAMPLE:
            raise ValueError(f"chunk {index} does not start with a keyframe")
        self._sequence += 1
        data = _fragment(self._sequence, 1, first * frame_duration, frame_duration, samples)
        if self._audio is not None:  # the AAC frames starting within this chunk's time
            rate = self._audio.sample_rate
            lo = -(-first * rate // (self.fps * AAC_FRAME))
            hi = len(self._audio.frames) if index == len(self.ends) - 1 else -(-end * rate // (self.fps * AAC_FRAME))
            frames = self._audio.frames[lo:hi]
            if frames:
                self._sequence += 1
                data += _fragment(self._sequence, 2, lo * AAC_FRAME, AAC_FRAME,
                                  [(f, SYNC_SAMPLE, 0) for f in frames])
        for slot in range(first, end):  # handed over: keep no second copy of the frames
            self._frames[slot] = (b"", False, 0)
        return ChunkSegment(index, self.init, data, end - first, end, first / self.fps, (end - first) / self.fps)


# --------------------------------------------------------------------------- for the driver
class SegmentFeed:
    """Hands each finished chunk's segment to ``on_chunk`` in order, from the event loop,
    without holding up the next chunk: after each chunk is written, :meth:`after_write`
    schedules a delivery that waits (in a worker thread) for the segment to complete and
    then calls ``on_chunk(segment)`` (awaited if it returns an awaitable) and lets the
    writer forget the segment's bytes. :meth:`finish` waits for the last delivery and
    re-raises a callback's error."""

    def __init__(self, writer: SegmentedMp4Writer, on_chunk: Callable[[ChunkSegment], Any]):
        self.writer, self.on_chunk = writer, on_chunk
        self.scheduled = 0
        self._last: Optional[asyncio.Future] = None

    def after_write(self) -> None:
        for index in range(self.scheduled, self.writer.segments_written):
            self._last = asyncio.ensure_future(self._deliver(index, self._last))
        self.scheduled = max(self.scheduled, self.writer.segments_written)

    async def _deliver(self, index: int, previous: Optional[asyncio.Future]) -> None:
        if previous is not None:
            await previous
        segment = await asyncio.to_thread(self.writer.wait_segment, index)
        result = self.on_chunk(segment)
        if hasattr(result, "__await__"):
            await result
        self.writer.forget(index)

    async def finish(self) -> None:
        self.after_write()
        if self._last is not None:
            await self._last

    def cancel(self) -> None:
        if self._last is not None:
            self._last.cancel()
