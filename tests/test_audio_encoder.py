"""Tests for multitalk.modules.audio_encoder (tiny random Wav2Vec2, CPU, fp32)."""

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from multitalk.modules.audio_encoder import (
    TINY_CONFIG,
    AudioEncoder,
    num_video_frames,
    save_tiny,
)

torch.set_num_threads(1)


def _speech(seconds, seed=0):
    n = int(round(seconds * 16000))
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    return (0.3 * np.sin(2 * np.pi * 200 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_tiny(str(tmp_path_factory.mktemp("w2v") / "chinese-wav2vec2-base"), seed=0)


@pytest.fixture(scope="module")
def encoder(folder):
    return AudioEncoder.from_pretrained(folder)


def test_tiny_folder_layout(folder):
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["model_type"] == "wav2vec2"
    for key in ("hidden_size", "num_hidden_layers", "conv_kernel", "conv_stride", "feat_extract_norm"):
        assert config[key] == TINY_CONFIG[key]
    pre = json.load(open(os.path.join(folder, "preprocessor_config.json")))
    assert pre["feature_extractor_type"] == "Wav2Vec2FeatureExtractor"
    assert pre["sampling_rate"] == 16000 and pre["do_normalize"] is True
    keys = load_file(os.path.join(folder, "model.safetensors"))
    # Real (transformers 4.x) checkpoints store the positional conv's weight norm as weight_g/weight_v.
    assert "encoder.pos_conv_embed.conv.weight_g" in keys


def test_weights_loaded_not_reinitialised(folder, encoder):
    saved = load_file(os.path.join(folder, "model.safetensors"))
    loaded = encoder.model.state_dict()
    for key, value in saved.items():
        key = key.replace("weight_g", "parametrizations.weight.original0")
        key = key.replace("weight_v", "parametrizations.weight.original1")
        assert torch.equal(value, loaded[key]), key


@pytest.mark.parametrize("seconds", [0.5, 1.03, 2.0, 3.37])
def test_frame_and_layer_count(encoder, seconds):
    speech = _speech(seconds)
    out = encoder.encode(speech)
    expected_frames = int(len(speech) / 16000 * 25)
    assert expected_frames == num_video_frames(len(speech))
    assert out.shape == (expected_frames, TINY_CONFIG["num_hidden_layers"], TINY_CONFIG["hidden_size"])
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_deterministic(encoder, folder, tmp_path):
    speech = _speech(1.5, seed=1)
    first = encoder.encode(speech)
    assert torch.equal(first, encoder.encode(speech))
    # Same seed -> same weights -> same features from a fresh folder.
    again = AudioEncoder.from_pretrained(save_tiny(str(tmp_path / "again"), seed=0))
    assert torch.equal(first, again.encode(speech))


def test_matches_transformers_hidden_states(encoder):
    """With num_frames equal to the CNN frame count the interpolation is the identity, so the
    result must equal Wav2Vec2Model's own hidden_states[1:] (every layer's output)."""
    speech = _speech(1.2, seed=2)
    values = np.squeeze(encoder.feature_extractor(speech, sampling_rate=16000).input_values)
    with torch.no_grad():
        reference = encoder.model(torch.from_numpy(values)[None], output_hidden_states=True)
    layers = torch.stack(reference.hidden_states[1:], dim=1)[0].transpose(0, 1)  # [T50, L, H]
    ours = encoder.encode(speech, num_frames=layers.shape[0])
    assert torch.allclose(ours, layers, atol=1e-6, rtol=0)


def test_chunked_cnn_matches_one_shot(encoder):
    speech = _speech(4.0, seed=3)
    one_shot = encoder.encode(speech, cnn_chunk_seconds=None)
    chunked = encoder.encode(speech, cnn_chunk_seconds=0.3)  # many chunks, ragged last one
    assert (one_shot - chunked).abs().max().item() < 1e-5


def test_windowed_attention_is_optional_and_shaped(encoder):
    speech = _speech(3.0, seed=4)
    exact = encoder.encode(speech)
    approx = encoder.encode(speech, attention_window_frames=25, attention_context_frames=10)
    assert approx.shape == exact.shape
    # Huge window == global attention: identical to the exact path.
    same = encoder.encode(speech, attention_window_frames=10_000)
    assert torch.equal(same, exact)


def test_rejects_bad_input(encoder):
    with pytest.raises(ValueError):
        encoder.encode(np.zeros((2, 16000), dtype=np.float32))
    with pytest.raises(ValueError):
        encoder.encode(np.zeros(100, dtype=np.float32))
