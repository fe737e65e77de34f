"""Chunk-by-chunk video: each chunk encoded once (one x264 process per chunk) into one
fragmented-MP4 segment.

A job produces its video chunk by chunk; :class:`SegmentedMp4Writer` turns each chunk's
frames into a :class:`ChunkSegment` as soon as they are written, so the chunk can be played
while later ones are still being generated, and the job's final mp4 is assembled from the
same encoded frames (``multitalk.utils.video_output``: a remux, no second x264 pass):

* each chunk is one x264 run (the imageio-ffmpeg binary; the same settings as a plain mp4:
  CRF 18, preset medium, B-frames and lookahead), so it starts with a keyframe and is
  complete the moment its last frame is in;
* the speech, known up front, is encoded to AAC once, in the background, when the
  segments carry audio;
* a chunk becomes one segment: a ``moof`` + ``mdat`` fragment of its video frames and one of
  the AAC frames that start within its time, after the shared *init* (``ftyp`` + ``moov``);
* ``init + segment 0 + ... + segment k`` is a playable fragmented MP4 of chunks ``0..k``;
  each segment also decodes on its own after the init, so the segments form an HLS (fMP4,
  version 7) media playlist as they are (:func:`hls_playlist`).

Why the fragments are written here rather than by ffmpeg's muxers: ffmpeg's ``hls`` and
``dash`` muxers close a segment only when they see the *next* segment's first keyframe (one
chunk late), and its fragmented ``mp4`` muxer cannot be told where a chunk's timeline
starts. So each chunk's ffmpeg writes FLV (each frame a tag with its decode time and
composition offset, the ``avcC`` decoder configuration up front), and this module lays the
samples into ISO BMFF boxes on one constant-rate timeline, the composition offsets taken
relative to the chunk's first (key) frame so that it is presented at the chunk's start.
Every chunk's encoder has the same settings and frame size, so every chunk has the same
``avcC``: one init serves all (checked). Audio priming: the AAC encoder delays its output by
one frame (1024 samples) and a fragmented ``moov`` has no edit list to hide that, so the
speech is fed 1024 samples late and decoded sample ``i`` is speech sample ``i``.

Every wait has a bound: an x264 run is killed after ``ENCODE_TIMEOUT_S`` and the AAC
encode is waited for at most ``AUDIO_TIMEOUT_S``; a failure of either fails the chunk that
needed it (no thread waits on another while holding a lock).
"""
from __future__ import annotations

import concurrent.futures
import os
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

SPEECH_SAMPLE_RATE = 16000
AAC_FRAME = 1024  # samples per AAC-LC frame
AUDIO_BITRATE = 128000
VIDEO_TIMESCALE = 12800  # ticks per second (512 per frame at 25 fps, as ffmpeg's mp4 muxer)
# Bounds on the waits (seconds): one chunk's x264 run (an 81-frame 720p chunk takes a few
# seconds on one core), and the AAC encode of the whole speech (10 minutes: about a second).
ENCODE_TIMEOUT_S = 600.0
AUDIO_TIMEOUT_S = 300.0


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
    video_bytes: Optional[int] = None  # ``data[:video_bytes]`` is the video fragment alone (None: all of it)


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
class EncodedAudio:
    config: bytes  # AudioSpecificConfig
    frames: list[bytes]  # raw AAC frames of AAC_FRAME samples each
    sample_rate: int
    channels: int


def encode_aac(samples: np.ndarray, sample_rate: int, bitrate: int, timeout: float = AUDIO_TIMEOUT_S) -> EncodedAudio:
    """A whole speech track → raw AAC-LC frames (ffmpeg, ADTS parsed here)."""
    from .ffmpeg import ffmpeg_exe, stderr_tail
    from .video import write_wav

    with tempfile.TemporaryDirectory(prefix="multitalk-aac-") as tmp:
        wav = os.path.join(tmp, "speech.wav")
        write_wav(wav, samples, sample_rate)
        done = subprocess.run([ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-i", wav, "-c:a", "aac",
                               "-b:a", str(bitrate), "-f", "adts", "pipe:1"], capture_output=True, timeout=timeout)
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
    return EncodedAudio(config, frames, sample_rate, channels)


def _speech_for_segments(audio: np.ndarray, frames: int, fps: int, sample_rate: int, bitrate: int) -> EncodedAudio:
    """The speech cut or zero-padded to ``frames`` video frames, encoded 1024 samples late
    (the priming frame a fragmented moov cannot hide, see the module docstring)."""
    samples = np.asarray(audio, dtype=np.float32).reshape(-1)
    target = int(round(frames * sample_rate / fps))
    samples = np.pad(samples[:target], (0, max(0, target - samples.shape[0])))
    encoded = encode_aac(samples[AAC_FRAME:], sample_rate, bitrate)
    encoded.frames = encoded.frames[:-(-target // AAC_FRAME)]
    return encoded


# --------------------------------------------------------------------------- one chunk through x264
@dataclass
class EncodedChunk:
    """One chunk's H.264 samples in decode order: ``(AVCC data, keyframe, composition offset
    in ms)``, and the encoder's ``avcC`` decoder configuration."""

    avcc: bytes
    samples: list[tuple[bytes, bool, int]]


def parse_flv(data: bytes) -> EncodedChunk:
    """The video tags of an FLV stream (H.264) → :class:`EncodedChunk`."""
    if data[:3] != b"FLV":
        raise ValueError("the encoder produced no FLV stream")
    pos, avcc, samples = 13, None, []  # FLV header (9) + first PreviousTagSize (4)
    while pos + 11 <= len(data):
        size = int.from_bytes(data[pos + 1:pos + 4], "big")
        if pos + 11 + size > len(data):
            raise ValueError("truncated FLV tag")
        if data[pos] == 9:  # video
            tag = data[pos + 11:pos + 11 + size]
            if tag[0] & 0x0F != 7:
                raise ValueError(f"expected H.264 in FLV, got codec id {tag[0] & 0x0F}")
            if tag[1] == 0:
                avcc = tag[5:]
            elif tag[1] == 1:
                samples.append((tag[5:], tag[0] >> 4 == 1, int.from_bytes(tag[2:5], "big", signed=True)))
        pos += 11 + size + 4
    if avcc is None:
        raise ValueError("no H.264 decoder configuration in the encoder's output")
    return EncodedChunk(avcc, samples)


def encode_chunk(video: np.ndarray, fps: int, crf: int, preset: str, timeout: float = ENCODE_TIMEOUT_S,
                 on_start: Optional[Callable[[subprocess.Popen], None]] = None) -> EncodedChunk:
    """uint8 ``[T, H, W, 3]`` (even sizes) → one x264 run → :class:`EncodedChunk`.

    The frames are fed from a thread while this one reads the encoder's output; the run is
    killed after ``timeout`` seconds (a :class:`TimeoutError` then). ``on_start``: called
    with the process (the writer keeps it, to kill it on abort)."""
    from .ffmpeg import ffmpeg_exe, stderr_tail

    frames, height, width, _ = video.shape
    command = [
        ffmpeg_exe(), "-y", "-hide_banner", "-nostdin", "-loglevel", "error",
        "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-framerate", str(fps), "-i", "pipe:0",
        "-map", "0:v:0", "-frames:v", str(frames), "-c:v", "libx264", "-preset", preset, "-crf", str(crf),
        "-pix_fmt", "yuv420p", "-f", "flv", "pipe:1",
    ]  # fmt: skip
    with tempfile.TemporaryFile(prefix="multitalk-x264-") as log:
        process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)
        if on_start is not None:
            on_start(process)
        timed_out = threading.Event()

        def kill_late() -> None:
            timed_out.set()
            process.kill()

        watchdog = threading.Timer(timeout, kill_late)
        watchdog.daemon = True

        def feed() -> None:
            try:
                process.stdin.write(memoryview(np.ascontiguousarray(video)).cast("B"))
            except (BrokenPipeError, OSError, ValueError):
                pass  # the encoder died; its exit code and log say why
            finally:
                try:
                    process.stdin.close()
                except (BrokenPipeError, OSError):
                    pass

        feeder = threading.Thread(target=feed, name="x264-feed", daemon=True)
        watchdog.start()
        feeder.start()
        try:
            output = process.stdout.read()
            code = process.wait()
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
            process.stdout.close()
            feeder.join()
        if timed_out.is_set():
            raise TimeoutError(f"the H.264 encoder did not finish {frames} frames within {timeout:g} s")
        if code != 0:
            log.seek(0)
            raise RuntimeError(f"ffmpeg failed to encode the video (exit {code}): {stderr_tail(log.read())}")
    chunk = parse_flv(output)
    if len(chunk.samples) != frames:
        raise RuntimeError(f"the encoder returned {len(chunk.samples)} of {frames} frames")
    return chunk


# --------------------------------------------------------------------------- the writer
class SegmentedMp4Writer:
    """Frames in, chunk by chunk; one fMP4 segment per chunk out, one x264 run per chunk.

    Args:
        height, width: frame size (odd sizes padded by one edge row/column: H.264 4:2:0).
        segment_frames: video frames of each segment (chunk), in order; their sum is the
            video's length. :meth:`write` takes any split of the frames; frames past the end
            are dropped.
        audio: float [N] mono speech at ``sample_rate`` (cut or zero-padded to the video's
            duration) for the segments' audio track, or ``None`` for video-only segments.

    :meth:`write` blocks while it encodes the chunks its frames complete and returns their
    segments. Not thread-safe: one writer thread. :meth:`abort` (any thread) kills a running
    encoder.
    """

    def __init__(self, height: int, width: int, segment_frames: Sequence[int], audio: Optional[np.ndarray] = None,
                 fps: int = 25, crf: int = 18, preset: str = "medium", sample_rate: int = SPEECH_SAMPLE_RATE,
                 audio_bitrate: int = AUDIO_BITRATE):
        counts = [int(n) for n in segment_frames]
        if not counts or min(counts) <= 0:
            raise ValueError(f"segment_frames must be positive frame counts, got {segment_frames!r}")
        self.pad_h, self.pad_w = height % 2, width % 2
        self.height, self.width, self.fps, self.crf, self.preset = height + self.pad_h, width + self.pad_w, fps, crf, preset
        self.counts = counts
        self.ends = [int(e) for e in np.cumsum(counts)]
        self.num_frames, self.written, self.audio_bitrate = self.ends[-1], 0, audio_bitrate
        self.init: Optional[bytes] = None
        self.video_init: Optional[bytes] = None  # the init of the video track alone
        self.completed = 0  # segments made so far
        self._avcc: Optional[bytes] = None
        self._pending: list[np.ndarray] = []  # frames of the chunk being filled
        self._sequence = 0
        self._process: Optional[subprocess.Popen] = None
        self._aborted = False
        self._audio: Optional[concurrent.futures.Future] = None
        if audio is not None:  # encoded beside the first chunk's generation; needed by the first segment
            self._audio = concurrent.futures.Future()
            threading.Thread(target=self._encode_audio, args=(audio, sample_rate), name="fmp4-audio",
                             daemon=True).start()

    def _encode_audio(self, audio: np.ndarray, sample_rate: int) -> None:
        try:
            self._audio.set_result(_speech_for_segments(audio, self.num_frames, self.fps, sample_rate,
                                                        self.audio_bitrate))
        except BaseException as error:  # handed to the chunk that needs the audio
            self._audio.set_exception(error)

    def _encoded_audio(self) -> Optional[EncodedAudio]:
        if self._audio is None:
            return None
        try:
            return self._audio.result(timeout=AUDIO_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"the AAC encode did not finish within {AUDIO_TIMEOUT_S:g} s") from None

    # ------------------------------------------------------------------ input
    def write(self, frames: Union[torch.Tensor, np.ndarray]) -> list[ChunkSegment]:
        """Append frames (uint8 ``[T, H, W, 3]`` or float ``[3, T, H, W]`` in [-1, 1]); returns
        the segments these frames completed (encoded now, in this thread)."""
        from .video import encoder_frames

        video = encoder_frames(frames, self.num_frames - self.written, self.pad_h, self.pad_w)
        self.written += len(video)
        made = []
        while len(video):
            filled = sum(len(f) for f in self._pending)
            missing = self.counts[self.completed] - filled
            self._pending.append(video[:missing])
            video = video[missing:]
            if filled + len(self._pending[-1]) == self.counts[self.completed]:
                chunk = self._pending[0] if len(self._pending) == 1 else np.concatenate(self._pending)
                self._pending = []
                made.append(self._segment(chunk))
        return made

    @property
    def segments_written(self) -> int:
        """Segments complete so far."""
        return self.completed

    def close(self) -> None:
        """Check that every segment was made."""
        if self.completed != len(self.ends):
            raise RuntimeError(f"fragmented mp4 incomplete: {self.completed} of {len(self.ends)} segments "
                               f"({self.written} of {self.num_frames} frames written)")

    def abort(self) -> None:
        """Stop a running encoder (the job failed or was cancelled)."""
        self._aborted = True
        process = self._process
        if process is not None and process.poll() is None:
            process.kill()

    # ------------------------------------------------------------------ output
    def _segment(self, video: np.ndarray) -> ChunkSegment:
        if self._aborted:
            raise RuntimeError("the video output was aborted")
        chunk = encode_chunk(video, self.fps, self.crf, self.preset, ENCODE_TIMEOUT_S,
                             on_start=lambda p: setattr(self, "_process", p))
        self._process = None
        if self._avcc is None:
            self._avcc = chunk.avcc
            self.video_init = self._make_init(None)
            audio = self._encoded_audio()
            self.init = self._make_init(audio) if audio is not None else self.video_init
        elif chunk.avcc != self._avcc:
            raise RuntimeError(f"chunk {self.completed} was encoded with another H.264 configuration")
        segment = self._make_segment(self.completed, chunk.samples, self._encoded_audio())
        self.completed += 1
        return segment

    def _make_init(self, audio: Optional[EncodedAudio]) -> bytes:
        tracks = [(1, "vide", VIDEO_TIMESCALE, _avc1(self._avcc, self.width, self.height), self.width, self.height)]
        if audio is not None:
            entry = _mp4a(audio.config, audio.sample_rate, audio.channels, self.audio_bitrate)
            tracks.append((2, "soun", audio.sample_rate, entry, 0, 0))
        return _init_segment(tracks)

    def _make_segment(self, index: int, encoded: list[tuple[bytes, bool, int]],
                      audio: Optional[EncodedAudio]) -> ChunkSegment:
        first = 0 if index == 0 else self.ends[index - 1]
        end = self.ends[index]
        frame_duration = VIDEO_TIMESCALE // self.fps
        if not encoded[0][1]:
            raise ValueError(f"chunk {index} does not start with a keyframe")
        # The first sample (the keyframe) is presented at the chunk's start: offsets relative to its own.
        base = encoded[0][2]
        samples = [(data, SYNC_SAMPLE if key else NON_SYNC_SAMPLE, (composition - base) * VIDEO_TIMESCALE // 1000)
                   for data, key, composition in encoded]
        self._sequence += 1
        data = _fragment(self._sequence, 1, first * frame_duration, frame_duration, samples)
        video_bytes = len(data)
        if audio is not None:  # the AAC frames starting within this chunk's time
            rate = audio.sample_rate
            lo = -(-first * rate // (self.fps * AAC_FRAME))
            hi = len(audio.frames) if index == len(self.ends) - 1 else -(-end * rate // (self.fps * AAC_FRAME))
            frames = audio.frames[lo:hi]
            if frames:
                self._sequence += 1
                data += _fragment(self._sequence, 2, lo * AAC_FRAME, AAC_FRAME, [(f, SYNC_SAMPLE, 0) for f in frames])
        return ChunkSegment(index, self.init, data, end - first, end, first / self.fps, (end - first) / self.fps,
                            video_bytes)
