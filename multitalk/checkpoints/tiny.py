"""Tiny random-weight checkpoint sets in the official on-disk layouts.

No machine here reaches a model hub, so tests and the demo run the whole pipeline on
these. File names, key names and formats are the real ones; only the sizes shrink
(DiT width 64, 2 layers; 2-layer encoders of width 32; VAE base width 8). The very same
loaders read the real 14B set.

``official``::

    Wan2.1-I2V-14B-480P/   config.json, diffusion_pytorch_model-0000N-of-00002.safetensors + index,
                           models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/,
                           models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth, Wan2.1_VAE.pth
    MeiGen-MultiTalk/      multitalk.safetensors, diffusion_pytorch_model.safetensors.index.json
    InfiniteTalk/          single/infinitetalk.safetensors, multi/infinitetalk.safetensors
    chinese-wav2vec2-base/ config.json, preprocessor_config.json, model.safetensors
    Kokoro-82M/            config.json, kokoro-v1_0.pth, voices/{af_heart,am_adam,af_bella}.pt
                           (text to speech; only with ``speech=True``)

``diffusers``: ``Wan2.1-I2V-14B-480P-Diffusers/`` (model_index.json, transformer/, vae/,
text_encoder/, tokenizer/, image_encoder/, image_processor/, scheduler/) plus the same
MeiGen-MultiTalk/ and chinese-wav2vec2-base/ folders. The same seed gives the same weights
in both layouts.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .discovery import CLIP_FILE, T5_FILE, T5_TOKENIZER, VAE_FILE

logger = logging.getLogger(__name__)

WAN_DIR = "Wan2.1-I2V-14B-480P"
WAN_DIFFUSERS_DIR = "Wan2.1-I2V-14B-480P-Diffusers"
MULTITALK_DIR = "MeiGen-MultiTalk"
INFINITETALK_DIR = "InfiniteTalk"
WAV2VEC_DIR = "chinese-wav2vec2-base"
KOKORO_DIR = "Kokoro-82M"


def tiny_dit_config() -> dict:
    """DiT config whose conditioning widths match the tiny encoders."""
    from ..modules import audio_encoder, image_encoder, text_encoder

    return dict(
        dim=64, ffn_dim=128, num_heads=4, num_layers=2, freq_dim=256,
        text_dim=text_encoder.TINY_CONFIG["d_model"],
        image_dim=image_encoder.TINY_CONFIG["hidden_size"],
        audio_blocks=audio_encoder.TINY_CONFIG["num_hidden_layers"],
        audio_channels=audio_encoder.TINY_CONFIG["hidden_size"],
        intermediate_dim=32, output_dim=32, context_tokens=8,
    )


_ADAPTER_KEYS = ("intermediate_dim", "output_dim", "context_tokens", "audio_blocks", "audio_channels")


def tiny_dit(seed: int = 0):
    """A tiny MultiTalk DiT with random weights (all parameters drawn, none left zero)."""
    from ..modules.transformer_multitalk import MultiTalkTransformer3DModel

    gen = torch.Generator().manual_seed(seed)
    model = MultiTalkTransformer3DModel(**tiny_dit_config())
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if p.dim() > 1 and "modulation" not in name:
                # fan-in scaling keeps activations O(1), so every branch (audio included)
                # visibly moves the output of the random model.
                p.copy_(noise / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return model.eval()


def tiny_dit_inputs(people: int, t_lat: int = 5, seed: int = 0, hw: tuple[int, int] = (8, 12)) -> dict:
    """Valid keyword inputs for :func:`tiny_dit`'s forward (tests and benches).

    ``people`` speakers, ``t_lat`` latent frames (``1 + 4 (t_lat - 1)`` video frames) of
    ``hw`` latents; person masks: up to two people the left and right parts with background
    in between; three or four people side by side in columns, a background column between
    each two.
    """
    g = torch.Generator().manual_seed(seed)
    cfg = tiny_dit_config()
    h, w = hw
    frames = 1 + 4 * (t_lat - 1)
    if people <= 2:
        masks = torch.zeros(3, h, w)
        masks[0, :, : w // 2 - 1] = 1
        masks[1, :, w // 2 + 1 :] = 1
        masks[2] = 1 - masks[0] - masks[1]
    else:
        masks = torch.zeros(people + 1, h, w)
        width = w // people
        for k in range(people):
            masks[k, :, k * width : (k + 1) * width - 1] = 1
        masks[people] = 1 - masks[:people].sum(0)
    return dict(
        x=torch.randn(16, t_lat, h, w, generator=g),
        t=torch.tensor([811.0]),
        context=torch.randn(7, cfg["text_dim"], generator=g),
        clip_fea=torch.randn(1, 257, cfg["image_dim"], generator=g),
        y=torch.randn(20, t_lat, h, w, generator=g),
        audio=torch.randn(people, frames, 5, cfg["audio_blocks"], cfg["audio_channels"], generator=g),
        ref_target_masks=masks,
    )


def make_tiny_weights(root: str | os.PathLike, layout: str = "official", seed: int = 0,
                      speech: bool = False) -> Path:
    """Write a complete tiny MultiTalk set under ``root`` and return it.

    ``speech``: also the text-to-speech folder ``Kokoro-82M/`` (:func:`save_tiny_kokoro`;
    about 230 MB, as Kokoro's decoder widths are fixed).
    """
    from ..modules import audio_encoder, image_encoder, text_encoder, vae
    from .dit import save_dit

    if layout not in ("official", "diffusers"):
        raise ValueError(f"layout must be 'official' or 'diffusers', got {layout!r}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    dit = tiny_dit(seed)
    adapter_cfg = {k: tiny_dit_config()[k] for k in _ADAPTER_KEYS}
    if layout == "official":
        wan = root / WAN_DIR
        save_dit(dit, wan, "official", root / MULTITALK_DIR, adapter_config=adapter_cfg)
        text_encoder.save_tiny_original(wan / T5_FILE, wan / T5_TOKENIZER, seed=seed)
        image_encoder.save_tiny_original(wan / CLIP_FILE, seed=seed)
        vae.save_tiny_original(str(wan / VAE_FILE), seed=seed)
    else:
        d = root / WAN_DIFFUSERS_DIR
        save_dit(dit, d / "transformer", "diffusers", root / MULTITALK_DIR, adapter_config=adapter_cfg)
        text_encoder.save_tiny_diffusers(d / "text_encoder", d / "tokenizer", seed=seed)
        image_encoder.save_tiny_diffusers(d / "image_encoder", d / "image_processor", seed=seed)
        vae.save_tiny_diffusers(str(d / "vae"), seed=seed)
        (d / "scheduler").mkdir(parents=True, exist_ok=True)
        (d / "scheduler" / "scheduler_config.json").write_text(json.dumps({
            "_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.42.0",
            "num_train_timesteps": 1000, "prediction_type": "flow_prediction", "use_flow_sigmas": True,
            "flow_shift": 7.0,
        }, indent=2))
        (d / "model_index.json").write_text(json.dumps({
            "_class_name": "WanImageToVideoPipeline", "_diffusers_version": "0.42.0",
            "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
            "image_processor": ["transformers", "CLIPImageProcessor"],
            "scheduler": ["diffusers", "UniPCMultistepScheduler"],
            "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"],
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
        }, indent=2))
    audio_encoder.save_tiny(str(root / WAV2VEC_DIR), seed=seed)
    save_tiny_infinitetalk(root / INFINITETALK_DIR, seed=seed)
    if speech:
        save_tiny_kokoro(root / KOKORO_DIR, seed=seed)
    (root / "TINY_RANDOM_WEIGHTS.txt").write_text(
        f"Random weights for tests and demos (layout {layout}, seed {seed}); they generate noise, not faces.\n"
    )
    return root


def save_tiny_infinitetalk(folder: str | os.PathLike, seed: int = 0) -> dict[str, Path]:
    """Tiny InfiniteTalk adapters for :func:`tiny_dit`'s base: ``single/`` and ``multi/``
    ``infinitetalk.safetensors`` (the MultiTalk adapter's keys, weights drawn from seeds
    ``seed + 1`` and ``seed + 2`` so the two differ from each other and from MultiTalk's),
    each with the adapter-config json the tiny sizes need."""
    from safetensors.torch import save_file

    from .dit import ADAPTER_CONFIG_FILE, is_adapter_key
    from .discovery import INFINITETALK_ADAPTERS, INFINITETALK_FILE

    adapter_cfg = {k: tiny_dit_config()[k] for k in _ADAPTER_KEYS}
    written = {}
    for offset, variant in enumerate(INFINITETALK_ADAPTERS, start=1):
        target = Path(folder) / variant
        target.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous() for k, v in tiny_dit(seed + offset).state_dict().items()
                   if is_adapter_key(k)}
        save_file(weights, str(target / INFINITETALK_FILE), metadata={"format": "pt"})
        (target / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_cfg, indent=2))
        written[variant] = target / INFINITETALK_FILE
    return written
# Bumped whenever the embedded default set gains a component, so that an older cache is
# not taken for a complete one.
# 2: with the Kokoro-82M text-to-speech folder; 3: a tiny distillation LoRA; 4: InfiniteTalk adapters
EMBEDDED_SET_VERSION = 4
EMBEDDED_LORA = "loras/distill.safetensors"  # the embedded default's ``loras: {distill: ...}``


def ensure_tiny_weights(cache_dir: str | os.PathLike | None = None, layout: str = "official") -> str:
    """The embedded default's weights, every optional component included (text to speech, a
    LoRA requests may pick, :data:`EMBEDDED_LORA`):
    generated once into ``cache_dir`` (safe if two processes race: each builds in a private
    temp folder and the first rename wins)."""
    cache_dir = Path(cache_dir or os.environ.get("MULTITALK_CACHE", Path.home() / ".cache" / "multitalk-serve"))
    target = cache_dir / f"tiny-{layout}-v{EMBEDDED_SET_VERSION}"
    if (target / "TINY_RANDOM_WEIGHTS.txt").exists():
        return str(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".tiny-{layout}-", dir=cache_dir))
    try:
        make_tiny_weights(tmp, layout, speech=True)
        save_tiny_lora(tmp / EMBEDDED_LORA)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "TINY_RANDOM_WEIGHTS.txt").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("tiny %s weights written to %s in %.1fs", layout, target, time.perf_counter() - started)
    return str(target)


def save_tiny_lora(path: str | os.PathLike, seed: int = 0, rank: int = 4) -> Path:
    """A random LoRA for :func:`tiny_dit` in the distillation LoRAs' layout: a
    ``lora_down``/``lora_up`` pair (and an ``alpha``) for every linear weight of the blocks,
    plus a ``diff_b`` and a ``diff`` key."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    lora = {}
    for name, p in tiny_dit(seed).named_parameters():
        if name.startswith("blocks.") and p.dim() == 2:
            base = "diffusion_model." + name[: -len(".weight")]
            lora[base + ".lora_down.weight"] = 0.1 * torch.randn(rank, p.shape[1], generator=gen)
            lora[base + ".lora_up.weight"] = 0.1 * torch.randn(p.shape[0], rank, generator=gen)
            lora[base + ".alpha"] = torch.tensor(float(rank))
    dim = tiny_dit_config()["dim"]
    lora["diffusion_model.blocks.0.self_attn.q.diff_b"] = 0.1 * torch.randn(dim, generator=gen)
    lora["diffusion_model.blocks.1.norm3.diff"] = 0.1 * torch.randn(dim, generator=gen)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora, str(path))
    return path


def save_tiny_kokoro(folder: str | os.PathLike, seed: int = 0) -> Path:
    """A tiny random Kokoro-82M folder (official layout; voices af_heart, am_adam, af_bella)."""
    from ..modules.speech_kokoro import save_tiny

    return save_tiny(folder, seed=seed)
