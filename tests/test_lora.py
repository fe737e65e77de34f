"""LoRA files merged into the DiT (official ``--lora_dir`` / ``--lora_scale`` semantics).

The merge was also compared with the official ``WanLoraWrapper`` on the same tiny DiT and
LoRA file, outside this repository: weights and DiT outputs identical (max abs diff 0.0).
"""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from multitalk.checkpoints.lora import merge_lora
from multitalk.checkpoints.tiny import save_tiny_lora, tiny_dit, tiny_dit_inputs
from multitalk.modules.loading import CheckpointError


def test_merge_adds_up_at_down_times_scale_and_the_diffs(tmp_path):
    from safetensors.torch import load_file

    path = save_tiny_lora(tmp_path / "l.safetensors", seed=3)
    lora = load_file(str(path))
    model, before = tiny_dit(0), dict(tiny_dit(0).named_parameters())
    report = merge_lora(model, path, scale=0.5)
    after = dict(model.named_parameters())
    name = "blocks.1.ffn.0.weight"
    down, up = lora[f"diffusion_model.{name[:-7]}.lora_down.weight"], lora[f"diffusion_model.{name[:-7]}.lora_up.weight"]
    assert torch.allclose(after[name], before[name] + 0.5 * up @ down, atol=1e-6)
    bias = "blocks.0.self_attn.q.bias"
    assert torch.allclose(after[bias], before[bias] + 0.5 * lora["diffusion_model.blocks.0.self_attn.q.diff_b"],
                          atol=1e-6)
    norm = "blocks.1.norm3.weight"
    assert torch.allclose(after[norm], before[norm] + 0.5 * lora["diffusion_model.blocks.1.norm3.diff"], atol=1e-6)
    assert torch.equal(after["patch_embedding.weight"], before["patch_embedding.weight"])  # untouched
    pairs = sum(1 for k in lora if k.endswith("lora_down.weight"))
    assert len(report.merged) == pairs + 2 and len(report.ignored) == pairs  # alpha keys are ignored


def test_merged_dit_changes_its_output_and_scale_zero_does_not(tmp_path):
    path = save_tiny_lora(tmp_path / "l.safetensors")
    inp = tiny_dit_inputs(2)
    with torch.no_grad():
        base = tiny_dit(0)(**inp)
        zero = tiny_dit(0)
        merge_lora(zero, path, scale=0.0)
        one = tiny_dit(0)
        merge_lora(one, path, scale=1.0)
        assert torch.equal(zero(**inp), base)
        assert (one(**inp) - base).abs().max() > 1e-3


@pytest.mark.parametrize("keys,message", [
    ({"diffusion_model.blocks.9.self_attn.q.lora_down.weight": torch.zeros(4, 64),
      "diffusion_model.blocks.9.self_attn.q.lora_up.weight": torch.zeros(64, 4)}, "does not have"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 32),
      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 4)}, "shape"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(64, 4),
      "diffusion_model.blocks.0.self_attn.q.diff_b": torch.zeros(64)}, "not LoRA weights"),
    ({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(4, 64)}, "no matching"),
    ({"text_encoder.layer.0.weight": torch.zeros(4)}, "not LoRA weights"),
    ({"diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(4.0)}, "nothing to merge"),
])
def test_bad_lora_files_name_the_problem(tmp_path, keys, message):
    path = tmp_path / "bad.safetensors"
    save_file(keys, str(path))
    with pytest.raises(CheckpointError, match=message):
        merge_lora(tiny_dit(0), path)
    with pytest.raises(CheckpointError, match="not found"):
        merge_lora(tiny_dit(0), tmp_path / "missing.safetensors")


def test_diffusion_stage_merges_loras_from_the_models_root(tiny_official):
    from multitalk.stages import DiffusionStage

    save_tiny_lora(tiny_official / "loras" / "distill.safetensors")
    plain = DiffusionStage.from_pretrained(str(tiny_official))
    merged = DiffusionStage.from_pretrained(str(tiny_official),
                                            loras=[{"path": "loras/distill.safetensors", "scale": 0.8}])
    name = "blocks.0.self_attn.q.weight"
    delta = dict(merged.model.named_parameters())[name] - dict(plain.model.named_parameters())[name]
    assert delta.abs().max() > 1e-4
    also = DiffusionStage.from_pretrained(str(tiny_official), loras=[str(tiny_official / "loras" / "distill.safetensors")])
    assert not torch.equal(dict(also.model.named_parameters())[name], dict(merged.model.named_parameters())[name])
