"""Tests for multitalk.modules.text_encoder (tiny random UMT5, both checkpoint layouts)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from multitalk.modules import text_encoder as te
from multitalk.modules.loading import CheckpointError
from multitalk.modules.text_encoder import TextEncoder

torch.set_num_threads(1)

PROMPTS = [
    "A woman is talking to the camera in a studio.",
    "two people singing in a red room!",
    "",
]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_t5")
    te.save_tiny_original(root / "models_t5_tiny.pth", root / "google" / "umt5-tiny", seed=0)
    te.save_tiny_diffusers(root / "diffusers" / "text_encoder", root / "diffusers" / "tokenizer", seed=0)
    return root


@pytest.fixture(scope="module")
def encoder(tiny_dirs):
    return TextEncoder.from_original(tiny_dirs / "models_t5_tiny.pth", tiny_dirs / "google" / "umt5-tiny")


def _load_original(tiny_dirs, state_dict, tmp_path):
    path = tmp_path / "edited.pth"
    torch.save(state_dict, path)
    return TextEncoder.from_original(path, tiny_dirs / "google" / "umt5-tiny")


def _tiny_state_dict(tiny_dirs):
    return torch.load(tiny_dirs / "models_t5_tiny.pth", weights_only=True)


# ------------------------------------------------------------------ layouts and shapes
def test_original_and_diffusers_layouts_give_identical_outputs(tiny_dirs, encoder):
    diffusers = TextEncoder.from_diffusers(tiny_dirs / "diffusers")
    for mine, theirs in zip(encoder.encode(PROMPTS), diffusers.encode(PROMPTS)):
        assert torch.equal(mine, theirs)


def test_config_inferred_from_shapes(encoder):
    cfg = encoder.model.config
    assert (cfg.d_model, cfg.num_layers, cfg.num_heads, cfg.d_kv, cfg.d_ff) == (32, 2, 4, 8, 64)
    assert cfg.vocab_size == te.TINY_CONFIG["vocab_size"] == len(encoder.tokenizer)
    assert cfg.relative_attention_num_buckets == 32
    assert cfg.dense_act_fn == "gelu_new"  # Wan's tanh-approximated GELU
    # The encoder embedding is tied to `shared`, not a second copy.
    assert encoder.model.encoder.embed_tokens.weight is encoder.model.shared.weight


def test_tokenizer_is_t5_style(encoder):
    tok = encoder.tokenizer
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert tok("a man").input_ids[-1] == 1  # eos appended


def test_output_shapes_are_trimmed_to_token_counts(encoder):
    outputs = encoder.encode(PROMPTS)
    expected_lengths = [len(encoder.tokenizer(te.clean_prompt(p)).input_ids) for p in PROMPTS]
    assert [o.shape for o in outputs] == [(n, 32) for n in expected_lengths]
    assert expected_lengths[2] == 1  # empty prompt: eos only
    assert all(o.dtype == torch.float32 for o in outputs)


def test_long_prompt_is_truncated_to_text_len(encoder):
    (output,) = encoder.encode(["the man " * 400])
    assert output.shape == (te.TEXT_LEN, 32)


def test_batch_padding_does_not_change_embeddings(encoder):
    alone = encoder.encode(PROMPTS[1])[0]
    batched = encoder.encode(["the man " * 100, PROMPTS[1]])[1]
    torch.testing.assert_close(alone, batched, rtol=0, atol=1e-5)
    encoder.pad_to_text_len = True
    try:
        padded_to_512 = encoder.encode(PROMPTS[1])[0]
    finally:
        encoder.pad_to_text_len = False
    torch.testing.assert_close(alone, padded_to_512, rtol=0, atol=1e-5)


def test_whitespace_cleaning(encoder):
    assert te.clean_prompt("  a \t man\n\n talking &amp;amp; ") == "a man talking &"
    messy, clean = encoder.encode(["  a \t man\n  talking  ", "a man talking"])
    assert torch.equal(messy, clean)


def test_bf16_load(tiny_dirs):
    enc = TextEncoder.from_original(
        tiny_dirs / "models_t5_tiny.pth", tiny_dirs / "google" / "umt5-tiny", dtype=torch.bfloat16
    )
    (output,) = enc.encode(PROMPTS[:1])
    assert output.dtype == torch.bfloat16 and enc.dtype == torch.bfloat16


# ------------------------------------------------------------------ tiny weights
def test_tiny_weights_are_deterministic(tmp_path):
    te.save_tiny_original(tmp_path / "a.pth", tmp_path / "tok_a", seed=3)
    te.save_tiny_original(tmp_path / "b.pth", tmp_path / "tok_b", seed=3)
    te.save_tiny_original(tmp_path / "c.pth", tmp_path / "tok_c", seed=4)
    a, b, c = (torch.load(tmp_path / f"{n}.pth", weights_only=True) for n in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.q.weight"], c["blocks.0.attn.q.weight"])


# ------------------------------------------------------------------ strict loading
def test_missing_key_is_reported(tiny_dirs, tmp_path):
    state = _tiny_state_dict(tiny_dirs)
    del state["blocks.1.norm2.weight"]
    with pytest.raises(CheckpointError, match=r"missing key.*'blocks\.1\.norm2\.weight'"):
        _load_original(tiny_dirs, state, tmp_path)


def test_unexpected_key_is_reported(tiny_dirs, tmp_path):
    state = _tiny_state_dict(tiny_dirs)
    state["blocks.0.attn.extra.weight"] = torch.zeros(3)
    state["head.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError) as info:
        _load_original(tiny_dirs, state, tmp_path)
    assert "unexpected key in checkpoint: 'blocks.0.attn.extra.weight'" in str(info.value)
    assert "unexpected key in checkpoint: 'head.weight'" in str(info.value)


def test_extra_block_is_reported(tiny_dirs, tmp_path):
    """A stray `blocks.2.*` key makes the inferred model 3 layers deep: the rest of block 2 is missing."""
    state = _tiny_state_dict(tiny_dirs)
    state["blocks.2.norm1.weight"] = torch.ones(32)
    with pytest.raises(CheckpointError, match=r"missing key.*'blocks\.2\.attn\.q\.weight'"):
        _load_original(tiny_dirs, state, tmp_path)


def test_wrong_shape_names_key_and_both_shapes(tiny_dirs, tmp_path):
    state = _tiny_state_dict(tiny_dirs)
    state["blocks.1.attn.o.weight"] = torch.zeros(32, 31)
    with pytest.raises(CheckpointError) as info:
        _load_original(tiny_dirs, state, tmp_path)
    message = str(info.value)
    assert "'blocks.1.attn.o.weight'" in message
    assert "(32, 31)" in message and "(32, 32)" in message


def test_xxl_shapes_convert_without_memory():
    """The real UMT5-XXL layout (meta tensors) infers the right config and passes the strict check."""
    from transformers import UMT5EncoderModel

    d, ff, heads, vocab = 4096, 10240, 64, 256384
    state = {"token_embedding.weight": torch.empty(vocab, d, device="meta"), "norm.weight": torch.empty(d, device="meta")}
    for i in range(24):
        for name in ("q", "k", "v", "o"):
            state[f"blocks.{i}.attn.{name}.weight"] = torch.empty(d, d, device="meta")
        state[f"blocks.{i}.norm1.weight"] = torch.empty(d, device="meta")
        state[f"blocks.{i}.norm2.weight"] = torch.empty(d, device="meta")
        state[f"blocks.{i}.ffn.gate.0.weight"] = torch.empty(ff, d, device="meta")
        state[f"blocks.{i}.ffn.fc1.weight"] = torch.empty(ff, d, device="meta")
        state[f"blocks.{i}.ffn.fc2.weight"] = torch.empty(d, ff, device="meta")
        state[f"blocks.{i}.pos_embedding.embedding.weight"] = torch.empty(32, heads, device="meta")
    config = te.infer_config_from_original(state)
    assert (config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff, config.vocab_size) == (
        d, 24, heads, 64, ff, vocab,
    )
    converted, unexpected = te.convert_original_state_dict(state)
    assert not unexpected
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    te.load_state_dict_strict(model, converted, torch.bfloat16, aliases=("encoder.embed_tokens.weight",))


# ------------------------------------------------------------------ cache
def test_cache_hit_returns_same_tensor_without_recomputation(encoder, monkeypatch):
    encoder.clear_cache()
    calls = []
    real_encode = encoder.encode

    def counting_encode(prompts):
        calls.append(list(prompts))
        return real_encode(prompts)

    monkeypatch.setattr(encoder, "encode", counting_encode)
    first = encoder.encode_cached("a man is talking")
    second = encoder.encode_cached("a man is talking")
    assert second is first
    assert calls == [["a man is talking"]]
    assert torch.equal(first, real_encode(["a man is talking"])[0])


def test_cache_is_lru_and_size_configurable(encoder, monkeypatch):
    encoder.clear_cache()
    encoder.cache_size = 2
    try:
        calls = []
        real_encode = encoder.encode
        monkeypatch.setattr(encoder, "encode", lambda prompts: calls.append(prompts[0]) or real_encode(prompts))
        for prompt in ["a", "b", "a", "c", "a", "b"]:
            encoder.encode_cached(prompt)
        # "b" was least recently used when "c" came in, so it is the only one computed twice.
        assert calls == ["a", "b", "c", "b"]
        encoder.cache_size = 0
        encoder.encode_cached("a")
        encoder.encode_cached("a")
        assert calls[-2:] == ["a", "a"]
    finally:
        encoder.cache_size = 8
        encoder.clear_cache()


def test_cache_is_thread_safe(encoder):
    encoder.clear_cache()
    prompts = ["a man", "a woman"] * 8
    start = threading.Event()

    def worker(prompt):
        start.wait(timeout=10)  # release all threads together so that misses overlap
        return prompt, encoder.encode_cached(prompt)

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(worker, p) for p in prompts]
        start.set()
        results = [f.result() for f in futures]
    for prompt in set(prompts):
        tensors = [t for p, t in results if p == prompt]
        assert all(t is tensors[0] for t in tensors)
    assert len(encoder._cache) == 2
