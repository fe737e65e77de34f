"""Kokoro-82M text to speech, the TTS model of the official MultiTalk (``--audio_mode tts``).

The network is the ``kokoro`` package's ``KModel`` (StyleTTS2 text/prosody encoders + an
iSTFTNet vocoder, 24 kHz): the same model the official repository vendors. This module adds:

* strict loading of a local ``Kokoro-82M/`` folder in its official layout (``config.json``,
  ``kokoro-v1_0.pth``, ``voices/<name>.pt``); ``KModel``'s own loader downloads from a hub
  when a file is not given and falls back to a non-strict load, so it is not used here,
* English grapheme-to-phoneme conversion with espeak-ng (misaki's espeak mapping into
  Kokoro's American English phoneme set; misaki's default English G2P needs a spaCy model
  that no package registry carries, and nothing is downloaded at run time),
* the official pipeline's text handling (``split_pattern=r'\\n+'``, at most 510 phonemes per
  synthesis, each piece spoken with the voice row for its phoneme count),
* tiny random weights in the official layout for tests.

Shapes: a voice file is ``[510, 1, 256]`` (one 256-wide style vector per phoneme count; the
first 128 values drive the decoder, the last 128 the prosody predictor); a synthesis gives
``[num_samples]`` float32 at 24 kHz, 600 samples per predicted duration frame.

The official checkpoint: ``{"bert", "bert_encoder", "predictor", "text_encoder", "decoder"}``
→ state dicts whose keys carry a ``module.`` prefix (saved from ``DataParallel``), weight-norm
convolutions as ``weight_g``/``weight_v``. It holds 548 of ``KModel``'s 688 tensors: the
missing 140 are the affine weights of the 70 ``InstanceNorm1d`` inside ``AdaIN1d`` (the model
was trained with ``affine=False``; kokoro declares them for an old ONNX-export bug and leaves
them at their initial ones/zeros). They are filled with ones/zeros here on purpose; every
other tensor must be in the file and every file tensor must be used.
"""
from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .loading import CheckpointError, ConvertedTensor, load_state_dict_strict

__all__ = [
    "COMPONENTS",
    "CONFIG_FILE",
    "EnglishG2P",
    "KokoroTTS",
    "MAX_PHONEMES",
    "SAMPLE_RATE",
    "SPLIT_PATTERN",
    "TINY_CONFIG",
    "TINY_VOICES",
    "VOCAB_V1",
    "WEIGHTS_FILE",
    "build_model",
    "load_model",
    "load_voice",
    "read_config",
    "save_tiny",
    "split_phonemes",
    "voice_names",
]

logger = logging.getLogger(__name__)

SAMPLE_RATE = 24000
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "kokoro-v1_0.pth"
VOICES_DIR = "voices"
# The five sub-models of ``KModel``, the top-level keys of the official .pth.
COMPONENTS = ("bert", "bert_encoder", "predictor", "text_encoder", "decoder")
# Phonemes per synthesis: a voice has one style row per phoneme count (510 rows), and the
# text encoder's 512 positions hold them plus the two boundary tokens.
MAX_PHONEMES = 510
STYLE_WIDTH = 256  # KModel splits the style vector at 128 (decoder | predictor)
# The official call: KPipeline(...)(text, voice, speed=1, split_pattern=r'\n+').
SPLIT_PATTERN = r"\n+"
_DATA_PARALLEL_PREFIX = "module."
# Where an over-long phoneme string is cut, best first (kokoro's chunking order).
_CUT_MARKS = ("!.?…", ":;", ",—")

# Kokoro-82M v1.0 ``config.json``'s phoneme vocabulary (114 symbols).
VOCAB_V1 = {
    ";": 1, ":": 2, ",": 3, ".": 4, "!": 5, "?": 6, "\u2014": 9, "\u2026": 10, '"': 11, "(": 12, ")": 13,
    "\u201c": 14, "\u201d": 15, " ": 16, "\u0303": 17, "\u02a3": 18, "\u02a5": 19, "\u02a6": 20, "\u02a8": 21,
    "\u1d5d": 22, "\uab67": 23, "A": 24, "I": 25, "O": 31, "Q": 33, "S": 35, "T": 36, "W": 39, "Y": 41,
    "\u1d4a": 42, "a": 43, "b": 44, "c": 45, "d": 46, "e": 47, "f": 48, "h": 50, "i": 51, "j": 52, "k": 53,
    "l": 54, "m": 55, "n": 56, "o": 57, "p": 58, "q": 59, "r": 60, "s": 61, "t": 62, "u": 63, "v": 64, "w": 65,
    "x": 66, "y": 67, "z": 68, "\u0251": 69, "\u0250": 70, "\u0252": 71, "\u00e6": 72, "\u03b2": 75,
    "\u0254": 76, "\u0255": 77, "\u00e7": 78, "\u0256": 80, "\u00f0": 81, "\u02a4": 82, "\u0259": 83,
    "\u025a": 85, "\u025b": 86, "\u025c": 87, "\u025f": 90, "\u0261": 92, "\u0265": 99, "\u0268": 101,
    "\u026a": 102, "\u029d": 103, "\u026f": 110, "\u0270": 111, "\u014b": 112, "\u0273": 113, "\u0272": 114,
    "\u0274": 115, "\u00f8": 116, "\u0278": 118, "\u03b8": 119, "\u0153": 120, "\u0279": 123, "\u027e": 125,
    "\u027b": 126, "\u0281": 128, "\u027d": 129, "\u0282": 130, "\u0283": 131, "\u0288": 132, "\u02a7": 133,
    "\u028a": 135, "\u028b": 136, "\u028c": 138, "\u0263": 139, "\u0264": 140, "\u03c7": 142, "\u028e": 143,
    "\u0292": 147, "\u0294": 148, "\u02c8": 156, "\u02cc": 157, "\u02d0": 158, "\u02b0": 162, "\u02b2": 164,
    "\u2193": 169, "\u2192": 171, "\u2197": 172, "\u2198": 173, "\u1d7b": 177,
}

#: ``config.json`` of the tiny test model. Kokoro's decoder has fixed widths (1024/512
#: channels, a 512-wide text encoder and a 128+128 style) whatever the config says, so only
#: the ALBERT, the layer counts, the generator's resblocks and the durations shrink: about
#: 58 M parameters (232 MB in fp32, against 82 M for the real model). ``max_dur`` 4 gives
#: random durations near 2 frames (50 ms) per phoneme, a speaking rate close to real speech.
TINY_CONFIG = {
    "istftnet": {
        "upsample_kernel_sizes": [20, 12],
        "upsample_rates": [10, 6],
        "gen_istft_hop_size": 5,
        "gen_istft_n_fft": 20,
        "resblock_dilation_sizes": [[1, 3, 5]],
        "resblock_kernel_sizes": [3],
        "upsample_initial_channel": 512,
    },
    "dim_in": 64,
    "dropout": 0.2,
    "hidden_dim": 512,
    "max_conv_dim": 512,
    "max_dur": 4,
    "multispeaker": True,
    "n_layer": 1,
    "n_mels": 80,
    "n_token": 178,
    "style_dim": 128,
    "text_encoder_kernel_size": 3,
    "plbert": {
        "hidden_size": 32,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 512,
        "num_hidden_layers": 2,
        "dropout": 0.1,
    },
    "vocab": VOCAB_V1,
}
#: Voices of the tiny folder (names of real Kokoro-82M voices).
TINY_VOICES = ("af_heart", "am_adam", "af_bella")

_REQUIRED_CONFIG = ("vocab", "n_token", "hidden_dim", "style_dim", "n_layer", "max_dur", "dropout",
                    "text_encoder_kernel_size", "n_mels", "plbert", "istftnet")


# --------------------------------------------------------------------------- loading
def read_config(path: str | os.PathLike) -> dict:
    """``config.json`` of a Kokoro folder, checked for the keys ``KModel`` reads."""
    try:
        config = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read the Kokoro config {path}: {exc}") from exc
    missing = [k for k in _REQUIRED_CONFIG if k not in config]
    if missing:
        raise CheckpointError(f"Kokoro config {path} lacks {', '.join(missing)}")
    return config


def build_model(config: dict):
    """A ``kokoro.KModel`` with the architecture of ``config`` and freshly initialised weights.

    ``KModel``'s constructor always loads a state dict (downloading one from a hub when no
    file is given, and loading it non-strictly); it is handed an empty one here, and the
    weights come from :func:`load_model`'s strict load.
    """
    from kokoro import KModel

    empty = io.BytesIO()
    torch.save({}, empty)
    empty.seek(0)
    return KModel(repo_id="local", config=config, model=empty).eval()


def _identity_norm_keys(model) -> dict[str, torch.Tensor]:
    """The ``InstanceNorm1d`` affine parameters of every ``AdaIN1d`` (absent from the official
    file): model key → the value the official run uses (ones for weights, zeros for biases)."""
    from kokoro.istftnet import AdaIN1d

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, AdaIN1d) and module.norm.affine:
            out[f"{name}.norm.weight"] = torch.ones(module.norm.num_features)
            out[f"{name}.norm.bias"] = torch.zeros(module.norm.num_features)
    return out


def _convert_checkpoint(checkpoint: dict, model) -> tuple[dict[str, ConvertedTensor], list[str]]:
    """The official ``{component: state dict}`` → model key → tensor (``module.`` prefix removed)."""
    converted: dict[str, ConvertedTensor] = {}
    unexpected: list[str] = []
    for component, state in checkpoint.items():
        if component not in COMPONENTS or not isinstance(state, dict):
            unexpected.append(str(component))
            continue
        prefix = _DATA_PARALLEL_PREFIX if state and all(k.startswith(_DATA_PARALLEL_PREFIX) for k in state) else ""
        for key, tensor in state.items():
            name = f"{component}.{key[len(prefix):]}"
            converted[name] = ConvertedTensor(f"{component}/{key}", tuple(tensor.shape), tensor)
    for name, value in _identity_norm_keys(model).items():
        if name not in converted:  # trained without InstanceNorm affine: identity, as the official run
            converted[name] = ConvertedTensor(f"(identity {name})", tuple(value.shape), value)
    return converted, unexpected


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu", weights: Optional[str] = None):
    """``KModel`` from a Kokoro folder, strictly (a missing, unknown or misshapen tensor is a
    :class:`CheckpointError` naming it). fp32, as the official runs it."""
    folder = Path(folder)
    path = folder / (weights or WEIGHTS_FILE)
    config = read_config(folder / CONFIG_FILE)
    if not path.is_file():
        raise CheckpointError(f"Kokoro weights {path} not found")
    checkpoint = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: expected a dict of {', '.join(COMPONENTS)} state dicts")
    missing_components = [c for c in COMPONENTS if c not in checkpoint]
    if missing_components:
        raise CheckpointError(f"{path} lacks the Kokoro component(s) {', '.join(missing_components)}")
    # Built on the CPU (its random initialisation is then replaced): kokoro keeps some tensors
    # as plain attributes (the STFT window), which a meta-device build would leave empty.
    model = build_model(config)
    converted, unexpected = _convert_checkpoint(checkpoint, model)
    load_state_dict_strict(model, converted, torch.float32, unexpected_source_keys=unexpected)
    return model.to(device).eval()


def voice_names(folder: str | os.PathLike) -> list[str]:
    """Names of the voices in ``folder/voices`` (``af_heart`` for ``voices/af_heart.pt``), sorted."""
    return sorted(p.stem for p in (Path(folder) / VOICES_DIR).glob("*.pt") if p.is_file())


def load_voice(path: str | os.PathLike) -> torch.Tensor:
    """One voice file → ``[510, 1, 256]`` float32, checked."""
    pack = torch.load(str(path), map_location="cpu", weights_only=True)
    if not isinstance(pack, torch.Tensor) or not pack.is_floating_point():
        raise CheckpointError(f"voice {path}: expected a float tensor, got {type(pack).__name__}")
    if pack.ndim != 3 or tuple(pack.shape[1:]) != (1, STYLE_WIDTH) or pack.shape[0] < MAX_PHONEMES:
        raise CheckpointError(f"voice {path}: shape {tuple(pack.shape)}, expected ({MAX_PHONEMES}, 1, {STYLE_WIDTH})")
    return pack.float()


# --------------------------------------------------------------------------- text
class EnglishG2P:
    """American English text → Kokoro phonemes with espeak-ng.

    misaki's ``EspeakFallback`` (misaki's own mapping of espeak-ng's IPA into the phoneme set
    Kokoro's American voices were trained on) applied to whole sentences. espeak-ng comes
    from the ``espeakng-loader`` wheel (library and data inside the package). Not thread-safe:
    :class:`KokoroTTS` calls it under its lock.
    """

    def __init__(self):
        from misaki.espeak import EspeakFallback

        self._espeak = EspeakFallback(british=False)

    def __call__(self, text: str) -> str:
        from misaki.token import MToken

        phonemes, _ = self._espeak(MToken(text=text, tag="", whitespace=""))
        return (phonemes or "").strip()


def split_phonemes(phonemes: str, limit: int = MAX_PHONEMES) -> list[str]:
    """Cut a phoneme string into pieces of at most ``limit`` symbols: at the last sentence
    end before the limit, else the last ``:;``, else ``,—``, else the last space."""
    pieces, rest = [], phonemes.strip()
    while len(rest) > limit:
        window = rest[:limit]
        cut = 0
        for marks in _CUT_MARKS:
            cut = max(window.rfind(m) for m in marks) + 1
            if cut > 0:
                break
        if cut <= 0:
            cut = window.rfind(" ")
        if cut <= 0:
            cut = limit
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return [p for p in pieces if p]


# --------------------------------------------------------------------------- model
class KokoroTTS:
    """Kokoro-82M with its voices and the English G2P: text → 24 kHz speech.

    Synthesis is deterministic: Kokoro's harmonic source draws noise from torch's global
    generator, which is forked and seeded with ``seed`` around every call (the official run
    leaves it unseeded).
    """

    def __init__(self, model, voices: dict[str, torch.Tensor], g2p=None, seed: int = 0):
        self.model = model
        self.voices = voices
        self.g2p = g2p
        self.seed = seed
        self._lock = threading.Lock()  # espeak-ng and the global generator are process-wide

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, device: str | torch.device = "cpu",
                        g2p: bool = True) -> "KokoroTTS":
        """Load ``folder`` (official layout). ``g2p=False`` skips espeak-ng (phonemes only)."""
        folder = Path(folder)
        model = load_model(folder, device)
        names = voice_names(folder)
        if not names:
            raise CheckpointError(f"no voices in {folder / VOICES_DIR} (expected <name>.pt files)")
        voices = {name: load_voice(folder / VOICES_DIR / f"{name}.pt") for name in names}
        return cls(model, voices, EnglishG2P() if g2p else None)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def voice_names(self) -> list[str]:
        return sorted(self.voices)

    def phonemize(self, text: str) -> list[str]:
        """``text`` → phoneme strings of at most 510 symbols, one synthesis each: the text is
        split on line breaks (the official ``split_pattern``), each line converted with
        espeak-ng and cut at punctuation where it is too long."""
        if self.g2p is None:
            raise RuntimeError("this KokoroTTS was loaded without G2P (g2p=False)")
        pieces = []
        for line in re.split(SPLIT_PATTERN, text.strip()):
            if line.strip():
                with self._lock:
                    phonemes = self.g2p(line)
                pieces.extend(split_phonemes(phonemes))
        return pieces

    @torch.no_grad()
    def synthesize_phonemes(self, phonemes: str, voice: str, speed: float = 1.0) -> torch.Tensor:
        """One phoneme string (≤ 510 symbols) → ``[num_samples]`` float32 at 24 kHz on CPU.

        The style vector is the voice's row for the phoneme count and the model is
        ``KModel``'s forward, both through ``kokoro.KPipeline.infer`` (the official path).
        """
        from kokoro import KPipeline

        if not phonemes or len(phonemes) > MAX_PHONEMES:
            raise ValueError(f"expected 1 to {MAX_PHONEMES} phonemes, got {len(phonemes)}")
        pack = self.voices[voice].to(self.device)
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        with self._lock, torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed)
            output = KPipeline.infer(self.model, phonemes, pack, speed)
        return output.audio.float().cpu().reshape(-1)

    def synthesize(self, text: str, voice: str, speed: float = 1.0) -> np.ndarray:
        """``text`` spoken by ``voice`` → ``[num_samples]`` float32 at 24 kHz (the pieces of
        :meth:`phonemize` back to back, as the official concatenates them); empty when the
        text has nothing to speak."""
        audio = [self.synthesize_phonemes(p, voice, speed) for p in self.phonemize(text)]
        if not audio:
            return np.zeros(0, dtype=np.float32)
        return torch.cat(audio).numpy().astype(np.float32, copy=False)


# --------------------------------------------------------------------------- tiny weights
def _official_state(model) -> dict[str, dict[str, torch.Tensor]]:
    """``model``'s weights as the official file holds them (``module.`` prefixes, no
    ``AdaIN1d`` InstanceNorm affine tensors)."""
    identity = set(_identity_norm_keys(model))
    state: dict[str, dict[str, torch.Tensor]] = {c: {} for c in COMPONENTS}
    for key, tensor in model.state_dict().items():
        if key in identity:
            continue
        component, _, rest = key.partition(".")
        state[component][_DATA_PARALLEL_PREFIX + rest] = tensor.detach().clone().contiguous()
    return state


def save_tiny(folder: str | os.PathLike, seed: int = 0, voices: Sequence[str] = TINY_VOICES) -> Path:
    """Write a tiny random Kokoro folder in the official layout: ``config.json``
    (:data:`TINY_CONFIG`), ``kokoro-v1_0.pth`` (fp32) and ``voices/<name>.pt`` ``[510, 1, 256]``."""
    folder = Path(folder)
    (folder / VOICES_DIR).mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps(TINY_CONFIG, indent=2, ensure_ascii=False), encoding="utf-8")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # kokoro's own initialisation, made reproducible
        model = build_model(TINY_CONFIG)
    torch.save(_official_state(model), str(folder / WEIGHTS_FILE))
    gen = torch.Generator().manual_seed(seed + 1)
    for name in voices:
        # About the real voices' spread (std 0.15).
        pack = 0.15 * torch.randn(MAX_PHONEMES, 1, STYLE_WIDTH, generator=gen)
        torch.save(pack, str(folder / VOICES_DIR / f"{name}.pt"))
    return folder
