"""UMT5-XXL text encoder of Wan 2.1 (the prompt encoder of MultiTalk).

The network is transformers' ``UMT5EncoderModel``; this module adds:

* loading of Wan's own checkpoint ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan key names,
  converted here to transformers names, config inferred from tensor shapes, strict),
* loading of the diffusers layout (``text_encoder/`` + ``tokenizer/``),
* Wan's prompt semantics: whitespace cleaning, tokenisation to at most ``text_len`` (512)
  tokens with the end-of-sequence token, and per-prompt embeddings trimmed to the true
  token count (the DiT zero-pads them itself),
* a thread-safe LRU cache of prompt embeddings (the negative prompt is the same for every job),
* tiny random weights in both layouts for tests.

Tensor shapes use ``L`` for a prompt's token count (eos included) and ``D`` for d_model
(4096 for UMT5-XXL).
"""

from __future__ import annotations

import html
import logging
import os
import re
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .loading import (
    CheckpointError, ConvertedTensor, load_file_state_dict, load_pretrained_strict, load_state_dict_strict, require_tensor,
)

try:  # transformers depends on `regex`; its `\s` is Unicode White_Space, which Wan's cleaning uses.
    import regex as _regex
except ImportError:  # pragma: no cover - transformers always installs it
    _regex = re

logger = logging.getLogger(__name__)

__all__ = [
    "TEXT_LEN",
    "TINY_CONFIG",
    "TextEncoder",
    "clean_prompt",
    "convert_original_state_dict",
    "infer_config_from_original",
    "save_tiny_original",
    "save_tiny_diffusers",
]

# Wan's T5 context length: prompts are truncated to this many tokens (eos included).
TEXT_LEN = 512

# Wan's T5RelativeEmbedding uses max_dist=128, the T5 default.
_RELATIVE_ATTENTION_MAX_DISTANCE = 128
_LAYER_NORM_EPS = 1e-6
# Eager attention is Wan's own formulation (scores + position bias, softmax, no scaling): it matches
# the official encoder bit for bit on CPU, while SDPA drifts by ~1e-5 on long prompts. The score
# matrix is small (heads x 512 x 512 per prompt), so nothing is gained from a fused kernel here.
_ATTN_IMPLEMENTATION = "eager"


# --------------------------------------------------------------------------------------
# Wan original key names <-> transformers UMT5EncoderModel names
# --------------------------------------------------------------------------------------
_ORIGINAL_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Per block: Wan name -> transformers name (below ``encoder.block.{i}.``).
# Wan's FFN computes fc1(x) * gelu(gate(x)); transformers' gated FFN computes
# gelu(wi_0(x)) * wi_1(x), so the GELU-ed ``gate`` is ``wi_0`` and ``fc1`` is ``wi_1``.
_BLOCK_RENAMES = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    # UMT5: every block has its own relative position bias (Wan: shared_pos=False).
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
_TOP_RENAMES = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
}
# ``encoder.embed_tokens`` is tied to ``shared`` and therefore not read from the file.
_TIED_ALIASES = ("encoder.embed_tokens.weight",)


def _original_name(hf_name: str) -> str | None:
    """transformers parameter name -> Wan checkpoint key (for error messages)."""
    for original, hf in _TOP_RENAMES.items():
        if hf == hf_name:
            return original
    match = re.match(r"^encoder\.block\.(\d+)\.(.+)$", hf_name)
    if match:
        for original, hf in _BLOCK_RENAMES.items():
            if hf == match.group(2):
                return f"blocks.{match.group(1)}.{original}"
    return None


def infer_config_from_original(state_dict: Mapping[str, torch.Tensor]):
    """Build a ``UMT5Config`` from the shapes of a Wan T5 encoder checkpoint.

    Shapes used: ``token_embedding.weight`` [vocab, d_model], ``blocks.0.attn.q.weight``
    [heads * d_kv, d_model], ``blocks.0.pos_embedding.embedding.weight`` [buckets, heads],
    ``blocks.0.ffn.fc1.weight`` [d_ff, d_model]; the layer count is the number of ``blocks.N``.
    """
    from transformers import UMT5Config

    if "pos_embedding.embedding.weight" in state_dict:
        raise CheckpointError(
            "checkpoint has a shared position embedding ('pos_embedding.embedding.weight'): that is "
            "T5 (shared_pos=True), not the UMT5 encoder Wan uses"
        )
    vocab_size, d_model = require_tensor(state_dict, "token_embedding.weight", 2).shape
    inner_dim = require_tensor(state_dict, "blocks.0.attn.q.weight", 2).shape[0]
    num_buckets, num_heads = require_tensor(state_dict, "blocks.0.pos_embedding.embedding.weight", 2).shape
    d_ff = require_tensor(state_dict, "blocks.0.ffn.fc1.weight", 2).shape[0]
    block_ids = {int(m.group(1)) for k in state_dict if (m := _ORIGINAL_BLOCK_KEY.match(k))}
    num_layers = max(block_ids) + 1
    if inner_dim % num_heads:
        raise CheckpointError(
            f"'blocks.0.attn.q.weight' has {inner_dim} outputs, not divisible by {num_heads} heads "
            "(from 'blocks.0.pos_embedding.embedding.weight')"
        )
    return UMT5Config(
        vocab_size=int(vocab_size),
        d_model=int(d_model),
        d_kv=int(inner_dim // num_heads),
        d_ff=int(d_ff),
        num_layers=int(num_layers),
        num_heads=int(num_heads),
        relative_attention_num_buckets=int(num_buckets),
        relative_attention_max_distance=_RELATIVE_ATTENTION_MAX_DISTANCE,
        # Wan's GELU is the tanh approximation, which is what "gated-gelu" (gelu_new) is.
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=_LAYER_NORM_EPS,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        attn_implementation=_ATTN_IMPLEMENTATION,
    )


def convert_original_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, ConvertedTensor], list[str]]:
    """Rename Wan T5 keys to ``UMT5EncoderModel`` keys (no copies: the tensors are reused).

    Returns:
        (converted: model name -> ConvertedTensor, unexpected: Wan keys with no rule)
    """
    converted: dict[str, ConvertedTensor] = {}
    unexpected: list[str] = []
    for key, tensor in state_dict.items():
        hf_name = _TOP_RENAMES.get(key)
        if hf_name is None and (match := _ORIGINAL_BLOCK_KEY.match(key)):
            suffix = _BLOCK_RENAMES.get(match.group(2))
            if suffix is not None:
                hf_name = f"encoder.block.{match.group(1)}.{suffix}"
        if hf_name is None:
            unexpected.append(key)
            continue
        converted[hf_name] = ConvertedTensor(key, tuple(tensor.shape), tensor)
    return converted, unexpected


# --------------------------------------------------------------------------------------
# Prompt cleaning (Wan's HuggingfaceTokenizer with clean='whitespace')
# --------------------------------------------------------------------------------------
_WHITESPACE_RUN = _regex.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: fix mojibake (ftfy), unescape HTML twice, collapse whitespace."""
    try:
        import ftfy
    except ImportError:  # pragma: no cover - ftfy is a dependency; without it prompts are rarely affected
        logger.warning("ftfy is not installed: prompts are not mojibake-fixed as Wan does")
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip()


# --------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------
class TextEncoder:
    """UMT5 encoder + tokenizer with Wan's prompt semantics and an LRU prompt cache.

    Args:
        model: a ``UMT5EncoderModel`` (eval mode is set here).
        tokenizer: the matching tokenizer (T5/UMT5 style: pad 0, eos 1).
        text_len: maximum tokens per prompt, eos included (Wan: 512).
        cache_size: number of prompt embeddings kept by :meth:`encode_cached` (0 disables it).
        pad_to_text_len: pad every batch to ``text_len`` as Wan does. By default batches are
            padded only to their longest prompt: padded keys are masked out and UMT5's position
            bias is relative, so the kept tokens' embeddings are the same (to float rounding)
            while short prompts cost a fraction of the compute.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        text_len: int = TEXT_LEN,
        cache_size: int = 8,
        pad_to_text_len: bool = False,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = int(text_len)
        self.pad_to_text_len = bool(pad_to_text_len)
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = int(cache_size)
        self._cache_lock = threading.Lock()
        self.cache_hits = 0
        self.cache_misses = 0

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_original(
        cls,
        pth_path: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> "TextEncoder":
        """Load Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (+ the ``google/umt5-xxl`` tokenizer folder).

        The config (d_model, layers, heads, d_ff, vocab, buckets) is inferred from tensor shapes.
        Loading is strict: every file key must be used and every parameter filled, otherwise
        :class:`CheckpointError` names the offending keys (and both shapes).
        ``device="meta"`` checks the file (and loads the tokenizer) without reading tensor data.
        ``kwargs`` go to the constructor (``text_len``, ``cache_size``, ``pad_to_text_len``).
        """
        from transformers import UMT5EncoderModel

        state_dict = load_file_state_dict(pth_path, device)
        config = infer_config_from_original(state_dict)
        converted, unexpected = convert_original_state_dict(state_dict)
        del state_dict  # the converted entries hold the only references to the mapped tensors

        with torch.device("meta"):
            model = UMT5EncoderModel(config)
        missing_names = {name: _original_name(name) for name in model.state_dict()}
        load_state_dict_strict(
            model,
            converted,
            dtype,
            device=device,
            aliases=_TIED_ALIASES,
            unexpected_source_keys=unexpected,
            missing_source_keys={k: v for k, v in missing_names.items() if v},
        )
        del converted
        return cls._finish(model, tokenizer_dir, device, dtype, **kwargs)

    @classmethod
    def from_pretrained(
        cls,
        text_encoder_dir: str | os.PathLike,
        tokenizer_dir: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> "TextEncoder":
        """Load a transformers-format ``UMT5EncoderModel`` folder and a tokenizer folder, strictly
        (a missing, unknown or misshapen tensor is a :class:`CheckpointError` naming it; the
        tied ``encoder.embed_tokens.weight`` may be in the file or not). Every weight is cast
        to ``dtype``, as Wan casts its T5 (transformers' ``from_pretrained`` would keep the
        ``wo`` projections in fp32 under fp16). ``device="meta"``: no tensor data is read."""
        from transformers import UMT5Config, UMT5EncoderModel

        config = UMT5Config.from_pretrained(os.fspath(text_encoder_dir), attn_implementation=_ATTN_IMPLEMENTATION)
        model = load_pretrained_strict(UMT5EncoderModel, text_encoder_dir, dtype, device, config=config,
                                       aliases=_TIED_ALIASES)
        return cls._finish(model, tokenizer_dir, device, dtype, **kwargs)

    @classmethod
    def _finish(cls, model, tokenizer_dir: str | os.PathLike, device, dtype: torch.dtype, **kwargs) -> "TextEncoder":
        """Tie the encoder's embedding to ``shared`` (one tensor, as in from_pretrained), place
        the model and load its tokenizer: the end of both loaders."""
        from transformers import AutoTokenizer

        model.set_input_embeddings(model.shared)
        model.config.dtype = dtype
        model.to(device)
        return cls(model, AutoTokenizer.from_pretrained(os.fspath(tokenizer_dir)), **kwargs)

    @classmethod
    def from_diffusers(
        cls,
        root: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        **kwargs,
    ) -> "TextEncoder":
        """Load ``root/text_encoder`` + ``root/tokenizer`` (the diffusers Wan pipeline layout)."""
        root = Path(root)
        return cls.from_pretrained(root / "text_encoder", root / "tokenizer", device, dtype, **kwargs)

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    @property
    def dim(self) -> int:
        """d_model, the width of the embeddings (4096 for UMT5-XXL)."""
        return int(self.model.config.d_model)

    def to(self, device: str | torch.device) -> "TextEncoder":
        """Move the model (e.g. to offload it). Cached embeddings stay where they were computed."""
        self.model.to(device)
        return self

    # ---------------------------------------------------------------- encoding
    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenise prompts as Wan does (eos appended, truncated to ``text_len``).

        Returns:
            (input_ids [B, T] long, attention_mask [B, T] long), T = text_len if
            ``pad_to_text_len`` else the longest prompt's token count.
        """
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            padding="max_length" if self.pad_to_text_len else "longest",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        return batch.input_ids, batch.attention_mask

    @torch.inference_mode()
    def encode(self, prompts: list[str] | str) -> list[torch.Tensor]:
        """Encode prompts.

        Args:
            prompts: B prompt strings (a single string is treated as a batch of one).

        Returns:
            B tensors, the i-th of shape [L_i, D] on the model's device and dtype, where L_i is
            prompt i's token count including eos (at most ``text_len``). Padding is trimmed.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        input_ids, attention_mask = self.tokenize(list(prompts))
        input_ids = input_ids.to(self.device)
        attention_mask = attention_mask.to(self.device)
        token_counts = attention_mask.gt(0).sum(dim=1).tolist()
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # clone: a trimmed view would keep the whole padded batch alive.
        return [h[:n].clone() for h, n in zip(hidden, token_counts)]

    # ---------------------------------------------------------------- cache
    @property
    def cache_size(self) -> int:
        return self._cache_size

    @cache_size.setter
    def cache_size(self, size: int) -> None:
        with self._cache_lock:
            self._cache_size = int(size)
            self._evict_locked()

    def _evict_locked(self) -> None:
        while len(self._cache) > max(self._cache_size, 0):
            self._cache.popitem(last=False)

    def encode_cached(self, prompt: str) -> torch.Tensor:
        """Encode one prompt through the LRU cache; returns [L, D].

        A hit returns the very same tensor object as the first call: treat it as read-only.
        Thread-safe; the encoder runs outside the lock, so two threads missing on the same
        prompt at once may both compute it, and the first result stored wins.
        """
        with self._cache_lock:
            cached = self._cache.get(prompt)
            if cached is not None:
                self._cache.move_to_end(prompt)
                self.cache_hits += 1
                return cached
            self.cache_misses += 1
        embedding = self.encode([prompt])[0]
        if self._cache_size <= 0:
            return embedding
        with self._cache_lock:
            embedding = self._cache.setdefault(prompt, embedding)
            self._cache.move_to_end(prompt)
            self._evict_locked()
        return embedding

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()

    def __repr__(self) -> str:
        cfg = self.model.config
        return (
            f"TextEncoder(d_model={cfg.d_model}, layers={cfg.num_layers}, heads={cfg.num_heads}, "
            f"vocab={cfg.vocab_size}, text_len={self.text_len}, device={self.device}, dtype={self.dtype})"
        )


# --------------------------------------------------------------------------------------
# Tiny random weights for tests
# --------------------------------------------------------------------------------------
def _tiny_vocab() -> list[tuple[str, float]]:
    """A small Unigram vocabulary: T5 specials (pad 0, eos 1, unk 2), whole words, then characters.

    Whole words score higher than their spelling, so common words become single tokens and the
    rest is spelled out character by character (anything else maps to unk).
    """
    words = (
        "a an the man woman person people two is are talking speaking singing smiling looking at "
        "camera in on of and with to room studio red blue hair face video"
    ).split()
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + w, -3.0) for w in words]
    characters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,!?'-:;()"
    vocab += [(c, -6.0) for c in characters]
    return vocab


_TINY_VOCAB = _tiny_vocab()

TINY_CONFIG = {
    "vocab_size": len(_TINY_VOCAB),
    "d_model": 32,
    "num_layers": 2,
    "num_heads": 4,
    "d_kv": 8,
    "d_ff": 64,
    "relative_attention_num_buckets": 32,
}


def _tiny_original_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights with Wan's key names, generated in a fixed order from ``seed``."""
    cfg = TINY_CONFIG
    generator = torch.Generator().manual_seed(seed)
    d, inner, ff = cfg["d_model"], cfg["num_heads"] * cfg["d_kv"], cfg["d_ff"]

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    state = {"token_embedding.weight": randn(cfg["vocab_size"], d, std=1.0)}
    for i in range(cfg["num_layers"]):
        prefix = f"blocks.{i}."
        state[prefix + "norm1.weight"] = 1.0 + randn(d, std=0.1)
        state[prefix + "attn.q.weight"] = randn(inner, d, std=(d * inner) ** -0.25)
        state[prefix + "attn.k.weight"] = randn(inner, d, std=d**-0.5)
        state[prefix + "attn.v.weight"] = randn(inner, d, std=d**-0.5)
        state[prefix + "attn.o.weight"] = randn(d, inner, std=inner**-0.5)
        state[prefix + "norm2.weight"] = 1.0 + randn(d, std=0.1)
        state[prefix + "ffn.gate.0.weight"] = randn(ff, d, std=d**-0.5)
        state[prefix + "ffn.fc1.weight"] = randn(ff, d, std=d**-0.5)
        state[prefix + "ffn.fc2.weight"] = randn(d, ff, std=ff**-0.5)
        state[prefix + "pos_embedding.embedding.weight"] = randn(
            cfg["relative_attention_num_buckets"], cfg["num_heads"], std=0.5
        )
    state["norm.weight"] = 1.0 + randn(d, std=0.1)
    return state


def _save_tiny_tokenizer(tokenizer_dir: str | os.PathLike) -> None:
    """Write a T5-style tokenizer folder (tokenizer.json + tokenizer_config.json)."""
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast(vocab=list(_TINY_VOCAB), extra_ids=0)
    if len(tokenizer) != TINY_CONFIG["vocab_size"]:  # e.g. a transformers version adding sentinels
        raise RuntimeError(f"tiny tokenizer has {len(tokenizer)} tokens, expected {TINY_CONFIG['vocab_size']}")
    tokenizer.save_pretrained(os.fspath(tokenizer_dir))


def save_tiny_original(pth_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, seed: int = 0) -> None:
    """Write tiny random T5 weights in Wan's original layout (``torch.save``) and a tokenizer folder."""
    Path(pth_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(_tiny_original_state_dict(seed), os.fspath(pth_path))
    _save_tiny_tokenizer(tokenizer_dir)


def save_tiny_diffusers(
    text_encoder_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike, seed: int = 0
) -> None:
    """Write the same weights as :func:`save_tiny_original` (same seed) as a transformers
    ``UMT5EncoderModel`` folder (``save_pretrained``), plus the tokenizer folder."""
    from transformers import UMT5EncoderModel

    state_dict = _tiny_original_state_dict(seed)
    config = infer_config_from_original(state_dict)
    converted, unexpected = convert_original_state_dict(state_dict)
    assert not unexpected, unexpected
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    load_state_dict_strict(model, converted, torch.float32, aliases=_TIED_ALIASES)
    model.set_input_embeddings(model.shared)
    model.save_pretrained(os.fspath(text_encoder_dir))
    _save_tiny_tokenizer(tokenizer_dir)
