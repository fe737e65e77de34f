"""Chunk-by-chunk results: one fragmented-MP4 segment per chunk, readable while the job runs."""
from __future__ import annotations

import asyncio
import json
import subprocess
import threading

import numpy as np
import pytest

from multitalk.api import GenerationRequest, SamplingOptions
from multitalk.generation.planning import chunk_frames
from multitalk.utils.segments import SegmentedMp4Writer, hls_playlist
from multitalk.utils.video import probe_mp4

H, W = 48, 64


def _decode_frames(data: bytes, tmp_path, name: str) -> np.ndarray:
    import imageio_ffmpeg

    path = tmp_path / name
    path.write_bytes(data)
    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-fps_mode", "passthrough", "pipe:1"], capture_output=True, check=True)
    return np.frombuffer(out.stdout, np.uint8).reshape(-1, H, W, 3)


def _levels(frames: np.ndarray) -> list[int]:
    return [int(round(f.mean() / 4)) for f in frames]


def test_each_segment_completes_as_soon_as_its_chunk_is_written(tmp_path):
    """The writer alone: the write that completes a chunk returns its segment (no later frame
    needed); the segments so far decode to exactly those frames, each segment also decodes
    on its own after the init, and at the end init + segments is the whole video with its
    audio. A chunk may arrive in pieces."""
    counts = [17, 12, 12, 9]
    total = sum(counts)
    speech = (0.2 * np.sin(np.arange(total * 640) * 2 * np.pi * 200 / 16000)).astype(np.float32)
    writer = SegmentedMp4Writer(H, W, counts, speech, 25, preset="veryfast")
    delivered = []
    written = 0
    for index, count in enumerate(counts):
        frames = np.stack([np.full((H, W, 3), 4 * (n % 60), np.uint8) for n in range(written, written + count)])
        if index == 2:  # in two pieces: nothing until the chunk is complete
            assert writer.write(frames[:5]) == []
            frames = frames[5:]
        made = writer.write(frames)
        written += count
        assert [s.index for s in made] == [index]
        segment = made[0]
        delivered.append(segment)
        assert (segment.index, segment.frames, segment.frames_so_far) == (index, count, written)
        so_far = _decode_frames(segment.init + b"".join(s.data for s in delivered), tmp_path, f"so_far_{index}.mp4")
        assert _levels(so_far) == [n % 60 for n in range(written)]
        alone = _decode_frames(segment.init + segment.data, tmp_path, f"alone_{index}.mp4")
        assert len(alone) == count  # starts with a keyframe
    writer.close()
    whole = delivered[0].init + b"".join(s.data for s in delivered)
    info = probe_mp4(whole)
    assert info["num_frames"] == total and info["audio_codec"] == "aac"
    assert info["audio_duration"] == pytest.approx(total / 25, abs=0.07)
    assert [s.start for s in delivered] == pytest.approx([0, 17 / 25, 29 / 25, 41 / 25])


def test_the_segments_play_as_an_hls_playlist(tmp_path):
    import imageio_ffmpeg

    writer = SegmentedMp4Writer(H, W, [9, 8, 8], np.zeros(25 * 640, np.float32), 25, preset="veryfast")
    segments = writer.write(np.zeros((25, H, W, 3), np.uint8))
    writer.close()
    (tmp_path / "init.mp4").write_bytes(segments[0].init)
    for s in segments:
        (tmp_path / f"segment_{s.index}.m4s").write_bytes(s.data)
    text = hls_playlist(segments, ended=True)
    assert text.count("#EXTINF:") == 3 and "#EXT-X-MAP:URI=\"init.mp4\"" in text and text.endswith("#EXT-X-ENDLIST\n")
    assert "#EXT-X-ENDLIST" not in hls_playlist(segments[:1], ended=False)
    (tmp_path / "video.m3u8").write_text(text)
    out = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(tmp_path / "video.m3u8"),
                          "-map", "0:v:0", "-fps_mode", "passthrough", "-f", "rawvideo", "-pix_fmt", "rgb24",
                          "pipe:1"], capture_output=True, check=True).stdout
    assert len(out) == 25 * H * W * 3


def test_chunk_frames_follow_the_plan_and_skip_chunks_cut_off():
    assert chunk_frames(3, 17, 5, 41) == [17, 12, 12]
    assert chunk_frames(1, 17, 5, 17) == [17]
    # a last chunk whose frames all fall past the end (its audio extension) adds no segment
    assert chunk_frames(3, 17, 5, 27) == [17, 10]


def test_a_streaming_job_hands_over_its_first_chunk_while_later_chunks_are_generated(tiny_official, fixtures_dir,
                                                                                      tmp_path):
    """The second chunk's sampling does not finish until the first chunk's segment has been
    fetched and decoded by the callback (a wait on an event, with a timeout): had the
    segment come only at the end, or only once a later chunk is written, that wait would
    time out. At the end init + segments is the whole video, and the mp4 is the one a job
    without the callback makes."""
    from multitalk.pipeline import MultiTalkPipeline

    pipe = MultiTalkPipeline.from_pretrained(str(tiny_official))
    events: list[tuple] = []
    first_decoded = threading.Event()
    waited: list[bool] = []
    original_sample = pipe.stages.diffusion.sample

    def sample(job, audio, image, text, on_step=None):
        chunk = job.audio_start // 12
        events.append(("sample started", chunk))
        latents = original_sample(job, audio, image, text, on_step)
        if chunk == 1:
            waited.append(first_decoded.wait(timeout=120))
        events.append(("sample finished", chunk))
        return latents

    pipe.stages.diffusion.sample = sample
    segments = []

    async def on_chunk(segment):
        so_far = segment.init + b"".join(s.data for s in segments + [segment])
        info = await asyncio.to_thread(probe_mp4, so_far)
        events.append(("segment decoded", segment.index, info["num_frames"]))
        segments.append(segment)
        if segment.index == 0:
            first_decoded.set()

    single = fixtures_dir / "single"
    request = GenerationRequest(
        image=(single / "single1.png").read_bytes(), audio=[(single / "1.wav").read_bytes()], size="multitalk-32",
        mode="streaming", frames=17, motion_frames=5, max_frames=17 + 3 * 12, color_correction=0.0,
        sampling=SamplingOptions(steps=1),
    )
    result = asyncio.run(pipe.agenerate(request, on_chunk=on_chunk))
    assert waited == [True], "the first chunk's segment was not handed over while the second chunk was sampled"
    assert result.chunks == 4 and [s.index for s in segments] == [0, 1, 2, 3]
    first = events.index(("segment decoded", 0, 17))
    assert first < events.index(("sample finished", 1)) < events.index(("sample started", 3))
    decoded = [e[2] for e in events if e[0] == "segment decoded"]
    assert [s.frames_so_far for s in segments] == [17, 29, 41, 53] == decoded
    assert probe_mp4(segments[0].init + b"".join(s.data for s in segments))["num_frames"] == result.num_frames == 53
    pipe.stages.diffusion.sample = original_sample
    assert pipe.generate(request).video == result.video


def test_playlist_text_is_plain_hls():
    from multitalk.utils.segments import ChunkSegment

    text = hls_playlist([ChunkSegment(0, b"", b"", 81, 81, 0.0, 3.24)], ended=False, init_uri="i.mp4",
                        segment_uri="/v1/jobs/x/chunks/{index}")
    assert text.splitlines()[:4] == ["#EXTM3U", "#EXT-X-VERSION:7", "#EXT-X-PLAYLIST-TYPE:EVENT",
                                     "#EXT-X-TARGETDURATION:4"]
    assert "/v1/jobs/x/chunks/0" in text and json.dumps(text)


def test_a_silent_video_makes_a_video_only_stream(tmp_path):
    writer = SegmentedMp4Writer(H + 1, W, [5, 4], None, 25, preset="veryfast")  # odd height: padded, as the mp4
    segments = writer.write(np.zeros((5, H + 1, W, 3), np.uint8))
    segments += writer.write(np.zeros((6, H + 1, W, 3), np.uint8))  # two frames too many: dropped
    writer.close()
    info = probe_mp4(segments[0].init + b"".join(s.data for s in segments))
    assert info["num_frames"] == 9 and info["audio_codec"] is None and (info["height"], info["width"]) == (H + 2, W)
