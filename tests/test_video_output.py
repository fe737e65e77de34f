"""A job's video output (multitalk/utils/video_output.py, segments.py): each frame through
x264 once, the final mp4 remuxed from the encoded chunks, and no hang or leak when ffmpeg
misbehaves (issue 23 item 5: every wait bounded, no lock held while waiting, construction
cleans up what it started).

ffmpeg is replaced by a wrapper script that logs its command line and, for the cases that
need it, fails or hangs where asked; everything else is the real binary."""
from __future__ import annotations

import asyncio
import os
import subprocess
import tempfile
import time

import numpy as np
import psutil
import pytest
from fakes import make_client, wait_state

from multitalk.api import GenerationResult
from multitalk.utils import ffmpeg as ffmpeg_module
from multitalk.utils import segments as segments_module
from multitalk.utils.video_output import VideoOutput

H, W = 48, 64
SPEECH = (0.2 * np.sin(np.arange(24 * 640) * 2 * np.pi * 200 / 16000)).astype(np.float32)


def _wrap_ffmpeg(monkeypatch, tmp_path, when: str = "", then: str = "") -> str:
    """ffmpeg behind a wrapper logging each command line; for a command line matching the
    shell pattern ``when``, run ``then`` instead. Returns the log's path."""
    real = ffmpeg_module.ffmpeg_exe()
    log = tmp_path / "ffmpeg-calls.log"
    script = tmp_path / "ffmpeg"
    script.write_text("#!/bin/sh\n"
                      f"echo \"$*\" >> '{log}'\n"
                      + (f"case \"$*\" in {when}) {then} ;; esac\n" if when else "")
                      + f"exec '{real}' \"$@\"\n")
    script.chmod(0o755)
    monkeypatch.setattr(ffmpeg_module, "ffmpeg_exe", lambda: str(script))
    return str(log)


def _frames(count: int, start: int = 0) -> np.ndarray:
    return np.stack([np.full((H, W, 3), 4 * (n % 60), np.uint8) for n in range(start, start + count)])


def _decode(data: bytes, tmp_path, name: str) -> np.ndarray:
    path = tmp_path / name
    path.write_bytes(data)
    out = subprocess.run([ffmpeg_module.ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-fps_mode", "passthrough", "pipe:1"], capture_output=True, check=True)
    return np.frombuffer(out.stdout, np.uint8).reshape(-1, H, W, 3)


def test_each_frame_is_encoded_once_and_the_mp4_is_remuxed_from_the_chunks(monkeypatch, tmp_path):
    """Three chunks: three x264 runs covering each frame once, and one remux copying the
    H.264 samples: the mp4 decodes to exactly the frames the chunks' segments decode to,
    with the speech as its audio track."""
    log = _wrap_ffmpeg(monkeypatch, tmp_path)
    delivered = []

    async def run():
        out = VideoOutput(H, W, 41, SPEECH, 25, [17, 12, 12], delivered.append)
        for start, count in ((0, 17), (17, 12), (29, 12)):
            await out.write(_frames(count, start))
        return await out.close()

    video = asyncio.run(run())
    calls = open(log).read().splitlines()
    x264 = [c.split() for c in calls if "libx264" in c]
    assert [int(c[c.index("-frames:v") + 1]) for c in x264] == [17, 12, 12]  # 41 frames, one pass each
    remux = [c for c in calls if "-c:v copy" in c]
    assert len(remux) == 1 and len(calls) == 1 + 3 + 1  # + the segments' AAC
    mp4 = video.read_bytes()
    assert mp4.index(b"moov") < mp4.index(b"mdat")  # faststart
    from multitalk.utils.video import probe_mp4

    info = probe_mp4(mp4)
    assert info["num_frames"] == 41 and info["fps"] == 25 and info["audio_codec"] == "aac"
    streamed = delivered[0].init + b"".join(s.data for s in delivered)
    assert np.array_equal(_decode(mp4, tmp_path, "final.mp4"), _decode(streamed, tmp_path, "stream.mp4"))
    folder = os.path.dirname(video.path)
    video.release()
    assert not os.path.exists(folder)


@pytest.mark.timeout(180)
def test_an_aac_failure_fails_the_job_within_its_timeout(monkeypatch, tmp_path):
    """The speech's AAC encode fails (after 2 s) while the first chunk's segment is being
    made: the job ends FAILED, naming the audio encode, instead of both the segment writer's
    threads waiting for each other forever (main, before issue 21: the reader thread joined
    the audio thread while holding the lock the audio thread's failure path needed)."""
    _wrap_ffmpeg(monkeypatch, tmp_path, when="*' -f adts '*",
                 then="sleep 2; echo 'injected AAC failure' >&2; exit 1")

    async def generate(request, stages, progress=None, limits=None, on_chunk=None):
        out = VideoOutput(H, W, 24, SPEECH, 25, [12, 12], on_chunk)
        try:
            for start in (0, 12):
                await out.write(_frames(12, start))
            video = await out.close()
        except BaseException:
            out.abort()
            raise
        return GenerationResult(None, 24, 25, W, H, 2, True, video_file=video)

    client, service, _ = make_client(tmp_path)
    service.runner.generate_fn = generate
    with client:
        job_id = client.post("/v1/jobs", json={"image": "multi1.png", "audio": ["1.wav"], "mode": "streaming",
                                               "frames": 17, "motion_frames": 5}).json()["id"]
        status = wait_state(client, job_id, timeout=60)
    assert status["state"] == "FAILED", status
    assert "encode the audio" in status["error"]["message"] and "injected AAC failure" in status["error"]["message"]


@pytest.mark.timeout(180)
def test_a_hung_encoder_fails_within_the_encode_timeout(monkeypatch, tmp_path):
    """An x264 run that never ends is killed after ENCODE_TIMEOUT_S and the write fails,
    saying so (main: the chunk's segment was waited for without a timeout)."""
    _wrap_ffmpeg(monkeypatch, tmp_path, when="*libx264*", then="exec sleep 600")
    monkeypatch.setattr(segments_module, "ENCODE_TIMEOUT_S", 2.0, raising=False)

    async def run():
        out = VideoOutput(H, W, 24, SPEECH, 25, [12, 12], lambda segment: None)
        try:
            for start in (0, 12):
                await out.write(_frames(12, start))
            await out.close()
        finally:
            out.abort()

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not finish 12 frames within 2 s"):
        asyncio.run(asyncio.wait_for(run(), 90))
    assert time.monotonic() - started < 60
    assert not [p for p in psutil.Process().children(recursive=True) if p.is_running() and "sleep" in p.name()]


@pytest.mark.timeout(120)
def test_a_failed_construction_leaves_no_process_or_folder(monkeypatch, tmp_path):
    """VideoOutput's construction fails part-way (a bad segment list; the stream file not
    creatable): no ffmpeg process and no temporary folder is left behind (main: the mp4
    writer's ffmpeg and its folder were, when the segment writer raised)."""
    import multitalk.utils.video_output as video_output

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    ours = {p.pid for p in psutil.Process().children(recursive=True)}

    def leftovers():
        deadline = time.monotonic() + 10  # the AAC encode of a started writer ends on its own
        while time.monotonic() < deadline:
            procs = [p for p in psutil.Process().children(recursive=True) if p.pid not in ours and p.is_running()
                     and p.status() != psutil.STATUS_ZOMBIE]
            if not os.listdir(scratch) and not procs:
                return []
            time.sleep(0.1)
        return os.listdir(scratch) + [p.name() for p in procs]

    with pytest.raises(ValueError):
        VideoOutput(H, W, 10, SPEECH, 25, [5, 0], lambda segment: None)
    assert leftovers() == []

    def no_disk(*args, **kwargs):
        raise OSError("no space left on device")

    monkeypatch.setattr(video_output, "open", no_disk, raising=False)
    with pytest.raises(OSError, match="no space"):
        VideoOutput(H, W, 10, SPEECH, 25, [5, 5], lambda segment: None)
    assert leftovers() == []
