"""The MultiTalk DiT: strict loading, both layouts, shapes, the no-adapter fallback."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from multitalk.checkpoints.dit import load_dit
from multitalk.modules.loading import CheckpointError
from multitalk.checkpoints.tiny import (
    MULTITALK_DIR, WAN_DIFFUSERS_DIR, WAN_DIR, tiny_dit, tiny_dit_config, tiny_dit_inputs,
)


def _inputs(people: int, seed: int = 0):
    return tiny_dit_inputs(people, seed=seed)


@pytest.mark.parametrize("people", [1, 2, 4])
def test_forward_shapes_and_determinism(people):
    model = tiny_dit(0)
    inp = _inputs(people)
    with torch.no_grad():
        a = model(**inp)
        b = model(**inp)
    assert a.shape == inp["x"].shape and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.abs().max() > 0


def test_audio_changes_the_output_and_two_people_use_the_masks():
    model = tiny_dit(0)
    inp = _inputs(2)
    with torch.no_grad():
        base = model(**inp)
        silent = model(**{**inp, "audio": torch.zeros_like(inp["audio"])})
        swapped = model(**{**inp, "ref_target_masks": inp["ref_target_masks"][[1, 0, 2]]})
    assert (base - silent).abs().max() > 1e-4
    assert (base - swapped).abs().max() > 1e-6


def test_official_and_diffusers_layouts_give_the_same_output(tiny_official, tiny_diffusers):
    a = load_dit(tiny_official / WAN_DIR, "official", tiny_official / MULTITALK_DIR / "multitalk.safetensors")
    b = load_dit(tiny_diffusers / WAN_DIFFUSERS_DIR / "transformer", "diffusers",
                 tiny_diffusers / MULTITALK_DIR / "multitalk.safetensors")
    ref = tiny_dit(0)
    for name, p in ref.state_dict().items():
        assert torch.equal(a.state_dict()[name], p), name
        assert torch.equal(b.state_dict()[name], p), name
    inp = _inputs(1)
    with torch.no_grad():
        assert torch.allclose(a(**inp), b(**inp), atol=1e-6)


def test_diffusers_layout_is_readable_by_diffusers_itself(tiny_diffusers):
    from diffusers import WanTransformer3DModel

    folder = tiny_diffusers / WAN_DIFFUSERS_DIR / "transformer"
    model = WanTransformer3DModel.from_config(json.loads((folder / "config.json").read_text()))
    sd = {}
    for f in sorted(folder.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and not missing


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_strict_loading_names_the_key_and_shapes(tiny_official, tmp_path):
    root = _copy(tiny_official, tmp_path / "w")
    adapter = root / MULTITALK_DIR / "multitalk.safetensors"
    sd = load_file(str(adapter))
    key = next(k for k in sd if k.endswith("audio_cross_attn.q_linear.weight"))
    bad = dict(sd)
    bad[key] = torch.zeros(3, 3)
    save_file(bad, str(adapter))
    with pytest.raises(CheckpointError) as e:
        load_dit(root / WAN_DIR, "official", adapter)
    assert key in str(e.value) and "(3, 3)" in str(e.value) and "(64, 64)" in str(e.value)

    missing = {k: v for k, v in sd.items() if k != key}
    save_file(missing, str(adapter))
    with pytest.raises(CheckpointError, match="not found in the checkpoint"):
        load_dit(root / WAN_DIR, "official", adapter)

    extra = dict(sd, **{"blocks.0.audio_cross_attn.bogus.weight": torch.zeros(1)})
    save_file(extra, str(adapter))
    with pytest.raises(CheckpointError, match="bogus"):
        load_dit(root / WAN_DIR, "official", adapter)


def test_without_adapter_the_plain_i2v_model_loads(tiny_official):
    model = load_dit(tiny_official / WAN_DIR, "official", None)
    assert not model.has_audio
    inp = _inputs(1)
    with torch.no_grad():
        out = model(**inp)
    assert out.shape == inp["x"].shape


@pytest.mark.parametrize("people", [1, 2, 4])
def test_batched_guidance_equals_the_separate_passes(people):
    """The three guidance passes as one batch give the three separate forwards' outputs."""
    model = tiny_dit(0)
    inp = _inputs(people)
    g = torch.Generator().manual_seed(5)
    null_context = torch.randn(4, inp["context"].shape[1], generator=g)
    silent = torch.zeros_like(inp["audio"])[-1:]
    passes = [(inp["context"], inp["audio"]), (null_context, inp["audio"]), (null_context, silent)]
    with torch.no_grad():
        batched = model.forward_branches(inp["x"], inp["t"], [c for c, _ in passes], inp["clip_fea"], inp["y"],
                                         [a for _, a in passes], inp["ref_target_masks"])
        for (c, a), out in zip(passes, batched):
            single = model(**{**inp, "context": c, "audio": a})
            assert (single - out).abs().max() < 1e-5


def test_diffusion_stage_batched_guidance_matches_sequential(tiny_official):
    from multitalk.stages import ChunkJob, DiffusionStage, ImageConditioning, TextEmbeddings

    inp = _inputs(2)
    cfg = tiny_dit_config()
    frames = 17
    job = ChunkJob(frames=frames, latent_hw=(8, 12), audio_start=0, ref_masks=inp["ref_target_masks"], seed=3, steps=2)
    audio = torch.randn(2, 30, cfg["audio_blocks"], cfg["audio_channels"])
    image = ImageConditioning(inp["clip_fea"], inp["y"])
    text = TextEmbeddings(inp["context"], torch.randn(3, cfg["text_dim"]))
    plain = DiffusionStage.from_pretrained(str(tiny_official))
    batched = DiffusionStage.from_pretrained(str(tiny_official), batch_guidance=True)
    a = plain.sample(job, audio, image, text)
    b = batched.sample(job, audio, image, text)
    assert a.shape == (16, 5, 8, 12)
    assert (a - b).abs().max() < 1e-4


def test_batched_guidance_with_a_token_cap_batches_only_small_chunks(tiny_official):
    """``batch_guidance: N`` batches a step's passes only for chunks of at most N tokens (the
    production config keeps 720p chunks sequential on 80 GB cards)."""
    from multitalk.stages import ChunkJob, DiffusionStage

    job = ChunkJob(frames=17, latent_hw=(8, 12), audio_start=0, ref_masks=torch.ones(3, 8, 12), seed=0)
    tokens = 5 * 4 * 6  # 5 latent frames of 4 x 6 patches
    capped = DiffusionStage.from_pretrained(str(tiny_official), batch_guidance=tokens)
    assert capped._many_passes(None, job)
    capped.batch_guidance = tokens - 1
    assert not capped._many_passes(None, job)
    assert DiffusionStage.from_pretrained(str(tiny_official), batch_guidance=True)._many_passes(None, job)


def test_low_vram_block_streaming_gives_the_same_output():
    from multitalk.modules.offload import BlockStreamer

    model = tiny_dit(0)
    inp = _inputs(2)
    with torch.no_grad():
        ref = model(**inp)
        streamer = BlockStreamer(model, "cpu")
        out = model(**inp)
        streamer.remove()
    assert torch.equal(ref, out)
    assert all(p.device.type == "cpu" for p in model.blocks.parameters())


def test_low_vram_prefetch_stages_exactly_the_next_block():
    """With prefetch, while block i runs only block i+1 is staged (two blocks resident at
    most), and after the last block the first one is staged for the next forward."""
    from multitalk.modules.offload import BlockStreamer

    model = tiny_dit(0)
    inp = _inputs(2)
    with torch.no_grad():
        ref = model(**inp)
        streamer = BlockStreamer(model, "cpu", prefetch=True)
        seen = []
        for i, block in enumerate(model.blocks):  # runs after the streamer's own pre-hook
            block.register_forward_pre_hook(lambda m, a, i=i: seen.append((i, streamer.staged_blocks)))
        out = model(**inp)
        again = model(**inp)
    n = len(model.blocks)
    assert seen[:n] == [(i, [(i + 1) % n]) for i in range(n)]
    assert streamer.staged_blocks == [0]
    assert torch.equal(ref, out) and torch.equal(ref, again)
    streamer.remove()
    assert streamer.staged_blocks == []


def test_teacache_in_the_dit_reuses_the_branch_residual():
    from multitalk.utils.sampler import TeaCache

    model = tiny_dit(0)
    inp = _inputs(1)
    with torch.no_grad():
        plain = model(**inp)
        cache = TeaCache(threshold=0.0, steps=10, warmup_steps=0)  # threshold 0: always compute
        assert torch.equal(model(**inp, teacache=cache, branch="cond"), plain)
        cache = TeaCache(threshold=1e9, steps=10, warmup_steps=1)
        cache.step = 0
        model(**inp, teacache=cache, branch="cond")
        cache.step = 1
        near = {**inp, "t": inp["t"] - 1.0}
        skipped = model(**near, teacache=cache, branch="cond")
        assert cache.skipped == 1 and cache.computed == 1
        # skipping = the blocks' residual of the last full pass added to this pass's tokens
        dtype = torch.float32
        grid = model.token_grid(tuple(inp["x"].shape))
        e, _, _ = model.embed_conditions(near["t"], inp["context"], inp["clip_fea"], dtype)
        tokens = model.patchify(inp["x"], inp["y"], dtype) + cache.residuals["cond"]
        expected = model.unpatchify(model.head(tokens, e)[0], grid)
        assert torch.allclose(skipped, expected, atol=1e-6)
        assert (skipped - model(**near)).abs().max() > 1e-4


def test_int8_weight_only_dit_stays_close_to_the_full_precision_one():
    from multitalk.modules.quantize import quantize_dit_blocks

    model = tiny_dit(0)
    inp = _inputs(2)
    with torch.no_grad():
        ref = model(**inp)
        out = quantize_dit_blocks(tiny_dit(0), "int8")(**inp)
    rel = ((out - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.05, rel  # lossy, but close: the bench's quality column reports it
    with pytest.raises(ValueError, match="int4"):
        quantize_dit_blocks(model, "int4")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on machines without fp8 tensor cores")
def test_fp8_dynamic_quantisation_is_refused_clearly_without_fp8_tensor_cores():
    from multitalk.modules.quantize import quantize_dit_blocks

    with pytest.raises(ValueError, match="compute capability 8.9"):
        quantize_dit_blocks(tiny_dit(0), "fp8_dynamic")


def test_rope_rotations_are_built_once_per_grid_on_the_tokens_device():
    """The DiT keeps each grid's rotary table (float64, Wan's numbers) on its device: built
    once for a job's grid and reused by every block, step and forward; a forward equals one
    with the table rebuilt from scratch (the official per-forward computation)."""
    from multitalk.modules.rope import video_rope_freqs, video_rope_grid

    model = tiny_dit(0)
    inp = _inputs(2)
    with torch.no_grad():
        first = model(**inp)
        model.forward_branches(inp["x"], inp["t"], [inp["context"]] * 2, inp["clip_fea"], inp["y"],
                               [inp["audio"], inp["audio"][:1] * 0], inp["ref_target_masks"])
        again = model(**inp)
    grid = model.token_grid(tuple(inp["x"].shape))
    assert model.rope.built == 1 and torch.equal(first, again)
    cached = model.rope.rotations(grid, "cpu")
    assert cached.dtype == torch.float64 and cached.device.type == "cpu"
    assert torch.equal(cached, video_rope_grid(video_rope_freqs(model.config.dim // model.config.num_heads), grid))
    model.rope.clear()  # rebuilt from scratch: the very same output
    with torch.no_grad():
        assert torch.equal(model(**inp), first)
    assert model.rope.built == 2
    import copy

    twin = copy.deepcopy(model)  # a copied model gets a cache of its own
    with torch.no_grad():
        assert torch.equal(twin(**inp), first) and twin.rope.built == 1
