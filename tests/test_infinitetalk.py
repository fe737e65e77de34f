"""InfiniteTalk on tiny weights: discovery, strict adapter loading, the adapter bank and its
levers, the model difference, the sampler's clean motion latents, the reference encoding,
and the loop end to end (multitalk.infinitetalk)."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from multitalk.api import InputError, SamplingOptions
from multitalk.checkpoints.discovery import find_checkpoints
from multitalk.checkpoints.tiny import tiny_dit_inputs

WAN = "Wan2.1-I2V-14B-480P"


def _adapter(root: Path, variant: str) -> Path:
    return root / "InfiniteTalk" / variant / "infinitetalk.safetensors"


@pytest.fixture(scope="module")
def it_stage(tiny_official):
    from multitalk.stages import DiffusionStage

    return DiffusionStage.from_pretrained(str(tiny_official), model="infinitetalk")


# ------------------------------------------------------------------------- discovery
def test_check_reports_the_infinitetalk_files(tiny_official, tmp_path, capsys):
    ck = find_checkpoints(tiny_official)
    assert ck.models() == ["multitalk", "infinitetalk"] and ck.report()["models"] == ["multitalk", "infinitetalk"]
    assert ck.infinitetalk_adapters() == {v: str(_adapter(tiny_official, v)) for v in ("single", "multi")}
    from multitalk.cli import main

    assert main(["check", str(tiny_official)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["components"]["infinitetalk_single"]["found"] and out["components"]["infinitetalk_multi"]["found"]
    # Without them: reported missing, the MultiTalk set unaffected.
    root = tmp_path / "w"
    shutil.copytree(tiny_official, root)
    shutil.rmtree(root / "InfiniteTalk")
    ck = find_checkpoints(root).require_complete()
    assert ck.kind == "multitalk" and ck.models() == ["multitalk"]
    assert not ck.components["infinitetalk_multi"].found and "InfiniteTalk/multi" in ck.components["infinitetalk_multi"].note
    # InfiniteTalk alone on the base (no MultiTalk adapter): an InfiniteTalk set, not a MultiTalk one.
    shutil.copytree(tiny_official / "InfiniteTalk", root / "InfiniteTalk")
    shutil.rmtree(root / "MeiGen-MultiTalk")
    assert find_checkpoints(root).models() == ["infinitetalk"]


def test_missing_adapter_files_are_errors(tiny_official, tmp_path):
    from multitalk.checkpoints.discovery import MissingCheckpointError
    from multitalk.stages import DiffusionStage

    root = tmp_path / "w"
    shutil.copytree(tiny_official, root)
    shutil.rmtree(root / "InfiniteTalk" / "multi")
    with pytest.raises(MissingCheckpointError, match="multi"):
        DiffusionStage.from_pretrained(str(root), model="infinitetalk", adapters=["multi"])
    stage = DiffusionStage.from_pretrained(str(root), model="infinitetalk")
    assert stage.adapters.names == ["single"]
    assert stage.adapters.select("multi") == "single"  # two speakers fall back to the one held
    with pytest.raises(ValueError, match="model"):
        DiffusionStage.from_pretrained(str(root), model="wan")


# ------------------------------------------------------------------------- strict loading
@pytest.mark.parametrize("variant", ["single", "multi"])
def test_the_adapters_load_strictly(tiny_official, tmp_path, variant):
    from safetensors.torch import load_file, save_file

    from multitalk.modules.loading import CheckpointError
    from multitalk.stages import DiffusionStage

    root = tmp_path / "w"
    shutil.copytree(tiny_official, root)
    path = _adapter(root, variant)
    weights = load_file(str(path))
    dropped = "blocks.1.audio_cross_attn.kv_linear.weight"
    save_file({k: v for k, v in weights.items() if k != dropped}, str(path))
    with pytest.raises(CheckpointError, match=dropped):
        DiffusionStage.from_pretrained(str(root), model="infinitetalk")
    save_file({**weights, "blocks.0.audio_cross_attn.extra.weight": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="extra"):
        DiffusionStage.from_pretrained(str(root), model="infinitetalk")
    save_file({**weights, "audio_proj.proj1.weight": torch.zeros(3, 3)}, str(path))
    with pytest.raises(CheckpointError, match="shape mismatch for 'audio_proj.proj1.weight'"):
        DiffusionStage.from_pretrained(str(root), model="infinitetalk")


def test_full_size_adapter_layout():
    """The bank's held adapter at the real 14B config has the MultiTalk adapter's 330 tensors
    (same keys, same shapes), so a real infinitetalk.safetensors loads into it strictly."""
    from multitalk.checkpoints.dit import is_adapter_key
    from multitalk.checkpoints.infinitetalk import AudioAdapterWeights
    from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel

    with torch.device("meta"):
        model = MultiTalkTransformer3DModel(audio_norm_fp32=True)
    full = {k: tuple(v.shape) for k, v in model.state_dict().items() if is_adapter_key(k)}
    held = {k: tuple(v.shape) for k, v in AudioAdapterWeights.of(model).state_dict().items()}
    assert held == full and len(held) == 330
    assert held["audio_proj.proj1.weight"] == (512, 46080) and held["audio_proj.proj1_vf.weight"] == (512, 73728)
    assert held["audio_proj.proj3.weight"] == (24576, 512)
    assert held["blocks.39.audio_cross_attn.q_linear.weight"] == (5120, 5120)
    assert held["blocks.0.audio_cross_attn.kv_linear.weight"] == (10240, 768)
    assert held["blocks.7.norm_x.bias"] == (5120,)
    assert sum(np.prod(s) for s in held.values()) == pytest.approx(2.49e9, rel=0.01)


# ------------------------------------------------------------------------- the model difference
def test_fp32_audio_norm_only_changes_reduced_precision():
    from multitalk.modules.audio_adapter import AudioProjModel

    torch.manual_seed(0)
    plain = AudioProjModel(seq_len=5, seq_len_vf=8, blocks=2, channels=8, intermediate_dim=16, output_dim=32,
                           context_tokens=4)
    with torch.no_grad():
        plain.norm.weight.normal_(1.0, 0.3)
        plain.norm.bias.normal_(0.0, 0.3)
    fp32 = AudioProjModel(seq_len=5, seq_len_vf=8, blocks=2, channels=8, intermediate_dim=16, output_dim=32,
                          context_tokens=4, norm_fp32=True)
    fp32.load_state_dict(plain.state_dict())
    first, later = torch.randn(2, 1, 5, 2, 8), torch.randn(2, 3, 8, 2, 8)
    assert torch.equal(plain(first, later), fp32(first, later))  # fp32: the same
    plain.bfloat16(), fp32.bfloat16()
    out = fp32(first.bfloat16(), later.bfloat16())
    assert out.dtype == torch.bfloat16
    # bf16: the norm runs in fp32 on the bf16 tokens and is rounded once.
    tokens = {}
    fp32.proj3.register_forward_hook(lambda m, i, o: tokens.setdefault("t", o))
    fp32(first.bfloat16(), later.bfloat16())
    n = fp32.norm
    want = torch.nn.functional.layer_norm(tokens["t"].reshape(-1, 4, 32).float(), (32,), n.weight.float(),
                                          n.bias.float(), n.eps).bfloat16()
    assert torch.equal(out.reshape(-1, 4, 32), want)


def test_the_loaded_model_carries_the_difference(it_stage, tiny_official):
    from multitalk.checkpoints.dit import load_dit

    assert it_stage.model.config.audio_norm_fp32 and it_stage.model.audio_proj.norm_fp32
    assert all(a.audio_proj.norm_fp32 for a in it_stage.adapters.adapters.values())
    multitalk = load_dit(tiny_official / WAN, "official", tiny_official / "MeiGen-MultiTalk" / "multitalk.safetensors")
    assert not multitalk.config.audio_norm_fp32 and not multitalk.audio_proj.norm_fp32


# ------------------------------------------------------------------------- the adapter bank
@torch.no_grad()
def test_selecting_an_adapter_equals_loading_it(it_stage, tiny_official):
    from multitalk.checkpoints.dit import load_dit

    inputs = tiny_dit_inputs(people=2)
    outs = {}
    for variant in ("multi", "single", "multi"):
        assert it_stage.adapters.select(variant) == variant
        outs.setdefault(variant, []).append(it_stage.model(**inputs))
    assert torch.equal(outs["multi"][0], outs["multi"][1])  # switching back restores it exactly
    assert not torch.allclose(outs["multi"][0], outs["single"][0])
    for variant in ("single", "multi"):
        fresh = load_dit(tiny_official / WAN, "official", _adapter(tiny_official, variant))
        assert torch.equal(fresh(**inputs), outs[variant][0]), variant


def test_the_attention_kernel_carries_over(it_stage):
    from multitalk.modules.attention import LocalAttention

    kernel = LocalAttention("native")
    for block in it_stage.model.blocks:
        block.audio_cross_attn.attention = kernel
    other = "single" if it_stage.adapters.current == "multi" else "multi"
    it_stage.adapters.select(other)
    assert all(b.audio_cross_attn.attention is kernel for b in it_stage.model.blocks)


@torch.no_grad()
def test_loras_and_low_vram_apply_to_every_adapter(tiny_official, tmp_path):
    """A LoRA merges into the base once and into each adapter; the block streamer follows a swap."""
    from multitalk.checkpoints.dit import load_dit
    from multitalk.checkpoints.lora import merge_lora
    from multitalk.checkpoints.tiny import save_tiny_lora
    from multitalk.stages import DiffusionStage

    lora = save_tiny_lora(tmp_path / "lora.safetensors", seed=3)
    inputs = tiny_dit_inputs(people=2)
    stage = DiffusionStage.from_pretrained(str(tiny_official), model="infinitetalk", loras=[str(lora)],
                                           low_vram=True)
    for variant in ("multi", "single"):
        stage.adapters.select(variant)
        assert stage.model._block_streamer is not None
        reference = load_dit(tiny_official / WAN, "official", _adapter(tiny_official, variant))
        merge_lora(reference, lora)
        torch.testing.assert_close(stage.model(**inputs), reference(**inputs), rtol=0, atol=1e-6)


# ------------------------------------------------------------------------- sampler and encoder
def test_clean_motion_latents_are_written_back_every_step():
    from multitalk.utils.sampler import Guidance, GuidanceConfig, flow_timesteps, sample

    motion = torch.randn(16, 2, 4, 4)
    seen = []

    def denoise(latent, t, branch):
        seen.append(latent[:, :2].clone())
        return torch.randn_like(latent)

    gen = torch.Generator().manual_seed(0)
    out = sample(denoise, torch.randn(16, 5, 4, 4), flow_timesteps(3, 7.0), Guidance(GuidanceConfig()),
                 motion_latents=motion, generator=gen, motion_noised=False)
    assert all(torch.equal(s, motion) for s in seen) and torch.equal(out[:, :2], motion)
    assert torch.equal(gen.get_state(), torch.Generator().manual_seed(0).get_state())  # no noise drawn
    seen.clear()
    sample(denoise, torch.randn(16, 5, 4, 4), flow_timesteps(3, 7.0), Guidance(GuidanceConfig()),
           motion_latents=motion, generator=torch.Generator().manual_seed(0))
    assert not any(torch.equal(s, motion) for s in seen)  # MultiTalk's re-noised injection is unchanged


def test_reference_encoding(tiny_official):
    from multitalk.stages import ImageStage

    stage = ImageStage.from_pretrained(str(tiny_official))
    reference = torch.rand(3, 1, 32, 48) * 2 - 1
    motion = torch.rand(3, 5, 32, 48) * 2 - 1
    cond = stage.encode_reference(reference, motion, 9)
    assert cond.clip_features.shape[:2] == (1, 257)
    assert cond.cond_latents.shape == (20, 3, 4, 6)
    mask = cond.cond_latents[:4]
    assert mask[:, 0].eq(1).all() and mask[:, 1:].eq(0).all()  # only the first frame is conditioning
    assert cond.motion_latents.shape == (16, 2, 4, 6)
    first = stage.encode_reference(reference, reference, 9)
    assert first.motion_latents.shape == (16, 1, 4, 6)
    # The reference's CLIP, not the motion frames': the same as without motion frames.
    assert torch.equal(first.clip_features, cond.clip_features)
    assert torch.equal(first.cond_latents, cond.cond_latents)


# ------------------------------------------------------------------------- the loop
def test_sizes_and_defaults():
    from multitalk.infinitetalk import bucket_name, infinitetalk_request

    assert bucket_name("infinitetalk-480") == "multitalk-480" and bucket_name("infinitetalk-64") == "multitalk-64"
    with pytest.raises(InputError) as e:
        bucket_name("infinitetalk-huge")
    assert e.value.field == "size"
    req = infinitetalk_request([b"wav"], video=b"mp4")
    assert (req.mode, req.frames, req.motion_frames, req.size, req.image) == ("streaming", 81, 9, "infinitetalk-480", None)
    s = req.sampling
    assert (s.steps, s.text_scale, s.audio_scale, s.resolved_shift("infinitetalk-480"),
            s.resolved_shift("infinitetalk-720")) == (40, 5.0, 4.0, 7.0, 11.0)


def test_cli_defaults_follow_the_model():
    from multitalk.cli import _model_defaults, build_parser

    args = build_parser().parse_args(["generate", "--models", "m", "--video", "v.mp4", "--audio", "a", "--out", "o"])
    assert _model_defaults(args) == ("infinitetalk", {"mode": "streaming", "motion_frames": 9,
                                                      "size": "infinitetalk-480"})
    args = build_parser().parse_args(["generate", "--models", "m", "--image", "i", "--audio", "a", "--out", "o"])
    assert _model_defaults(args) == ("multitalk", {"mode": "clip", "motion_frames": 25, "size": "multitalk-480"})


def _short_wav(fixtures_dir, seconds: float, name: str = "single/1.wav") -> bytes:
    import soundfile as sf

    data, rate = sf.read(str(fixtures_dir / name))
    buf = io.BytesIO()
    sf.write(buf, data[: int(seconds * rate)], rate, format="WAV")
    return buf.getvalue()


@pytest.fixture(scope="module")
def it_pipeline(tiny_official):
    from multitalk.pipeline import MultiTalkPipeline

    return MultiTalkPipeline.from_pretrained(str(tiny_official), model="infinitetalk")


def test_video_to_video_follows_the_source_and_the_audio(it_pipeline, fixtures_dir):
    """Short chunks (9 frames, 5 carried over): per-chunk progress, the length of the audio,
    a video that is not MultiTalk's output from the first frame."""
    from multitalk.infinitetalk import infinitetalk_request
    from multitalk.utils.video import probe_mp4

    events = []
    wav = _short_wav(fixtures_dir, 0.9)  # 22 frames at 25 fps: chunks start at 0, 4, 8, 12, 16
    request = infinitetalk_request([wav], video=(fixtures_dir / "video" / "ref_video.mp4").read_bytes(),
                                   size="infinitetalk-32", frames=9, motion_frames=5,
                                   sampling=SamplingOptions(steps=1))
    result = it_pipeline.generate(request, events.append)
    assert result.num_frames == 22 and result.chunks == 5 and result.lip_sync
    info = probe_mp4(result.video)
    assert info["num_frames"] == 22 and info["fps"] == 25 and info["audio_codec"] == "aac"
    written = [e for e in events if e.stage == "mux" and e.chunk]
    assert [e.chunk for e in written] == [1, 2, 3, 4, 5] and all(e.total_chunks == 5 for e in written)
    steps = [e.step for e in events if e.stage == "diffusion"]
    assert steps == [1, 2, 3, 4, 5] and {e.total_steps for e in events if e.stage == "diffusion"} == {5}


def test_a_source_shorter_than_the_audio_holds_its_last_frame(it_pipeline, fixtures_dir, tmp_path):
    """0.4 s of source, 0.9 s of speech: the chunks past the source's end use its last frame
    (the official reader's behaviour) and the video still lasts as long as the audio."""
    import imageio_ffmpeg

    from multitalk.infinitetalk import infinitetalk_request
    from multitalk.utils import video_source

    src = tmp_path / "short.mp4"
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                    "testsrc=size=64x64:rate=25:duration=0.4", "-pix_fmt", "yuv420p", str(src)], check=True)
    asked = []
    frame = video_source.VideoSource.frame

    def spy(self, index):
        asked.append((index, self.frames_read))
        return frame(self, index)

    video_source.VideoSource.frame = spy
    try:
        result = it_pipeline.generate(infinitetalk_request(
            [_short_wav(fixtures_dir, 0.9)], video=src.read_bytes(), size="infinitetalk-32", frames=9,
            motion_frames=5, sampling=SamplingOptions(steps=1)))
    finally:
        video_source.VideoSource.frame = frame
    assert result.num_frames == 22 and result.chunks == 5
    assert [index for index, _ in asked] == [0, 0, 4, 8, 12, 16]  # frame 0 at prepare, then each chunk's start
    assert max(read for _, read in asked) == 10  # the source has 10 frames; 12 and 16 are past its end


def test_a_video_needs_the_infinitetalk_model(tiny_pipeline, fixtures_dir):
    from multitalk.infinitetalk import infinitetalk_request

    with pytest.raises(InputError) as e:
        tiny_pipeline.generate(infinitetalk_request([b"wav"], video=b"mp4"))
    assert e.value.field == "condition_video"


@pytest.mark.slow
def test_two_speakers_use_the_multi_adapter(it_pipeline, fixtures_dir):
    from multitalk.infinitetalk import infinitetalk_request

    chosen = []
    bank = it_pipeline.stages.diffusion.adapters
    select = bank.select
    bank.select = lambda name: chosen.append(name) or select(name)
    try:
        request = infinitetalk_request(
            [_short_wav(fixtures_dir, 0.4, "multi1/1.wav"), _short_wav(fixtures_dir, 0.4, "multi1/2.wav")],
            image=(fixtures_dir / "multi1" / "multi1.png").read_bytes(), size="infinitetalk-64", frames=9,
            motion_frames=5, bbox=[[160, 120, 1280, 1080], [160, 1320, 1280, 2280]],
            sampling=SamplingOptions(steps=1))
        result = it_pipeline.generate(request)
    finally:
        bank.select = select
    assert set(chosen) == {"multi"} and result.num_frames == 20


@pytest.mark.slow
def test_cli_dubs_the_sample_video(tiny_official, fixtures_dir, tmp_path):
    """ref_video.mp4 (15 s) dubbed with single/1.wav (10.68 s) through `multitalk generate`."""
    from multitalk.utils.audio import load_speech
    from multitalk.utils.video import probe_mp4

    out = tmp_path / "dub.mp4"
    run = subprocess.run(
        [sys.executable, "-m", "multitalk.cli", "generate", "--models", str(tiny_official), "--model", "infinitetalk",
         "--video", str(fixtures_dir / "video" / "ref_video.mp4"), "--audio", str(fixtures_dir / "single" / "1.wav"),
         "--size", "infinitetalk-64", "--steps", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    speech = load_speech((fixtures_dir / "single" / "1.wav").read_bytes())
    frames = int(len(speech) / 16000 * 25)  # 267: the audio's length in frames
    info = probe_mp4(out.read_bytes())
    assert report["frames"] == frames == info["num_frames"] and report["chunks"] == 4
    assert info["fps"] == 25 and info["video_codec"] == "h264" and info["audio_codec"] == "aac"
    assert info["audio_duration"] == pytest.approx(frames / 25, abs=0.05)
    assert (info["width"], info["height"]) == (report["width"], report["height"]) == (64, 64)


@torch.no_grad()
def test_quantisation_reaches_the_held_adapter(tiny_official):
    """int8 weight-only DiT blocks: the adapter swapped in is quantised too (as the one loaded first)."""
    pytest.importorskip("torchao")
    from multitalk.checkpoints.dit import load_dit
    from multitalk.modules.quantize import quantize_dit_blocks
    from multitalk.stages import DiffusionStage

    stage = DiffusionStage.from_pretrained(str(tiny_official), model="infinitetalk", quantize="int8")
    inputs = tiny_dit_inputs(people=2)
    stage.adapters.select("multi")
    full = load_dit(tiny_official / WAN, "official", _adapter(tiny_official, "multi"))
    unquantised = full(**inputs)
    reference = quantize_dit_blocks(full, "int8")(**inputs)
    out = stage.model(**inputs)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)
    assert (out - unquantised).abs().max() > 1e-4  # the comparison can tell quantised from not
