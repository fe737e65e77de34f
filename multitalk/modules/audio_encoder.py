"""Wav2Vec2 audio encoder for MultiTalk (``chinese-wav2vec2-base``), built from transformers' pieces.

MultiTalk conditions each video frame (25 fps) on the hidden states of *every* transformer layer
of a Wav2Vec2 base model. The official ``get_embedding`` does, for one mono 16 kHz clip:

1. ``Wav2Vec2FeatureExtractor`` zero-mean / unit-variance normalisation of the whole clip;
2. the CNN feature encoder (50 frames/s, 512 channels);
3. linear interpolation (``align_corners=True``) of the CNN features to
   ``num_frames = int(len(speech) / 16000 * 25)`` video frames *before* the transformer;
4. ``feature_projection`` + the transformer encoder, keeping the output of every layer
   (``hidden_states[1:]``) -> ``[num_frames, num_layers, hidden]`` (``[F, 12, 768]`` for the real model).

Here the same computation is written with ``Wav2Vec2Model.feature_extractor``,
``feature_projection`` and the ``encoder`` sub-modules (``pos_conv_embed``, ``layer_norm``,
``layers``), so no copy of the official subclass is needed and transformers 5's output-capturing
machinery is not involved.

Long audio: the CNN runs over the raw waveform (first conv layer output for 5 min of audio is
~2 GB in fp32), so clips longer than ``cnn_chunk_seconds`` go through the CNN in chunks. The
chunking is exact: the convolutions have no padding, so each chunk is cut with the CNN's
receptive field (400 samples, hop 320), and the one global operation, the first layer's
per-channel ``GroupNorm`` over time, uses statistics accumulated over the whole clip in a first
pass. Results match the one-shot path to float rounding (~1e-6). The transformer attends over all
frames (global attention, as in the official code); with SDPA attention its memory is linear in
the number of frames. ``attention_window_frames`` optionally restricts attention to overlapping
windows: that is an approximation, off by default.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

__all__ = ["AudioEncoder", "TINY_CONFIG", "TINY_PREPROCESSOR_CONFIG", "save_tiny", "num_video_frames"]

SAMPLE_RATE = 16000
VIDEO_FPS = 25

#: ``Wav2Vec2Config`` kwargs of the tiny test encoder: real CNN kernels/strides (50 Hz frames),
#: everything else shrunk. ``feat_extract_norm "group"`` / post-LN encoder as in the base model.
TINY_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=[32] * 7,
    conv_kernel=[10, 3, 3, 3, 3, 2, 2],
    conv_stride=[5, 2, 2, 2, 2, 2, 2],
    conv_bias=False,
    num_feat_extract_layers=7,
    feat_extract_norm="group",
    feat_extract_activation="gelu",
    do_stable_layer_norm=False,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=16,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
    apply_spec_augment=True,
    mask_time_prob=0.05,
    vocab_size=32,
    architectures=["Wav2Vec2Model"],
)

#: ``preprocessor_config.json`` of chinese-wav2vec2-base.
TINY_PREPROCESSOR_CONFIG = dict(
    do_normalize=True,
    feature_extractor_type="Wav2Vec2FeatureExtractor",
    feature_size=1,
    padding_side="right",
    padding_value=0.0,
    return_attention_mask=False,
    sampling_rate=SAMPLE_RATE,
)


def num_video_frames(num_samples: int, sample_rate: int = SAMPLE_RATE, fps: int = VIDEO_FPS) -> int:
    """Number of video frames the official code assigns to a clip: ``int(duration * fps)``."""
    return int(num_samples / sample_rate * fps)


def save_tiny(folder: str, seed: int = 0) -> str:
    """Write a tiny random Wav2Vec2 folder laid out like ``chinese-wav2vec2-base``.

    Files: ``config.json``, ``preprocessor_config.json``, ``model.safetensors``. Same ``seed`` ->
    same weights. LayerNorm/GroupNorm affine parameters are perturbed away from (1, 0) so the
    tests exercise them.
    """
    os.makedirs(folder, exist_ok=True)
    config = Wav2Vec2Config(**TINY_CONFIG)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Wav2Vec2Model(config)
        gen = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) and module.weight is not None:
                    module.weight.add_(0.1 * torch.randn(module.weight.shape, generator=gen))
                    module.bias.add_(0.1 * torch.randn(module.bias.shape, generator=gen))
    # Write the state dict ourselves with the key names of the real checkpoint (saved by
    # transformers 4.x): the positional conv's weight norm as ``weight_g`` / ``weight_v`` rather
    # than transformers 5's ``parametrizations.weight.original0/1``.
    state = {}
    for key, tensor in model.state_dict().items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        state[key] = tensor.detach().contiguous().clone()
    save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(folder)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump(TINY_PREPROCESSOR_CONFIG, f, indent=2)
    return folder


# Key names of the files (saved by transformers 4.x) vs ``Wav2Vec2Model``'s own: the
# ``Wav2Vec2ForPreTraining`` prefix, and the positional conv's weight norm as
# ``weight_g``/``weight_v`` rather than torch's ``parametrizations.weight.original0/1``.
_PRETRAINING_PREFIX = "wav2vec2."
_WEIGHT_NORM_NAMES = (("weight_g", "parametrizations.weight.original0"),
                      ("weight_v", "parametrizations.weight.original1"))


def _file_keys(path) -> list[str]:
    from .loading import read_keys

    return list(read_keys(path))


def _wav2vec2_model_name(key: str, prefixed: bool) -> str:
    if prefixed:
        if not key.startswith(_PRETRAINING_PREFIX):
            return "<not in Wav2Vec2Model> " + key  # left unmatched: reported as unexpected
        key = key[len(_PRETRAINING_PREFIX):]
    for file_name, model_name in _WEIGHT_NORM_NAMES:
        if key.endswith("." + file_name):
            key = key[: -len(file_name)] + model_name
    return key


def _wav2vec2_file_name(name: str, prefixed: bool) -> str:
    for file_name, model_name in _WEIGHT_NORM_NAMES:
        if name.endswith("." + model_name):
            name = name[: -len(model_name)] + file_name
    return (_PRETRAINING_PREFIX if prefixed else "") + name


def _cnn_geometry(config: Wav2Vec2Config) -> tuple:
    """(receptive field, total stride) of the CNN feature encoder in samples (400, 320 for base)."""
    receptive_field, stride = 1, 1
    for kernel, step in zip(reversed(config.conv_kernel), reversed(config.conv_stride)):
        receptive_field = (receptive_field - 1) * step + kernel
    for step in config.conv_stride:
        stride *= step
    return receptive_field, stride


def _cnn_num_frames(config: Wav2Vec2Config, num_samples: int) -> int:
    length = num_samples
    for kernel, step in zip(config.conv_kernel, config.conv_stride):
        length = (length - kernel) // step + 1
    return length


class AudioEncoder:
    """Per-video-frame Wav2Vec2 features for MultiTalk.

    Attributes:
        model: ``transformers.Wav2Vec2Model`` (eval, no grad).
        feature_extractor: ``transformers.Wav2Vec2FeatureExtractor`` (waveform normalisation).
        num_layers, hidden_size: shape of the per-frame feature (12, 768 for the real model).
    """

    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.feature_extractor = feature_extractor
        self.device = torch.device(device)
        self.dtype = dtype
        self.config: Wav2Vec2Config = model.config
        self.receptive_field, self.hop = _cnn_geometry(self.config)

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @classmethod
    def from_pretrained(cls, folder: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                        attn_implementation: str = "sdpa") -> "AudioEncoder":
        """Load a ``chinese-wav2vec2-base``-style folder (local only), strictly.

        Weights: ``model.safetensors`` if present, else ``pytorch_model.bin`` (the hub's main
        branch has only the latter). Checkpoints saved from ``Wav2Vec2ForPreTraining``
        (``wav2vec2.`` prefix) load too; their pretraining heads (``quantizer.*``,
        ``project_q.*``, ``project_hid.*``) are the only keys skipped. A missing or unknown
        tensor, or a wrong shape, is a :class:`~multitalk.modules.loading.CheckpointError`
        naming the key (transformers' ``from_pretrained`` would log a warning and fill it
        with random values). ``device="meta"`` checks the folder without reading tensor data.
        ``attn_implementation="sdpa"`` keeps the attention memory linear in the number of
        frames (``"eager"`` materialises F x F scores).
        """
        from .loading import load_pretrained_strict, transformers_weight_files

        config = Wav2Vec2Config.from_pretrained(str(folder), attn_implementation=attn_implementation)
        files = transformers_weight_files(folder)
        prefixed = any(k.startswith(_PRETRAINING_PREFIX) for f in files for k in _file_keys(f))
        model = load_pretrained_strict(
            Wav2Vec2Model, folder, dtype, device, config=config, files=files, allowed_extra="wav2vec2",
            rename=lambda k: _wav2vec2_model_name(k, prefixed),
            source_name=lambda n: _wav2vec2_file_name(n, prefixed),
        )
        feature_extractor = Wav2Vec2FeatureExtractor.from_pretrained(str(folder), local_files_only=True)
        return cls(model, feature_extractor, device=device, dtype=dtype)

    # ---- CNN feature encoder -----------------------------------------------------------------

    def _cnn_features(self, input_values: torch.Tensor, chunk_samples: Optional[int]) -> torch.Tensor:
        """CNN features ``[1, conv_dim[-1], T50]`` of normalised waveform ``input_values [1, N]``.

        One-shot when the clip fits in ``chunk_samples`` (same ops as the official code), else
        exact chunking (see module docstring).
        (The official feature extractor's layers step by step, kept in one place so it can be read against the original.)
        """
        cnn = self.model.feature_extractor
        num_samples = input_values.shape[-1]
        if chunk_samples is None or num_samples <= chunk_samples:
            return cnn(input_values)

        total_frames = _cnn_num_frames(self.config, num_samples)
        frames_per_chunk = max(1, (chunk_samples - self.receptive_field) // self.hop + 1)
        spans = [(a, min(a + frames_per_chunk, total_frames)) for a in range(0, total_frames, frames_per_chunk)]

        def waveform_slice(first_frame: int, end_frame: int) -> torch.Tensor:
            # Output frame j sees samples [j * hop, j * hop + receptive_field).
            start = first_frame * self.hop
            stop = (end_frame - 1) * self.hop + self.receptive_field
            return input_values[:, None, start:stop]  # [1, 1, samples]

        first = cnn.conv_layers[0]
        group_norm = getattr(first, "layer_norm", None)
        needs_global_stats = isinstance(group_norm, torch.nn.GroupNorm)
        if needs_global_stats:
            if group_norm.num_groups != group_norm.num_channels:
                raise NotImplementedError("chunked CNN assumes one GroupNorm group per channel (wav2vec2 base)")
            # Pass 1: per-channel mean/var of the first conv's output over the whole clip. Only
            # the first layer's samples matter here; its output length is what GroupNorm sees.
            first_len = (num_samples - first.conv.kernel_size[0]) // first.conv.stride[0] + 1
            first_per_chunk = max(1, (chunk_samples - first.conv.kernel_size[0]) // first.conv.stride[0] + 1)
            total = torch.zeros(group_norm.num_channels, dtype=torch.float64, device=input_values.device)
            total_sq = torch.zeros_like(total)
            for a in range(0, first_len, first_per_chunk):
                b = min(a + first_per_chunk, first_len)
                start = a * first.conv.stride[0]
                stop = (b - 1) * first.conv.stride[0] + first.conv.kernel_size[0]
                out = first.conv(input_values[:, None, start:stop])[0]  # [C, b - a]
                # Accumulate in float64: sums over minutes of audio (~1e6 frames) would lose
                # precision in float32.
                total += out.sum(dim=1, dtype=torch.float64)
                total_sq += out.square().sum(dim=1, dtype=torch.float64)
            mean = total / first_len
            var = (total_sq / first_len - mean * mean).clamp_min(0.0)
            scale = (group_norm.weight.double() / torch.sqrt(var + group_norm.eps))
            shift = group_norm.bias.double() - mean * scale
            scale = scale.to(input_values.dtype)[None, :, None]
            shift = shift.to(input_values.dtype)[None, :, None]

        pieces = []
        for a, b in spans:
            hidden = waveform_slice(a, b)
            if needs_global_stats:
                hidden = first.activation(first.conv(hidden) * scale + shift)
                rest = cnn.conv_layers[1:]
            else:
                rest = cnn.conv_layers
            for layer in rest:
                hidden = layer(hidden)
            pieces.append(hidden)
        features = torch.cat(pieces, dim=2)
        if features.shape[2] != total_frames:
            raise AssertionError(f"chunked CNN produced {features.shape[2]} frames, expected {total_frames}")
        return features

    # ---- transformer -------------------------------------------------------------------------

    def _transformer_layers(self, hidden: torch.Tensor) -> torch.Tensor:
        """Encoder over ``hidden [1, F, H]`` -> every layer's output stacked ``[F, L, H]``.

        Mirrors ``Wav2Vec2Encoder`` (post-LN: pos-conv, LayerNorm, layers) and, for
        ``do_stable_layer_norm`` models, ``Wav2Vec2EncoderStableLayerNorm`` (pos-conv, layers,
        final LayerNorm applied to the last layer's output, as transformers 4.x reported it in
        ``hidden_states[-1]``). Dropouts are inactive in eval mode and skipped.
        """
        encoder = self.model.encoder
        hidden = hidden + encoder.pos_conv_embed(hidden)
        stable = bool(self.config.do_stable_layer_norm)
        if not stable:
            hidden = encoder.layer_norm(hidden)
        outputs = []
        for layer in encoder.layers:
            hidden = layer(hidden, attention_mask=None)
            if isinstance(hidden, tuple):  # older transformers return (hidden, attn_weights)
                hidden = hidden[0]
            outputs.append(hidden)
        if stable:
            outputs[-1] = encoder.layer_norm(outputs[-1])
        return torch.stack(outputs, dim=2)[0]  # [F, L, H]

    def _windowed_transformer(self, hidden: torch.Tensor, window: int, context: int) -> torch.Tensor:
        """APPROXIMATE: run the encoder on overlapping windows (each frame sees at most
        ``window + 2 * context`` frames) and keep every window's centre part."""
        num_frames = hidden.shape[1]
        out = []
        for start in range(0, num_frames, window):
            stop = min(start + window, num_frames)
            lo, hi = max(0, start - context), min(num_frames, stop + context)
            layers = self._transformer_layers(hidden[:, lo:hi])
            out.append(layers[start - lo: stop - lo])
        return torch.cat(out, dim=0)

    # ---- public API --------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, speech: np.ndarray, num_frames: Optional[int] = None, cnn_chunk_seconds: Optional[float] = 20.0,
               attention_window_frames: Optional[int] = None, attention_context_frames: int = 125) -> torch.Tensor:
        """Per-video-frame features of one mono 16 kHz clip (official ``get_embedding``).

        Args:
            speech: ``[num_samples]`` float mono waveform at 16 kHz (any loudness; normalised here).
            num_frames: video frames to produce; default ``int(num_samples / 16000 * 25)``.
            cnn_chunk_seconds: clips longer than this go through the CNN in exact chunks of
                about this length (bounds memory); ``None`` = always one shot.
            attention_window_frames: ``None`` (default) = global attention, exact. An int
                restricts attention to windows of that many frames plus
                ``attention_context_frames`` on each side: APPROXIMATE, only for very long
                clips on memory-starved devices.
        Returns:
            ``[num_frames, num_layers, hidden_size]`` float32 on CPU (``[F, 12, 768]`` for the
            real model).
        """
        speech = np.asarray(speech, dtype=np.float32)
        if speech.ndim != 1:
            raise ValueError(f"expected mono speech [num_samples], got shape {speech.shape}")
        if num_frames is None:
            num_frames = num_video_frames(len(speech))
        if num_frames < 1:
            raise ValueError(f"audio too short: {len(speech)} samples give {num_frames} video frames")
        min_samples = self.receptive_field
        if len(speech) < min_samples:
            raise ValueError(f"audio too short for the CNN: {len(speech)} < {min_samples} samples")

        # 1. Whole-clip zero-mean/unit-variance normalisation, exactly as the official code.
        input_values = np.squeeze(self.feature_extractor(speech, sampling_rate=SAMPLE_RATE).input_values)
        input_values = torch.from_numpy(np.asarray(input_values, dtype=np.float32))
        input_values = input_values.to(device=self.device, dtype=self.dtype)[None]  # [1, N]

        # 2. CNN features at 50 Hz: [1, C, T50].
        chunk_samples = None if cnn_chunk_seconds is None else int(cnn_chunk_seconds * SAMPLE_RATE)
        features = self._cnn_features(input_values, chunk_samples)

        # 3. Resample to the video frame rate before the transformer (the official
        #    linear_interpolation, which interpolates along time with align_corners=True).
        features = F.interpolate(features, size=num_frames, mode="linear", align_corners=True)
        features = features.transpose(1, 2)  # [1, F, C]

        # 4. Projection + every transformer layer's output.
        hidden, _ = self.model.feature_projection(features)  # [1, F, H]
        if attention_window_frames is None:
            layers = self._transformer_layers(hidden)
        else:
            layers = self._windowed_transformer(hidden, int(attention_window_frames), int(attention_context_frames))
        return layers.float().cpu()
