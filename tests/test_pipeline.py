"""End-to-end generation in one process on tiny weights (fixtures from ../shared)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from multitalk.api import GenerationRequest, InputError, SamplingOptions
from multitalk.generation.planning import plan_chunks
from multitalk.utils.video import probe_mp4


def _request(fixtures_dir, people=2, **kw):
    p = json.loads((fixtures_dir / "prompts.json").read_text())["multi1" if people == 2 else "single"]
    if people == 2:
        audio = [(fixtures_dir / "multi1" / "1.wav").read_bytes(), (fixtures_dir / "multi1" / "2.wav").read_bytes()]
        image = (fixtures_dir / "multi1" / "multi1.png").read_bytes()
        bbox = [p["bbox"]["person1"], p["bbox"]["person2"]]
    else:
        audio = [(fixtures_dir / "single" / "1.wav").read_bytes()]
        image = (fixtures_dir / "single" / "single1.png").read_bytes()
        bbox = None
    args = dict(image=image, audio=audio, prompt=p["prompt"], bbox=bbox, size="multitalk-128", frames=17,
                sampling=SamplingOptions(steps=3), color_correction=0.0)
    args.update(kw)
    return GenerationRequest(**args)


def _decoded_audio(mp4: bytes) -> np.ndarray:
    """The mp4's audio track as float32 mono 16 kHz (ffmpeg from imageio-ffmpeg)."""
    import imageio_ffmpeg

    out = subprocess.run(
        [imageio_ffmpeg.get_ffmpeg_exe(), "-loglevel", "error", "-i", "pipe:0", "-f", "s16le", "-ac", "1",
         "-ar", "16000", "pipe:1"], input=mp4, capture_output=True, check=True,
    ).stdout
    return np.frombuffer(out, np.int16).astype(np.float32) / 32768


def test_plan_chunks_follows_the_official_loop():
    assert plan_chunks(100, 81, "clip", 25, 81).starts == [0]
    plan = plan_chunks(267, 81, "streaming", 25, 1000)
    assert plan.starts == [0, 56, 112, 168, 224]
    assert plan.audio_extend == 224 + 81 - 267 + 3
    assert plan.total_frames == 267 - 3  # official: video ends 3 frames before the audio
    with pytest.raises(InputError, match="audio"):
        plan_chunks(60, 81, "clip", 25, 81)


@pytest.mark.slow
def test_two_speakers_with_bboxes(tiny_pipeline, fixtures_dir):
    result = tiny_pipeline.generate(_request(fixtures_dir, 2))
    info = probe_mp4(result.video)
    assert info["video_codec"] == "h264" and info["fps"] == 25 and info["num_frames"] == 17
    assert info["audio_codec"] == "aac" and info["audio_duration"] == pytest.approx(17 / 25, abs=0.06)
    assert (info["height"], info["width"]) == (96, 176)
    assert result.lip_sync and result.chunks == 1
    # The soundtrack is the input speech (both speakers, 'add': speaker 1 first).
    from multitalk.utils.audio import combine_speakers, load_speech

    req = _request(fixtures_dir, 2)
    _, mixed = combine_speakers([load_speech(a) for a in req.audio], "add")
    track = _decoded_audio(result.video)
    n = min(len(track), len(mixed))
    assert n >= 0.6 * 16000
    corr = np.corrcoef(track[:n], mixed[:n])[0, 1]
    assert corr > 0.9, corr


@pytest.mark.slow
def test_one_speaker_is_deterministic(tiny_pipeline, fixtures_dir):
    events = []
    a = tiny_pipeline.generate(_request(fixtures_dir, 1), progress=events.append)
    b = tiny_pipeline.generate(_request(fixtures_dir, 1))
    assert a.video == b.video
    stages = [e.stage for e in events]
    assert stages[0] == "prepare" and stages[-1] == "mux" and stages.count("diffusion") == 3
    c = tiny_pipeline.generate(_request(fixtures_dir, 1, sampling=SamplingOptions(steps=3, seed=7)))
    assert c.video != a.video


@pytest.mark.slow
def test_streaming_runs_until_the_audio_ends(tiny_pipeline, fixtures_dir):
    req = _request(fixtures_dir, 1, mode="streaming", frames=17, motion_frames=5, color_correction=1.0,
                   sampling=SamplingOptions(steps=1), size="multitalk-64")  # 22 chunks: keep each small
    result = tiny_pipeline.generate(req)
    info = probe_mp4(result.video)
    assert result.chunks > 3
    # the official loop ends 3 frames before the audio does
    assert info["num_frames"] / 25 == pytest.approx(info["audio_duration"], abs=0.05)
    from multitalk.utils.audio import load_speech
    speech_seconds = len(load_speech((fixtures_dir / "single" / "1.wav").read_bytes())) / 16000
    assert info["num_frames"] / 25 == pytest.approx(speech_seconds, abs=0.2)


def test_bad_inputs_are_input_errors(tiny_pipeline, fixtures_dir):
    with pytest.raises(InputError) as e:
        tiny_pipeline.generate(_request(fixtures_dir, 2, frames=16))
    assert e.value.field == "frames"
    with pytest.raises(InputError) as e:
        tiny_pipeline.generate(_request(fixtures_dir, 2, bbox=[[0, 0, 10, 10]]))
    assert e.value.field == "bbox"
    with pytest.raises(InputError) as e:
        tiny_pipeline.generate(_request(fixtures_dir, 1, audio=[b"RIFF garbage"]))
    assert e.value.field == "audio_1"


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_make_tiny_weights_and_check(tmp_path):
    # The text-to-speech folder (230 MB, Kokoro's fixed widths) once: left out of the second set.
    for layout, extra in (("official", []), ("diffusers", ["--no-speech"])):
        root = tmp_path / layout
        subprocess.run([sys.executable, "-m", "multitalk.cli", "make-tiny-weights", str(root), "--layout", layout,
                        *extra], check=True, capture_output=True)
        out = subprocess.run([sys.executable, "-m", "multitalk.cli", "check", str(root)], check=True,
                             capture_output=True, text=True).stdout
        report = json.loads(out)
        assert report["kind"] == "multitalk" and report["base_layout"] == layout
        assert all(c["found"] for name, c in report["components"].items() if not (extra and name == "speech"))
        assert report["components"]["speech"]["found"] is not bool(extra)


def test_check_reports_fallback_without_adapter(tiny_official, tmp_path):
    import shutil

    from multitalk.checkpoints.discovery import find_checkpoints

    root = tmp_path / "w"
    shutil.copytree(tiny_official, root)
    shutil.rmtree(root / "MeiGen-MultiTalk")
    ck = find_checkpoints(root)
    assert ck.kind == "wan-i2v" and not ck.lip_sync
    assert not ck.components["audio_adapter"].found and "lip sync" in ck.components["audio_adapter"].note
    shutil.rmtree(root / "Wan2.1-I2V-14B-480P")
    assert find_checkpoints(root).kind == "incomplete"


def _frames(mp4: bytes, tmp_path, name: str):
    import imageio_ffmpeg
    import numpy as np

    path = tmp_path / name
    path.write_bytes(mp4)
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in reader]).astype(int)


@pytest.mark.slow
def test_official_and_diffusers_layouts_make_the_same_video(tiny_pipeline, tiny_diffusers, fixtures_dir, tmp_path):
    """The same random weights (seed 0) written in both on-disk layouts give the same video.

    Not byte-identical: tensors read from differently laid-out files can take other BLAS
    paths (last-bit differences, ~1e-6 in the latents), and once one pixel rounds the other
    way, H.264's mode decisions change whole blocks. So: decoded frames at PSNR >= 40 dB
    (different weights give ~10 dB).
    """
    import numpy as np

    from multitalk.pipeline import MultiTalkPipeline

    other = MultiTalkPipeline.from_pretrained(str(tiny_diffusers))
    req = _request(fixtures_dir, 1, sampling=SamplingOptions(steps=2))
    a = _frames(tiny_pipeline.generate(req).video, tmp_path, "a.mp4")
    b = _frames(other.generate(req).video, tmp_path, "b.mp4")
    assert a.shape == b.shape and a.shape[0] == 17
    mse = ((a - b) ** 2).mean()
    psnr = 10 * np.log10(255**2 / max(mse, 1e-12))
    assert psnr >= 40, psnr


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_generate_two_speakers_with_bboxes(tiny_official, fixtures_dir, tmp_path):
    out = tmp_path / "multi1.mp4"
    m = fixtures_dir / "multi1"
    report = subprocess.run(
        [sys.executable, "-m", "multitalk.cli", "generate", "--models", str(tiny_official),
         "--image", str(m / "multi1.png"), "--audio", str(m / "1.wav"), "--audio2", str(m / "2.wav"),
         "--audio-type", "add", "--bbox", "160,120,1280,1080", "160,1320,1280,2280", "--prompt", "two people talk",
         "--size", "multitalk-128", "--frames", "21", "--steps", "2", "--batch-guidance", "--out", str(out)],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    assert json.loads(report.strip().splitlines()[-1])["frames"] == 21
    info = probe_mp4(out)
    assert info["fps"] == 25 and info["num_frames"] == 21 and info["audio_codec"] == "aac"


def test_decode_of_one_job_overlaps_the_next_jobs_diffusion(tiny_official, fixtures_dir):
    """Two jobs on one in-process pipeline: while job A's latents are VAE-decoded, job B's
    sampling runs (the DiT lock only covers sampling). The first decode waits until the
    other job's sampler has finished a step; were decode and diffusion serialised, it would
    time out."""
    import asyncio
    import threading

    from multitalk.pipeline import MultiTalkPipeline

    pipe = MultiTalkPipeline.from_pretrained(str(tiny_official))
    diffusion, decode = pipe.stages.diffusion, pipe.stages.decode
    sample_seeds: list[int] = []
    other_started = threading.Event()
    overlapped: list[bool] = []
    original_sample, original_decode = diffusion.sample, decode.decode_chunk

    def sample(job, audio, image, text, on_step=None):
        sample_seeds.append(job.seed)
        first_seed = sample_seeds[0]

        def step(done, total):  # called by the running sampler after each step
            if job.seed != first_seed:
                other_started.set()
            if on_step is not None:
                on_step(done, total)

        return original_sample(job, audio, image, text, step)

    def decode_fn(latents, request):
        if not overlapped:  # the first decode (job A's): B's sampler must start meanwhile
            overlapped.append(other_started.wait(timeout=60))
        return original_decode(latents, request)

    diffusion.sample, decode.decode_chunk = sample, decode_fn

    async def both():
        one = _request(fixtures_dir, 1, frames=9, sampling=SamplingOptions(steps=2, seed=1))
        two = _request(fixtures_dir, 1, frames=9, sampling=SamplingOptions(steps=2, seed=2))
        return await asyncio.gather(pipe.agenerate(one), pipe.agenerate(two))

    a, b = asyncio.run(both())
    assert overlapped == [True], "job B's diffusion did not start while job A was being decoded"
    assert probe_mp4(a.video)["num_frames"] == probe_mp4(b.video)["num_frames"] == 9


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_generate_with_a_distillation_lora(tiny_official, fixtures_dir, tmp_path):
    """``--lora PATH:SCALE`` with the distilled settings (few steps, text scale 1: two DiT
    passes per step) runs end to end and changes the video."""
    from multitalk.checkpoints.tiny import save_tiny_lora

    lora = save_tiny_lora(tmp_path / "distill.safetensors")
    m = fixtures_dir / "single"
    common = [sys.executable, "-m", "multitalk.cli", "generate", "--models", str(tiny_official),
              "--image", str(m / "single1.png"), "--audio", str(m / "1.wav"), "--prompt", "a man talks",
              "--size", "multitalk-32", "--frames", "9", "--steps", "3", "--text-scale", "1", "--audio-scale", "2",
              "--seed", "5"]
    videos = {}
    for name, extra in (("plain", []), ("lora", ["--lora", f"{lora}:0.8"])):
        out = tmp_path / f"{name}.mp4"
        subprocess.run(common + extra + ["--out", str(out)], check=True, capture_output=True, text=True, timeout=600)
        assert probe_mp4(out)["num_frames"] == 9
        videos[name] = out.read_bytes()
    assert videos["plain"] != videos["lora"]
