"""LoRAs chosen per job on one loaded DiffusionStage (multitalk.modules.lora_runtime).

The reference is the load-time merge (``DiffusionStage.from_pretrained(loras=...)``), whose
parity with the official ``WanLoraWrapper`` is recorded in docs/NOTES.md (0.0).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from multitalk.api import InputError
from multitalk.checkpoints.tiny import save_tiny_lora, tiny_dit, tiny_dit_config, tiny_dit_inputs
from multitalk.modules.loading import CheckpointError
from multitalk.modules.lora_runtime import lora_set_id, normalize_lora_set

TOL = dict(atol=2e-5, rtol=1e-5)  # fp32: unmerged x·W + (x·A)·B vs merged x·(W + BA)


def _job(loras=(), seed=3, steps=2):
    from multitalk.stages import ChunkJob, ImageConditioning, TextEmbeddings

    inp = tiny_dit_inputs(2)
    cfg = tiny_dit_config()
    g = torch.Generator().manual_seed(seed)
    job = ChunkJob(frames=17, latent_hw=(8, 12), audio_start=0, ref_masks=inp["ref_target_masks"], seed=seed,
                   steps=steps, loras=loras)
    audio = torch.randn(2, 60, cfg["audio_blocks"], cfg["audio_channels"], generator=g)
    image = ImageConditioning(inp["clip_fea"], inp["y"])
    text = TextEmbeddings(inp["context"], torch.randn(3, cfg["text_dim"], generator=g))
    return job, audio, image, text


def _with_everywhere_lora(path, seed=5):
    """A LoRA on every linear weight of the DiT, the ones hooks cannot see included (head,
    time embedding and projection), plus full deltas on a norm weight and a bias."""
    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, p in tiny_dit(0).named_parameters():
        if p.dim() == 2 and name.endswith(".weight") and "modulation" not in name:
            base = "diffusion_model." + name[: -len(".weight")]
            lora[base + ".lora_down.weight"] = 0.05 * torch.randn(3, p.shape[1], generator=gen)
            lora[base + ".lora_up.weight"] = 0.05 * torch.randn(p.shape[0], 3, generator=gen)
    lora["diffusion_model.blocks.1.cross_attn.norm_q.diff"] = 0.1 * torch.randn(64, generator=gen)
    lora["diffusion_model.blocks.0.ffn.2.diff_b"] = 0.1 * torch.randn(64, generator=gen)
    save_file(lora, str(path))
    return path


@pytest.fixture(scope="module")
def lora_files(tiny_official):
    root = tiny_official / "loras"
    save_tiny_lora(root / "a.safetensors", seed=1)
    save_tiny_lora(root / "b.safetensors", seed=2, rank=6)
    c = _with_everywhere_lora(root / "c.safetensors")
    return {"a": "loras/a.safetensors", "b": "loras/b.safetensors", "c": str(c)}


@pytest.fixture(scope="module")
def stage(tiny_official, lora_files):
    from multitalk.stages import DiffusionStage

    return DiffusionStage.from_pretrained(str(tiny_official), lora_registry=lora_files)


def _merged_at_load(tiny_official, lora_files, choices):
    from multitalk.stages import DiffusionStage

    return DiffusionStage.from_pretrained(
        str(tiny_official), loras=[{"path": lora_files[n], "scale": s} for n, s in choices])


@pytest.mark.parametrize("choices", [(("a", 0.8),), (("c", 1.0),), (("a", 0.5), ("b", 1.5))])
def test_a_job_with_a_lora_set_equals_the_set_merged_at_load(tiny_official, lora_files, stage, choices):
    merged = _merged_at_load(tiny_official, lora_files, choices)
    expected = merged.sample(*_job())
    got = stage.sample(*_job(loras=choices))
    assert torch.allclose(got, expected, **TOL), (got - expected).abs().max()
    assert (got - stage.sample(*_job())).abs().max() > 1e-3  # the LoRA does change the result


def test_switching_sets_on_one_stage_leaves_no_trace(tiny_official, lora_files):
    """A, then B, then none, then A+B, then A on one stage: each equals a fresh stage
    running it first, bit for bit (the base is never written; in-place deltas are undone
    from kept originals)."""
    from multitalk.stages import DiffusionStage

    sequence = [(("a", 0.8),), (("b", 1.2),), (), (("a", 0.8), ("c", 0.3)), (("a", 0.8),)]
    shared = DiffusionStage.from_pretrained(str(tiny_official), lora_registry=lora_files)
    base_params = {k: v.clone() for k, v in shared.model.state_dict().items()}
    outputs = [shared.sample(*_job(loras=s)) for s in sequence]
    for lora_set, out in zip(sequence, outputs):
        fresh = DiffusionStage.from_pretrained(str(tiny_official), lora_registry=lora_files)
        assert torch.equal(out, fresh.sample(*_job(loras=lora_set))), lora_set
    assert torch.equal(outputs[0], outputs[-1])
    shared.sample(*_job())
    assert shared.lora_runtime.current == ()
    assert all(torch.equal(v, base_params[k]) for k, v in shared.model.state_dict().items())


def test_unknown_names_and_bad_scales_are_input_errors_naming_them(stage):
    job, audio, image, text = _job(loras=(("nope", 1.0),))
    with pytest.raises(InputError, match="unknown LoRA 'nope'.*'a', 'b', 'c'") as e:
        stage.sample(job, audio, image, text)
    assert e.value.field == "loras" and e.value.status == 422
    with pytest.raises(InputError, match="scale 2.5 of LoRA 'a' is outside \\[0, 2\\]"):
        stage.check_loras([{"name": "a", "scale": 2.5}])
    with pytest.raises(InputError, match="scale nan"):
        stage.check_loras([("a", float("nan"))])
    with pytest.raises(InputError, match="listed twice"):
        stage.check_loras(["a", ("a", 0.5)])
    with pytest.raises(InputError, match="at most 4"):
        normalize_lora_set(["a", "b", "c", "d", "e"])
    with pytest.raises(InputError, match="must be a number"):
        stage.check_loras([{"name": "a", "scale": "1"}])
    assert stage.lora_runtime.current != (("nope", 1.0),)  # nothing was applied


def test_a_stage_without_a_registry_refuses_any_lora(tiny_official):
    from multitalk.stages import DiffusionStage

    plain = DiffusionStage.from_pretrained(str(tiny_official))
    assert plain.lora_names == [] and plain.check_loras(()) == ()
    with pytest.raises(InputError, match="unknown LoRA 'a' \\(this deployment has: none\\)"):
        plain.sample(*_job(loras=(("a", 1.0),)))


def test_the_set_is_canonical_and_described(stage, lora_files):
    assert normalize_lora_set([{"name": "b", "scale": 1}, "a"]) == (("a", 1.0), ("b", 1.0))
    assert normalize_lora_set(None) == () and lora_set_id(()) == ""
    assert lora_set_id((("a", 1.0), ("b", 0.25))) == "a@1+b@0.25"
    described = stage.describe_loras([("b", 0.5), "a"])
    assert [(d["name"], d["scale"], d["rank"]) for d in described] == [("a", 1.0, 4), ("b", 0.5, 6)]
    assert all(len(d["sha256"]) == 64 and d["path"].endswith(".safetensors") for d in described)


def test_registration_is_strict(tiny_official, tmp_path):
    from multitalk.stages import DiffusionStage

    bad = tmp_path / "bad.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 4)}, str(bad))
    with pytest.raises(CheckpointError, match="blocks.0.self_attn.q.lora_down.weight.*shape"):
        DiffusionStage.from_pretrained(str(tiny_official), lora_registry={"bad": str(bad)})
    with pytest.raises(CheckpointError, match="not found"):
        DiffusionStage.from_pretrained(str(tiny_official), lora_registry={"gone": "loras/missing.safetensors"})


def test_results_match_with_batched_guidance_and_low_vram(tiny_official, lora_files, stage):
    from multitalk.stages import DiffusionStage

    choice = (("a", 0.8), ("c", 1.0))
    reference = stage.sample(*_job(loras=choice))
    for options in ({"batch_guidance": True}, {"low_vram": True}, {"low_vram": "prefetch"}):
        other = DiffusionStage.from_pretrained(str(tiny_official), lora_registry=lora_files, **options)
        assert torch.allclose(other.sample(*_job(loras=choice)), reference, **TOL), options
        other.sample(*_job(loras=(("b", 1.0),)))  # switch (in-place deltas undone) ...
        assert torch.allclose(other.sample(*_job(loras=choice)), reference, **TOL), options  # ... and back


def test_quantised_weights_take_low_rank_loras_and_refuse_full_deltas_on_them(tiny_official, lora_files, tmp_path):
    pytest.importorskip("torchao")
    from multitalk.stages import DiffusionStage

    quantised = DiffusionStage.from_pretrained(str(tiny_official), quantize="int8",
                                               lora_registry={"a": lora_files["a"]})
    base = quantised.sample(*_job())
    with_a = quantised.sample(*_job(loras=(("a", 0.8),)))
    full_precision = _merged_at_load(tiny_official, lora_files, (("a", 0.8),)).sample(*_job())
    rel = ((with_a - full_precision).norm() / full_precision.norm()).item()
    assert rel < 0.05, rel  # int8 noise only: the LoRA itself is applied in full precision
    assert torch.equal(quantised.sample(*_job()), base)
    full = tmp_path / "full.safetensors"
    save_file({"diffusion_model.blocks.0.self_attn.q.diff": torch.zeros(64, 64)}, str(full))
    with pytest.raises(CheckpointError, match="quantised"):
        quantised.register_lora("full", full)


def test_compiled_stage_applies_sets_without_recompiling_between_sets_of_one_rank(tiny_official, lora_files):
    """The hooks exist before compile, so dynamo traces them: the base and a LoRA set are
    two graph families; another set of the same total rank reuses the compiled code."""
    torch._dynamo.reset()
    from multitalk.stages import DiffusionStage

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    registry = {"a": lora_files["a"], "a2": lora_files["a"], "b": lora_files["b"]}
    eager = DiffusionStage.from_pretrained(str(tiny_official), lora_registry=registry)
    compiled = DiffusionStage.from_pretrained(str(tiny_official), lora_registry=registry,
                                              compile={"backend": backend})
    try:
        for lora_set in [(), (("a", 0.8),), (("a2", 0.3),), ()]:
            assert torch.allclose(compiled.sample(*_job(loras=lora_set)), eager.sample(*_job(loras=lora_set)),
                                  atol=1e-5), lora_set
        after_rank_4 = len(graphs)
        compiled.sample(*_job(loras=(("a", 0.3),)))
        assert len(graphs) == after_rank_4  # same rank, other scale: no recompile
        assert torch.allclose(compiled.sample(*_job(loras=(("b", 1.0),))), eager.sample(*_job(loras=(("b", 1.0),))),
                              atol=1e-5)
        with pytest.raises(RuntimeError, match="before torch.compile"):
            DiffusionStage.from_pretrained(str(tiny_official), compile={"backend": backend}).register_lora(
                "late", tiny_official / lora_files["a"])
    finally:
        torch._dynamo.reset()


def test_the_pipeline_reports_the_set_it_used(tiny_official, lora_files, fixtures_dir):
    from multitalk.api import GenerationRequest, LoraChoice, SamplingOptions
    from multitalk.pipeline import MultiTalkPipeline

    pipe = MultiTalkPipeline.from_pretrained(str(tiny_official), lora_registry=lora_files)
    single = fixtures_dir / "single"
    request = dict(image=(single / "single1.png").read_bytes(), audio=[(single / "1.wav").read_bytes()],
                   size="multitalk-32", frames=9, sampling=SamplingOptions(steps=1), color_correction=0.0)
    with_lora = pipe.generate(GenerationRequest(**request, loras=[LoraChoice("a", 0.5)]))
    plain = pipe.generate(GenerationRequest(**request))
    assert with_lora.loras == [{"name": "a", "scale": 0.5}] and plain.loras == []
    assert with_lora.video != plain.video
    with pytest.raises(InputError, match="unknown LoRA 'zz'"):
        pipe.generate(GenerationRequest(**request, loras=["zz"]))
