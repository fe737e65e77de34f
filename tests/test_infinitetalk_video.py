"""Source videos for InfiniteTalk video-to-video: probing, the caps, codecs, 25 fps, and
every bad-input case as an InputError naming the field (multitalk.utils.video_source)."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

from multitalk.api import GenerationRequest, InputError
from multitalk.utils.video_source import VideoLimits, VideoSource


def _ffmpeg() -> str:
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def _encode(tmp_path, name: str, args: list[str], source: list[str]) -> bytes:
    out = tmp_path / name
    subprocess.run([_ffmpeg(), "-y", "-loglevel", "error", *source, *args, str(out)], check=True,
                   capture_output=True)
    return out.read_bytes()


def _testsrc(seconds=1, rate=25, size="64x64") -> list[str]:
    return ["-f", "lavfi", "-i", f"testsrc=size={size}:rate={rate}:duration={seconds}"]


def _numbered(tmp_path, rate: int, frames: int, name: str = "numbered.mp4") -> bytes:
    """Grey frames whose level is 5 x their index (lossless H.264), at ``rate`` fps."""
    raw = np.concatenate([np.full((1, 64, 64, 3), 5 * i, np.uint8) for i in range(frames)]).tobytes()
    out = tmp_path / name
    subprocess.run([_ffmpeg(), "-y", "-loglevel", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "64x64",
                    "-framerate", str(rate), "-i", "pipe:0", "-c:v", "libx264", "-qp", "0", "-pix_fmt", "yuv444p",
                    str(out)], input=raw, check=True, capture_output=True)
    return out.read_bytes()


CODECS = {
    "h264": (["-c:v", "libx264", "-pix_fmt", "yuv420p"], "mp4"),
    "hevc": (["-c:v", "libx265", "-pix_fmt", "yuv420p", "-x265-params", "log-level=none"], "mp4"),
    "vp9": (["-c:v", "libvpx-vp9", "-pix_fmt", "yuv420p"], "webm"),
    "av1": (["-c:v", "libsvtav1", "-pix_fmt", "yuv420p"], "mkv"),
}


@pytest.mark.parametrize("codec", sorted(CODECS))
def test_the_bundled_ffmpeg_decodes_each_codec(tmp_path, codec):
    args, ext = CODECS[codec]
    data = _encode(tmp_path, f"src.{ext}", args, _testsrc(seconds=1))
    with VideoSource(data) as source:
        assert source.info.codec == codec and (source.info.width, source.info.height) == (64, 64)
        frame = source.frame(24)
        assert frame.shape == (64, 64, 3) and frame.dtype == np.uint8 and frame.std() > 10
        assert source.frame(1000) is not None and source.frames_read == 25  # 1 s at 25 fps, then held


@pytest.mark.parametrize("rate", [50, 30, 25])
def test_any_fps_is_read_at_25(tmp_path, rate):
    data = _numbered(tmp_path, rate, frames=rate)  # one second of frames numbered by level
    with VideoSource(data) as source:
        for index in (0, 5, 12, 24):
            expected = int(round(index * rate / 25))  # ffmpeg's fps filter: nearest by timestamp
            assert abs(source.frame(index).mean() - 5 * expected) <= 1.5, (rate, index, source.frame(index).mean())
        assert source.frame(24).mean() == pytest.approx(source.frame(30).mean())  # past the end: held
        assert source.frames_read == 25


def test_decoding_stops_where_asked_and_earlier_frames_restart(tmp_path):
    data = _numbered(tmp_path, 25, frames=30)
    with VideoSource(data) as source:
        source.frame(10)
        assert source.frames_read == 11 and not source.ended
        assert abs(source.frame(3).mean() - 15) <= 1.5  # earlier: the decoder restarts
        assert source.frames_read == 4


def test_the_fixture_video(fixtures_dir):
    with VideoSource((fixtures_dir / "video" / "ref_video.mp4").read_bytes()) as source:
        info = source.info
        assert (info.codec, info.width, info.height, info.fps, info.duration) == ("h264", 458, 458, 25.0, 15.0)
        last = source.frame(374)
        assert source.frame(400) is last  # 15 s = 375 frames; past the end the last one is held


@pytest.mark.parametrize("make, message", [
    (lambda tmp, fx: b"\x00garbage" * 200, "not a video file"),
    (lambda tmp, fx: (fx / "single" / "1.wav").read_bytes(), "no video stream"),
    (lambda tmp, fx: (fx / "single" / "single1.png").read_bytes(), "still image"),
    (lambda tmp, fx: b"", "empty"),
])
def test_bad_files_name_the_field(tmp_path, fixtures_dir, make, message):
    with pytest.raises(InputError) as e:
        VideoSource(make(tmp_path, fixtures_dir))
    assert e.value.field == "condition_video" and e.value.status == 422 and message in e.value.message


def test_an_undecodable_stream_is_refused_before_use(tmp_path):
    data = bytearray(_encode(tmp_path, "src.mp4", CODECS["h264"][0], _testsrc()))
    at = data.find(b"mdat")
    size = int.from_bytes(data[at - 4:at], "big")
    data[at + 4:at - 4 + size] = bytes(size - 8)  # the header survives, the coded frames do not
    with pytest.raises(InputError) as e:
        VideoSource(bytes(data))
    assert e.value.field == "condition_video" and "could not be decoded" in e.value.message


@pytest.mark.parametrize("limits, message", [
    (VideoLimits(max_bytes=1000), "bytes"),
    (VideoLimits(max_seconds=1.5), "lasts"),
    (VideoLimits(max_pixels=64 * 48), "pixels"),
])
def test_caps_are_checked_from_the_header(tmp_path, limits, message, monkeypatch):
    data = _encode(tmp_path, "src.mp4", CODECS["h264"][0], _testsrc(seconds=2))
    started = []
    monkeypatch.setattr(VideoSource, "_start", lambda self: started.append(1))
    with pytest.raises(InputError) as e:
        VideoSource(data, limits)
    assert e.value.field == "condition_video" and e.value.status == 413 and message in e.value.message
    assert not started  # refused before any decoding


def test_small_frames_are_refused(tmp_path):
    data = _encode(tmp_path, "src.mp4", CODECS["h264"][0], _testsrc(size="48x48"))
    with pytest.raises(InputError, match="at least 64") as e:
        VideoSource(data)
    assert e.value.status == 422


def test_a_video_and_an_image_both_or_neither(fixtures_dir):
    from multitalk.infinitetalk import check_condition

    wav = (fixtures_dir / "single" / "1.wav").read_bytes()
    png = (fixtures_dir / "single" / "single1.png").read_bytes()
    with pytest.raises(InputError) as e:
        check_condition(GenerationRequest(image=png, audio=[wav], video=b"video"))
    assert e.value.field == "condition_video" and "not both" in e.value.message
    with pytest.raises(InputError) as e:
        check_condition(GenerationRequest(image=None, audio=[wav]))
    assert e.value.field == "condition_image"
    check_condition(GenerationRequest(image=None, audio=[wav], video=b"video"))
    check_condition(GenerationRequest(image=png, audio=[wav]))


def test_the_pipeline_refuses_bad_videos_before_the_models_run(fixtures_dir, tmp_path):
    """Through multitalk.infinitetalk.generate: the video checks come first (limits from Limits)."""
    import asyncio

    from multitalk import infinitetalk
    from multitalk.api import Limits

    class NoStages:  # any model call would fail the test
        lip_sync = True

        async def prepare(self):
            return None

        def __getattr__(self, name):
            raise AssertionError(f"stage {name} called")

    wav = (fixtures_dir / "single" / "1.wav").read_bytes()
    video = _encode(tmp_path, "src.mp4", CODECS["h264"][0], _testsrc(seconds=2))
    for limits, request in [
        (Limits(max_video_seconds=1.0), infinitetalk.infinitetalk_request([wav], video=video)),
        (Limits(max_video_pixels=100), infinitetalk.infinitetalk_request([wav], video=video)),
        (Limits(), infinitetalk.infinitetalk_request([wav], video=b"not a video at all")),
        (Limits(), infinitetalk.infinitetalk_request([wav], video=video, image=b"png")),
    ]:
        with pytest.raises(InputError) as e:
            asyncio.run(infinitetalk.generate(request, NoStages(), limits=limits))
        assert e.value.field == "condition_video"
