"""Tests for multitalk.modules.image_encoder (tiny random CLIP vision tower, both layouts)."""

from __future__ import annotations

import pytest
import torch

from multitalk.modules import image_encoder as ie
from multitalk.modules.loading import CheckpointError
from multitalk.modules.image_encoder import ImageEncoder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_clip")
    ie.save_tiny_original(root / "models_clip_tiny.pth", seed=0)
    ie.save_tiny_diffusers(root / "diffusers" / "image_encoder", root / "diffusers" / "image_processor", seed=0)
    return root


@pytest.fixture(scope="module")
def encoder(tiny_dirs):
    return ImageEncoder.from_original(tiny_dirs / "models_clip_tiny.pth")


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, 120, 90, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _tiny_state_dict(tiny_dirs):
    return torch.load(tiny_dirs / "models_clip_tiny.pth", weights_only=True)


def _load_original(state_dict, tmp_path):
    path = tmp_path / "edited.pth"
    torch.save(state_dict, path)
    return ImageEncoder.from_original(path)


# ------------------------------------------------------------------ layouts and shapes
def test_original_and_diffusers_layouts_give_identical_outputs(tiny_dirs, encoder, image):
    diffusers = ImageEncoder.from_diffusers(tiny_dirs / "diffusers")
    assert type(diffusers.model).__name__ == "CLIPVisionModelWithProjection"
    assert diffusers.mean == ie.CLIP_MEAN and diffusers.std == ie.CLIP_STD
    assert torch.equal(encoder.encode(image), diffusers.encode(image))


def test_output_shape_and_config(encoder, image):
    cfg = encoder.model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (32, 2, 4, 64)
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_act, cfg.layer_norm_eps) == (224, 14, "gelu", 1e-5)
    output = encoder.encode(image)
    assert output.shape == (1, 257, 32) and output.dtype == torch.float32
    assert encoder.num_tokens == 257 and encoder.dim == 32


def test_video_layout_input(encoder, image):
    """[B, 3, T, H, W] (as Wan passes cond_image[:, :, -1:]) gives the same tokens per frame."""
    assert torch.equal(encoder.encode(image.unsqueeze(2)), encoder.encode(image))
    with pytest.raises(ValueError):
        encoder.encode(image[:, :2])


def test_output_is_penultimate_block_without_post_norm(encoder, image):
    """Cross-check against transformers' own forward: hidden_states[-2] is the input of the last block."""
    pixels = ie.preprocess(image)
    with torch.no_grad():
        reference = encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(encoder.encode(image), reference)


def test_preprocess_matches_wan():
    grey = torch.zeros(1, 3, 224, 224)  # 0 in [-1, 1] is 0.5 in [0, 1]; same size: resize is the identity
    pixels = ie.preprocess(grey)
    expected = (0.5 - torch.tensor(ie.CLIP_MEAN)) / torch.tensor(ie.CLIP_STD)
    torch.testing.assert_close(pixels[0, :, 100, 100], expected)
    resized = ie.preprocess(torch.rand(2, 3, 50, 70) * 2 - 1)
    assert resized.shape == (2, 3, 224, 224)


def test_bf16_load(tiny_dirs, image):
    enc = ImageEncoder.from_original(tiny_dirs / "models_clip_tiny.pth", dtype=torch.bfloat16)
    assert enc.encode(image).dtype == torch.bfloat16


def test_text_tower_and_head_are_skipped_on_purpose(encoder):
    skipped = set(encoder.skipped_keys)
    assert {"log_scale", "visual.head"} <= skipped
    assert any(k.startswith("textual.") for k in skipped)
    assert all(k.startswith("textual.") or k in ("log_scale", "visual.head") for k in skipped)


# ------------------------------------------------------------------ tiny weights
def test_tiny_weights_are_deterministic(tmp_path):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        ie.save_tiny_original(tmp_path / f"{name}.pth", seed=seed)
    a, b, c = (torch.load(tmp_path / f"{n}.pth", weights_only=True) for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["visual.transformer.0.attn.to_qkv.weight"], c["visual.transformer.0.attn.to_qkv.weight"])


# ------------------------------------------------------------------ strict loading
def test_missing_key_is_reported(tiny_dirs, tmp_path):
    state = _tiny_state_dict(tiny_dirs)
    del state["visual.transformer.1.mlp.2.bias"]
    with pytest.raises(CheckpointError, match=r"missing key.*'visual\.transformer\.1\.mlp\.2\.bias'"):
        _load_original(state, tmp_path)


def test_missing_fused_qkv_is_reported(tiny_dirs, tmp_path):
    state = _tiny_state_dict(tiny_dirs)
    del state["visual.transformer.0.attn.to_qkv.weight"]
    with pytest.raises(CheckpointError, match=r"'visual\.transformer\.0\.attn\.to_qkv\.weight'"):
        _load_original(state, tmp_path)


def test_unexpected_key_is_reported(tiny_dirs, tmp_path):
    state = _tiny_state_dict(tiny_dirs)
    state["visual.transformer.0.attn.extra"] = torch.zeros(3)
    state["visual.proj"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        _load_original(state, tmp_path)
    assert "unexpected key in checkpoint: 'visual.transformer.0.attn.extra'" in str(info.value)
    assert "unexpected key in checkpoint: 'visual.proj'" in str(info.value)


def test_wrong_shape_names_key_and_both_shapes(tiny_dirs, tmp_path):
    state = _tiny_state_dict(tiny_dirs)
    state["visual.transformer.1.attn.proj.weight"] = torch.zeros(32, 31)
    with pytest.raises(CheckpointError) as info:
        _load_original(state, tmp_path)
    message = str(info.value)
    assert "'visual.transformer.1.attn.proj.weight'" in message
    assert "(32, 31)" in message and "(32, 32)" in message


def test_wrong_fused_qkv_shape_names_key_and_shapes(tiny_dirs, tmp_path):
    state = _tiny_state_dict(tiny_dirs)
    state["visual.transformer.1.attn.to_qkv.weight"] = torch.zeros(96, 30)
    with pytest.raises(CheckpointError) as info:
        _load_original(state, tmp_path)
    message = str(info.value)
    assert "'visual.transformer.1.attn.to_qkv.weight'" in message
    assert "(96, 30)" in message and "(32, 32)" in message


def test_vit_h_shapes_convert_without_memory():
    """The real ViT-H/14 layout (meta tensors) infers the right config and passes the strict check."""
    from transformers import CLIPVisionModel

    d, mlp = 1280, 5120

    def meta(*shape):
        return torch.empty(shape, device="meta")

    state = {
        "visual.patch_embedding.weight": meta(d, 3, 14, 14),
        "visual.cls_embedding": meta(1, 1, d),
        "visual.pos_embedding": meta(1, 257, d),
        "visual.pre_norm.weight": meta(d), "visual.pre_norm.bias": meta(d),
        "visual.post_norm.weight": meta(d), "visual.post_norm.bias": meta(d),
        "visual.head": meta(d, 1024),
        "textual.token_embedding.weight": meta(250002, 1024),
        "log_scale": meta(),
    }
    for i in range(32):
        p = f"visual.transformer.{i}."
        state.update({
            p + "norm1.weight": meta(d), p + "norm1.bias": meta(d),
            p + "attn.to_qkv.weight": meta(3 * d, d), p + "attn.to_qkv.bias": meta(3 * d),
            p + "attn.proj.weight": meta(d, d), p + "attn.proj.bias": meta(d),
            p + "norm2.weight": meta(d), p + "norm2.bias": meta(d),
            p + "mlp.0.weight": meta(mlp, d), p + "mlp.0.bias": meta(mlp),
            p + "mlp.2.weight": meta(d, mlp), p + "mlp.2.bias": meta(d),
        })
    config = ie.infer_config_from_original(state)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (d, 32, 16)
    assert (config.intermediate_size, config.image_size, config.patch_size) == (mlp, 224, 14)
    converted, unexpected, skipped = ie.convert_original_state_dict(state)
    assert not unexpected and set(skipped) == {"visual.head", "textual.token_embedding.weight", "log_scale"}
    with torch.device("meta"):
        model = CLIPVisionModel(config)
    tower = model.vision_model if hasattr(model, "vision_model") else model
    ie.load_state_dict_strict(tower, converted, torch.float16)
