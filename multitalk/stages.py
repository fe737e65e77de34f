"""The five model stages of the pipeline, each owning one (or two) models.

Every stage loads from a models root (or a :class:`CheckpointSet`) and exposes plain
tensor-in / tensor-out methods, so the same objects run in-process
(:class:`multitalk.generation.local.LocalStages`) and inside Ray Serve deployments
(``deployments/``, one thin wrapper per stage).

==============  ====================================  ======================================
stage           models                                 call
==============  ====================================  ======================================
AudioStage      wav2vec2                               speech → features [P, F, L, C]
ImageStage      CLIP vision + VAE encoder              pixels → :class:`ImageConditioning`
TextStage       UMT5 (+ prompt-embedding cache)        prompts → :class:`TextEmbeddings`
DiffusionStage  MultiTalk DiT + flow-matching sampler  :class:`ChunkJob` → latents
DecodeStage     VAE decoder (+ colour correction)      latents → :class:`DecodedChunk` (uint8 frames)
SpeechStage     Kokoro-82M (optional, text to speech)  :class:`SpeechRequest` → 16 kHz tracks
==============  ====================================  ======================================
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from .api import InputError, SpeechRequest
from .checkpoints.discovery import CheckpointSet, MissingCheckpointError, find_checkpoints
from .precision import check_dit_dtype, resolve_dtype
from .utils.sampler import (
    COND, DROP_AUDIO, DROP_TEXT, UNCOND, Guidance, GuidanceConfig, TeaCache, flow_timesteps, sample,
)

logger = logging.getLogger(__name__)

VAE_TEMPORAL_STRIDE = 4
VAE_SPATIAL_STRIDE = 8
AUDIO_WINDOW = 5  # audio frames around each video frame (official: indices -2..2)
SPEECH_RATE = 16000  # wav2vec2's input rate


def _as_checkpoints(models: "str | CheckpointSet") -> CheckpointSet:
    if isinstance(models, CheckpointSet):
        return models
    return find_checkpoints(models).require_complete()


def _dtype(dtype: "torch.dtype | str") -> torch.dtype:
    from .precision import parse_dtype

    return parse_dtype(dtype)


# --------------------------------------------------------------------------- data types
@dataclass
class ImageConditioning:
    """What the DiT needs from the conditioning frames of one chunk.

    ``clip_features`` ``[1, 257, C]`` of the last conditioning frame; ``cond_latents``
    ``[4 + 16, N_t, h, w]`` (frame mask, then the VAE encoding of the conditioning frames
    followed by black frames); ``motion_latents`` ``[16, T_m, h, w]`` the latents of the
    motion frames (streaming chunks after the first) or ``None``.
    """

    clip_features: torch.Tensor
    cond_latents: torch.Tensor
    motion_latents: Optional[torch.Tensor] = None


@dataclass
class TextEmbeddings:
    """UMT5 embeddings, trimmed to their token counts: ``[L, C]`` and ``[L_neg, C]``."""

    context: torch.Tensor
    context_null: torch.Tensor


@dataclass
class ChunkJob:
    """One clip's worth of sampling.

    ``audio_start``: first video frame of this chunk in the audio-feature timeline.
    ``ref_masks``: ``[3, h, w]`` person/background masks at latent resolution.
    """

    frames: int
    latent_hw: tuple[int, int]
    audio_start: int
    ref_masks: torch.Tensor
    seed: int
    steps: int = 40
    shift: float = 7.0
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    teacache_thresh: float = 0.0
    size: str = "multitalk-480"
    audio_extend: int = 0  # last chunk of a stream: frames of time-reversed audio appended (official)
    # LoRAs for this job, ((name, scale), ...) sorted by name, names registered on the
    # DiffusionStage (``lora_registry``); () = the base model. See multitalk.modules.lora_runtime.
    loras: tuple = ()
    # InfiniteTalk: the motion latents are written back clean (not re-noised) at every step,
    # and ``adapter`` ("single"/"multi") picks the stage's InfiniteTalk adapter (None: as loaded).
    clean_motion: bool = False
    adapter: Optional[str] = None


@dataclass
class DecodeRequest:
    """What the chunk loop wants from one chunk's decoded frames.

    ``first``/``count``: the frames that go into the video (a chunk after the first skips the
    ``motion_frames`` it continues from; the last may be cut at the video's end);
    ``motion_frames``: the chunk's last frames, kept as float pixels to condition the next
    chunk (0: the last chunk); ``color``: the job's colour-correction target
    (:class:`multitalk.utils.color.ColorTarget`, ``None``: none).
    """

    first: int = 0
    count: Optional[int] = None
    motion_frames: int = 0
    color: Any = None


@dataclass
class DecodedChunk:
    """A chunk's frames for the video, uint8 ``[T, H, W, 3]`` RGB (colour-corrected), and its
    motion frames ``[3, M, H, W]`` float32 in [-1, 1] for the next chunk (or ``None``). Served,
    ``motion`` is a reference the next chunk's encoder call resolves: the motion frames go
    from the decoder to the image encoder without passing through the ingress."""

    frames: np.ndarray
    motion: Any = None


def audio_windows(features: torch.Tensor, start: int, frames: int, window: int = AUDIO_WINDOW) -> torch.Tensor:
    """Per-frame windows of audio features, official indexing.

    Args:
        features: ``[P, F, L, C]`` per-video-frame wav2vec2 features.
    Returns:
        ``[P, frames, window, L, C]``: for frame ``i`` the features of frames
        ``i-2 .. i+2`` (clamped to the available range).
    """
    half = window // 2
    idx = torch.arange(start, start + frames)[:, None] + torch.arange(-half, half + 1)[None]
    idx = idx.clamp(0, features.shape[1] - 1)
    return features[:, idx]


def frame_mask(frames: int, motion_frames: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """``[4, N_t, h, w]``: 1 on the conditioning frames, 0 elsewhere, packed 4 frames per latent."""
    h, w = latent_hw
    msk = torch.ones(1, frames, h, w)
    msk[:, motion_frames:] = 0
    msk = torch.cat([msk[:, 0:1].repeat_interleave(VAE_TEMPORAL_STRIDE, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // VAE_TEMPORAL_STRIDE, VAE_TEMPORAL_STRIDE, h, w)
    return msk.transpose(1, 2)[0]


# --------------------------------------------------------------------------- stages
class AudioStage:
    """wav2vec2 features at 25 fps for each speaker."""

    def __init__(self, encoder):
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, models: "str | CheckpointSet", device: str = "cpu", dtype=None) -> "AudioStage":
        """``dtype``: ``None`` = the official's (fp32, see :mod:`multitalk.precision`)."""
        from .modules.audio_encoder import AudioEncoder

        ckpt = _as_checkpoints(models)
        dt = resolve_dtype("audio", device, dtype)
        return cls(AudioEncoder.from_pretrained(ckpt.path("audio_encoder"), device=device, dtype=dt))

    @torch.no_grad()
    def encode(self, speeches: list[np.ndarray]) -> torch.Tensor:
        """Per speaker float32 16 kHz speech (equal lengths) → ``[P, F, L, C]`` float32 on CPU."""
        feats = [self.encoder.encode(s).float().cpu() for s in speeches]
        frames = min(f.shape[0] for f in feats)
        return torch.stack([f[:frames] for f in feats])


class ImageStage:
    """CLIP features and the VAE-encoded conditioning frames."""

    def __init__(self, clip, vae, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.clip, self.vae = clip, vae
        self.device, self.dtype = torch.device(device), dtype

    @classmethod
    def from_pretrained(cls, models: "str | CheckpointSet", device: str = "cpu", dtype=None,
                        vae_dtype=None) -> "ImageStage":
        """``dtype``: the CLIP's, ``vae_dtype``: the VAE encoder's; ``None`` = the official's
        (CLIP fp16 and VAE fp32 on CUDA, fp32 on CPU; :mod:`multitalk.precision`). The
        outputs are float32 either way (exact for fp16 CLIP features; the DiT casts them
        once to its own dtype, as the official does)."""
        from .modules.image_encoder import ImageEncoder

        ckpt = _as_checkpoints(models)
        dt = resolve_dtype("clip", device, dtype)
        if ckpt.layout("image_encoder") == "official":
            clip = ImageEncoder.from_original(ckpt.path("image_encoder"), device=device, dtype=dt)
        else:
            clip = ImageEncoder.from_diffusers(Path(ckpt.path("image_encoder")).parent, device=device, dtype=dt)
        vae = load_vae(ckpt, device, resolve_dtype("vae", device, vae_dtype))
        return cls(clip, vae, device, torch.float32)

    @torch.no_grad()
    def encode(self, cond_pixels: torch.Tensor, frames: int) -> ImageConditioning:
        """Conditioning for one chunk.

        Args:
            cond_pixels: ``[3, M, H, W]`` in [-1, 1]: the reference image (M = 1) or the
                previous chunk's last motion frames (M = 25).
            frames: frames of the chunk (4n+1).
        """
        c, m, h, w = cond_pixels.shape
        pixels = cond_pixels.to(self.device, torch.float32)
        clip = self.clip.encode(pixels[:, -1][None]).to(self.dtype)
        video = torch.cat([pixels, pixels.new_zeros(c, frames - m, h, w)], dim=1)
        latents = self.vae.encode(video[None])[0].to(self.dtype)  # [16, N_t, h/8, w/8]
        lat_hw = (h // VAE_SPATIAL_STRIDE, w // VAE_SPATIAL_STRIDE)
        mask = frame_mask(frames, m, lat_hw).to(latents)
        motion = None
        if m > 1:
            motion = latents[:, : 1 + (m - 1) // VAE_TEMPORAL_STRIDE].float().cpu()
        return ImageConditioning(clip.cpu(), torch.cat([mask, latents], dim=0).cpu(), motion)

    @torch.no_grad()
    def encode_reference(self, reference: torch.Tensor, motion_pixels: torch.Tensor, frames: int) -> ImageConditioning:
        """InfiniteTalk conditioning for one chunk.

        Args:
            reference: ``[3, 1, H, W]`` (or ``[3, H, W]``) in [-1, 1]: the chunk's reference
                frame (the source video's frame at the chunk's audio start, or the image).
            motion_pixels: ``[3, M, H, W]`` in [-1, 1]: the previous chunk's last M frames
                (M = 4n+1), or the reference itself for the first chunk (M = 1).
            frames: frames of the chunk (4n+1).
        Returns:
            CLIP of the reference; ``cond_latents`` = first-frame-only mask + VAE of the
            reference followed by black frames; ``motion_latents`` ``[16, 1 + (M-1)/4, h, w]``
            the VAE encoding of ``motion_pixels`` alone.
        """
        if reference.dim() == 3:
            reference = reference[:, None]
        c, _, h, w = reference.shape
        pixels = reference[:, :1].to(self.device, torch.float32)
        clip = self.clip.encode(pixels[:, -1][None]).to(self.dtype)
        video = torch.cat([pixels, pixels.new_zeros(c, frames - 1, h, w)], dim=1)
        latents = self.vae.encode(video[None])[0].to(self.dtype)
        mask = frame_mask(frames, 1, (h // VAE_SPATIAL_STRIDE, w // VAE_SPATIAL_STRIDE)).to(latents)
        motion = self.vae.encode(motion_pixels.to(self.device, torch.float32)[None])[0].float().cpu()
        return ImageConditioning(clip.cpu(), torch.cat([mask, latents], dim=0).cpu(), motion)


class TextStage:
    """UMT5 prompt embeddings with an in-memory cache (the negative prompt is the same for every job)."""

    def __init__(self, encoder):
        self.encoder = encoder

    @classmethod
    def from_pretrained(cls, models: "str | CheckpointSet", device: str = "cpu", dtype=None) -> "TextStage":
        """``dtype``: ``None`` = the official's (bf16 on CUDA, fp32 on CPU; :mod:`multitalk.precision`)."""
        from .modules.text_encoder import TextEncoder

        ckpt = _as_checkpoints(models)
        dt = resolve_dtype("text", device, dtype)
        if ckpt.layout("text_encoder") == "official":
            enc = TextEncoder.from_original(ckpt.path("text_encoder"), ckpt.path("tokenizer"), device=device, dtype=dt)
        else:
            enc = TextEncoder.from_pretrained(ckpt.path("text_encoder"), ckpt.path("tokenizer"), device=device, dtype=dt)
        return cls(enc)

    @torch.no_grad()
    def encode(self, prompt: str, negative_prompt: str) -> TextEmbeddings:
        return TextEmbeddings(
            self.encoder.encode_cached(prompt).cpu(), self.encoder.encode_cached(negative_prompt).cpu()
        )


def _compile_kwargs(compile: "bool | dict | None") -> Optional[dict]:
    """``torch.compile`` keyword arguments for the DiT block, or ``None`` for eager."""
    if not compile:
        return None
    kwargs = {"fullgraph": True}  # a graph break inside the block would cost a kernel launch gap per block
    if isinstance(compile, dict):
        kwargs.update(compile)
    elif compile is not True:
        raise ValueError(f"compile must be true/false or torch.compile arguments, got {compile!r}")
    return kwargs


class DiffusionStage:
    """The MultiTalk DiT and the sampler."""

    def __init__(self, model, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 batch_guidance: "bool | int" = False):
        self.model = model
        self.device, self.dtype = torch.device(device), dtype
        # Run a step's guidance passes as one batch (faster on GPUs, ~3x activation memory);
        # a number: only for chunks of at most that many tokens (:meth:`_many_passes`).
        self.batch_guidance = batch_guidance
        self._lock = threading.Lock()  # one sampling at a time per model copy
        # The DiT call of :meth:`denoiser`: ``None`` = ``self.model``; a sequence-parallel rank
        # sets a callable with ``model.forward``'s signature, e.g.
        # ``functools.partial(multitalk.distributed.sp_forward, model)`` (batched guidance is off then).
        self.forward_fn: Optional[Callable[..., torch.Tensor]] = None
        # A rank of a guidance-parallel group (``multitalk.distributed.GuidanceParallel``):
        # it computes its share of each step's guidance passes and receives the others.
        self.guidance_parallel = None
        # Named LoRAs a job may pick (``ChunkJob.loras``); None: the base model only.
        self.lora_runtime = None
        self.compiled = False  # hooks added after torch.compile would be ignored by dynamo
        # InfiniteTalk: the adapters this DiT holds (``multitalk.checkpoints.infinitetalk.AdapterBank``).
        self.adapters = None

    @classmethod
    def from_pretrained(cls, models: "str | CheckpointSet", device: str = "cpu", dtype=None,
                        attention_backend: Optional[str] = None, batch_guidance: "bool | int" = False,
                        low_vram: "bool | str" = False, quantize: Optional[str] = None,
                        compile: "bool | dict" = False, loras: Sequence = (),
                        allow_fp32: bool = False, lora_registry: Optional[dict] = None,
                        lora_scale_range: tuple[float, float] = (0.0, 2.0),
                        max_loras_per_job: int = 4, model: str = "multitalk",
                        adapters: Optional[Sequence[str]] = None,
                        allow_no_lip_sync: bool = False) -> "DiffusionStage":
        """``dtype``: ``None`` = the official's (bf16 on CUDA, fp32 on CPU); float32 for the
        14B DiT on a GPU is refused (:class:`multitalk.precision.PrecisionError`) unless
        ``allow_fp32`` (:mod:`multitalk.precision`).
        ``low_vram``: keep the DiT blocks in CPU memory and stream them to ``device`` one by
        one (official ``--num_persistent_param_in_dit 0``); slower, fits 24 GB cards.
        ``"prefetch"``: copy the next block on a side stream while one computes.
        ``quantize``: ``"int8"`` or ``"fp8"`` weight-only DiT blocks (torchao), quantised on
        the CPU before the weights move to ``device``.
        ``compile``: regional ``torch.compile`` of the transformer block (one graph shared by
        all blocks, no recompiles across steps or chunks); ``True`` or ``torch.compile``
        keyword arguments, e.g. ``{"mode": "max-autotune-no-cudagraphs"}``. The first step
        of the first job pays the compile time.
        ``loras``: LoRA files merged into the DiT weights (official ``--lora_dir`` /
        ``--lora_scale``), each a path or ``{"path": ..., "scale": 1.0}``; relative paths are
        under the models root. Distillation LoRAs want ``steps`` 4-8 and ``text_scale`` 1.
        ``lora_registry``: ``{name: path}`` (or ``{name: {"path": ...}}``, relative to the
        models root) of LoRAs a job may choose per request (``ChunkJob.loras``), applied
        unmerged on top of the base without reloading it (:mod:`multitalk.modules.lora_runtime`);
        read and checked against the DiT here. ``lora_scale_range`` / ``max_loras_per_job``
        bound what a job may ask for.
        ``model``: ``"multitalk"`` or ``"infinitetalk"`` (the InfiniteTalk adapters on the same
        base; ``adapters`` picks ``single``/``multi``, default every one found; see
        :mod:`multitalk.checkpoints.infinitetalk`).
        ``allow_no_lip_sync``: load a set without the MultiTalk adapter as plain WAN 2.1 I2V
        (results say ``lip_sync: false``); without it such a set is refused
        (:class:`~multitalk.checkpoints.discovery.MissingCheckpointError` naming the option),
        so that a path typo does not serve mute faces."""
        if model == "infinitetalk":
            return cls._from_pretrained_infinitetalk(
                models, adapters, device=device, dtype=dtype, attention_backend=attention_backend,
                batch_guidance=batch_guidance, low_vram=low_vram, quantize=quantize, compile=compile, loras=loras,
                allow_fp32=allow_fp32, lora_registry=lora_registry, lora_scale_range=lora_scale_range,
                max_loras_per_job=max_loras_per_job)
        if model != "multitalk":
            raise ValueError(f"model must be 'multitalk' or 'infinitetalk', got {model!r}")
        compile_kwargs = _compile_kwargs(compile)
        if compile_kwargs is not None and low_vram:
            raise ValueError("compile and low_vram cannot be combined: the block streamer swaps weights "
                             "in hooks around each block, which the compiled block would not see")
        ckpt = _as_checkpoints(models)
        dt = resolve_dtype("dit", device, dtype)
        model = _load_dit_with_levers(ckpt, device, dt, allow_fp32, loras, quantize, low_vram, allow_no_lip_sync)
        runtime = None
        if lora_registry:  # after quantisation and streaming (the hooks sit beside both), before compile
            from .modules.lora_runtime import LoraRuntime, resolve_registry

            runtime = LoraRuntime(model, device, dt, lora_scale_range, max_loras_per_job)
            for name, path in resolve_registry(lora_registry, ckpt.root).items():
                runtime.register(name, path)
        if attention_backend:
            model.set_attention_backend(attention_backend)
        if compile_kwargs is not None:
            model.compile_repeated_blocks(**compile_kwargs)
        stage = cls(model, device, dt, batch_guidance=batch_guidance)
        stage.lora_runtime, stage.compiled = runtime, compile_kwargs is not None
        return stage

    # ------------------------------------------------------------------ per-request LoRAs
    def register_lora(self, name: str, path) -> dict:
        """Add a named LoRA a job may choose (read and checked against the DiT now)."""
        if self.lora_runtime is None:
            if self.compiled:
                raise RuntimeError("per-request LoRAs must be registered before torch.compile: pass "
                                   "lora_registry to DiffusionStage.from_pretrained")
            from .modules.lora_runtime import LoraRuntime

            self.lora_runtime = LoraRuntime(self.model, self.device, self.dtype)
        return self.lora_runtime.register(name, path).describe()

    def set_lora_registry(self, registry: dict, root) -> dict[str, list[str]]:
        """Make the LoRAs a job may pick exactly ``registry`` (``{name: path}``, relative to
        ``root``): new names are read and checked now, dropped ones forgotten, a name whose
        file changed is read again. Returns ``{"added": [...], "removed": [...]}``."""
        from .modules.lora_runtime import resolve_registry

        wanted = {name: str(path.resolve()) for name, path in resolve_registry(registry, root).items()}
        held = {} if self.lora_runtime is None else {
            n: str(Path(e.file.path).resolve()) for n, e in self.lora_runtime.loras.items()}
        removed = sorted(n for n in held if wanted.get(n) != held[n])
        added = sorted(n for n in wanted if held.get(n) != wanted[n])
        for name in removed:
            self.lora_runtime.unregister(name)
        for name in added:
            self.register_lora(name, wanted[name])
        return {"added": added, "removed": removed}

    @property
    def lora_names(self) -> list[str]:
        return [] if self.lora_runtime is None else self.lora_runtime.names

    def check_loras(self, spec) -> tuple:
        """A job's LoRA spec → the canonical set this stage will apply; raises
        :class:`multitalk.api.InputError` (field ``loras``) naming an unknown name or a bad scale."""
        from .modules.lora_runtime import normalize_lora_set

        if self.lora_runtime is None:
            return normalize_lora_set(spec, known=())
        return self.lora_runtime.normalize(spec)

    def describe_loras(self, spec) -> list[dict]:
        """The LoRAs a spec selects here: name, scale, file path, sha256, rank."""
        lora_set = self.check_loras(spec)
        return self.lora_runtime.describe(lora_set) if lora_set else []

    def _apply_loras(self, job: ChunkJob) -> None:
        lora_set = self.check_loras(job.loras)
        if self.lora_runtime is not None:
            self.lora_runtime.activate(lora_set)

    @classmethod
    def _from_pretrained_infinitetalk(cls, models: "str | CheckpointSet", adapters: Optional[Sequence[str]],
                                      **options) -> "DiffusionStage":
        """The base with the first InfiniteTalk adapter, loaded as MultiTalk is, then the others."""
        from .checkpoints.infinitetalk import AdapterBank, infinitetalk_adapter_files, with_adapter

        ckpt = _as_checkpoints(models)
        files = infinitetalk_adapter_files(ckpt, adapters)
        first, *others = files
        stage = cls.from_pretrained(with_adapter(ckpt, files[first]), **options)
        stage.adapters = AdapterBank.attach(
            stage.model, first, {name: files[name] for name in others}, options.get("device", "cpu"),
            _dtype(options.get("dtype", "float32")), loras=options.get("loras", ()), models_root=ckpt.root,
            quantize=options.get("quantize"), low_vram=options.get("low_vram", False))
        return stage

    @property
    def lip_sync(self) -> bool:
        return self.model.has_audio

    def denoiser(self, job: ChunkJob, audio: torch.Tensor, image: ImageConditioning, text: TextEmbeddings,
                 teacache: Optional[TeaCache] = None) -> Callable[[torch.Tensor, torch.Tensor, str], torch.Tensor]:
        """``(latent, t, branch) -> velocity`` with the branch's conditioning bound."""
        dev, dt = self.device, self.dtype
        if job.audio_extend > 0:
            audio = torch.cat([audio, audio[:, -job.audio_extend:].flip(1)], dim=1)
        windows = audio_windows(audio, job.audio_start, job.frames).to(dev, dt)
        no_audio = torch.zeros_like(windows)[-1:]
        context, context_null = text.context.to(dev, dt), text.context_null.to(dev, dt)
        clip = image.clip_features.to(dev, dt)
        y = image.cond_latents.to(dev, dt)
        masks = job.ref_masks.to(dev)
        branch_inputs = {
            COND: (context, windows),
            DROP_TEXT: (context_null, windows),
            UNCOND: (context_null, no_audio),
            DROP_AUDIO: (context, no_audio),
        }

        forward = self.forward_fn if self.forward_fn is not None else self.model

        def denoise(latent: torch.Tensor, t: torch.Tensor, branch: str) -> torch.Tensor:
            ctx, aud = branch_inputs[branch]
            return forward(latent.to(dev), t.to(dev), ctx, clip, y, aud, masks, teacache=teacache, branch=branch)

        def batched(latent: torch.Tensor, t: torch.Tensor, branches: tuple) -> dict:
            outs = self.model.forward_branches(
                latent.to(dev), t.to(dev), [branch_inputs[b][0] for b in branches], clip, y,
                [branch_inputs[b][1] for b in branches], masks,
            )
            return dict(zip(branches, outs))

        def over_ranks(latent: torch.Tensor, t: torch.Tensor, branches: tuple) -> dict:
            like = torch.empty(latent.shape, dtype=torch.float32, device=dev)
            return self.guidance_parallel.run(branches, lambda b: denoise(latent, t, b), like)

        denoise.many = batched if self.guidance_parallel is None else over_ranks  # type: ignore[attr-defined]
        return denoise

    def _many_passes(self, teacache: Optional[TeaCache], job: Optional[ChunkJob] = None) -> bool:
        """Whether a step's guidance passes go through ``denoise.many``: always with guidance
        parallelism; batched guidance only on one process without TeaCache (which decides
        per pass), and only for chunks of at most ``batch_guidance`` tokens when that is a
        number (the batch holds ~3x the activations: at 14B, 480p fits an 80 GB card
        batched, 720p does not; ``multitalk check --plan``)."""
        if self.guidance_parallel is not None:
            return True
        if not self.batch_guidance or teacache is not None or self.forward_fn is not None:
            return False
        if self.batch_guidance is True or job is None:
            return True
        h, w = job.latent_hw
        tokens = (1 + (job.frames - 1) // VAE_TEMPORAL_STRIDE) * (h // 2) * (w // 2)
        return tokens <= int(self.batch_guidance)

    @torch.no_grad()
    def sample(self, job: ChunkJob, audio: torch.Tensor, image: ImageConditioning, text: TextEmbeddings,
               on_step: Optional[Callable[[int, int], None]] = None) -> torch.Tensor:
        """Sample one chunk → latents ``[16, N_t, h, w]`` float32 on CPU."""
        h, w = job.latent_hw
        n_t = 1 + (job.frames - 1) // VAE_TEMPORAL_STRIDE
        generator = torch.Generator().manual_seed(job.seed)
        noise = torch.randn(16, n_t, h, w, generator=generator, dtype=torch.float32)
        guidance_cfg = job.guidance
        if not self.model.has_audio:
            guidance_cfg = GuidanceConfig(**{**guidance_cfg.__dict__, "audio_scale": 0.0})
        guidance = Guidance(guidance_cfg, has_audio=self.model.has_audio)
        teacache = TeaCache(job.teacache_thresh, job.steps, job.size) if job.teacache_thresh > 0 else None
        denoise = self.denoiser(job, audio, image, text, teacache)
        timesteps = flow_timesteps(job.steps, job.shift)
        self.check_loras(job.loras)  # an unknown name or bad scale fails before the lock
        with self._lock:
            self._apply_loras(job)
            if self.adapters is not None:
                self.adapters.select(job.adapter)
            latent = sample(denoise, noise.to(self.device), timesteps, guidance,
                            motion_noised=not job.clean_motion,
                            motion_latents=None if image.motion_latents is None else image.motion_latents.to(self.device),
                            generator=generator, on_step=on_step, teacache=teacache,
                            denoise_many=denoise.many if self._many_passes(teacache, job) else None)
        if teacache is not None:
            logger.info("TeaCache: %d block passes computed, %d skipped", teacache.computed, teacache.skipped)
        return latent.float().cpu()


class DecodeStage:
    """VAE decoder: latents → pixels."""

    def __init__(self, vae, tiled: bool = False):
        self.vae = vae
        self.tiled = tiled

    @classmethod
    def from_pretrained(cls, models: "str | CheckpointSet", device: str = "cpu", dtype=None,
                        tiled: bool = False) -> "DecodeStage":
        """``dtype``: the VAE's; ``None`` = the official's (fp32; :mod:`multitalk.precision`)."""
        return cls(load_vae(_as_checkpoints(models), device, resolve_dtype("vae", device, dtype)), tiled)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[16, N_t, h, w]`` → ``[3, 1 + 4(N_t-1), 8h, 8w]`` float32 in [-1, 1] on CPU."""
        return self.pixels(latents).cpu()

    @torch.no_grad()
    def pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """``[16, N_t, h, w]`` → ``[3, 1 + 4(N_t-1), 8h, 8w]`` float32 in [-1, 1] on the VAE's device."""
        return self.vae.decode(latents[None].float(), tiled=self.tiled)[0].float()

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor, request: DecodeRequest) -> DecodedChunk:
        """One chunk of the chunk loop: decode, colour-correct (on this stage's device) and
        hand back the frames the video needs as uint8 and the motion frames the next chunk
        needs as float (see :class:`DecodeRequest`)."""
        from .utils.video import frames_to_uint8

        pixels = self.postprocess(self.pixels(latents), request)
        motion = pixels[:, pixels.shape[1] - request.motion_frames:].cpu().clone() if request.motion_frames else None
        stop = None if request.count is None else request.first + request.count
        frames = frames_to_uint8(pixels[:, request.first:stop])
        return DecodedChunk(frames, motion)

    def postprocess(self, pixels: torch.Tensor, request: DecodeRequest) -> torch.Tensor:
        """Decoded float pixels → the float pixels of the video (colour correction)."""
        from .utils.color import color_match

        return color_match(pixels, request.color)


class SpeechStage:
    """Kokoro-82M text to speech: per-speaker speech at 16 kHz (synthesised at 24 kHz).

    Runs in fp32 whatever ``dtype`` says, as the official does (Kokoro's STFT and LSTMs
    have no bf16 path worth having for an 82 M model).
    """

    def __init__(self, tts):
        self.tts = tts

    @classmethod
    def from_pretrained(cls, models: "str | CheckpointSet", device: str = "cpu", dtype="float32") -> "SpeechStage":
        from .modules.speech_kokoro import KokoroTTS

        # Only the Kokoro folder is needed (a Speech replica may run where the DiT is not).
        ckpt = models if isinstance(models, CheckpointSet) else find_checkpoints(models)
        if "speech" not in ckpt.components:
            raise MissingCheckpointError(f"speech not looked for under {ckpt.root}")
        return cls(KokoroTTS.from_pretrained(ckpt.path("speech"), device=device))

    @property
    def voices(self) -> list[str]:
        return self.tts.voice_names

    def synthesize(self, speech: SpeechRequest) -> list[np.ndarray]:
        """Per speaker float32 16 kHz speech.

        With a ``script``: one track per voice, all of the same length, in the official turn
        layout (each turn on its speaker's track, silence of the same length on the other,
        laid out at 24 kHz and each track then resampled). With ``texts``: each speaker's
        speech alone (the driver lays them out by the job's ``audio_type``).
        Raises :class:`InputError` for an unknown voice (listing the available ones), a
        malformed script, or a text that yields no speech.
        """
        from .modules.speech_kokoro import SAMPLE_RATE as KOKORO_RATE
        from .utils.dialogue import lay_out_turns, parse_script

        for i, voice in enumerate(speech.voices, start=1):
            if voice not in self.tts.voices:
                raise InputError(f"voice_{i}", f"unknown voice {voice!r}; available: {', '.join(self.voices)}")
        if speech.script is not None:
            turns = parse_script(speech.script)
            for turn in turns:
                if turn.speaker > len(speech.voices):
                    raise InputError(f"voice_{turn.speaker}", f"the script has (s{turn.speaker}) turns but no "
                                                              f"voice is given for speaker {turn.speaker}")
            spoken = [(t.speaker, self._speak(t.text, speech.voices[t.speaker - 1], speech.speed, "script"))
                      for t in turns]
            tracks = lay_out_turns(spoken, len(speech.voices))
        else:
            tracks = [self._speak(text, voice, speech.speed, f"text_{i}")
                      for i, (text, voice) in enumerate(zip(speech.texts or [], speech.voices), start=1)]
        return [_resample(t, KOKORO_RATE, SPEECH_RATE) for t in tracks]

    def _speak(self, text: str, voice: str, speed: float, field_name: str) -> np.ndarray:
        audio = self.tts.synthesize(text, voice, speed)
        if audio.shape[0] == 0:
            raise InputError(field_name, f"{text[:40]!r} gives nothing to speak")
        return audio


def _resample(speech: np.ndarray, rate: int, target: int) -> np.ndarray:
    """librosa's ``soxr_hq``, the resampler the official ``librosa.load(sr=16000)`` uses."""
    import librosa

    return np.ascontiguousarray(librosa.resample(speech, orig_sr=rate, target_sr=target, res_type="soxr_hq"),
                                dtype=np.float32)


# --------------------------------------------------------------------------- helpers
def _load_dit_with_levers(ckpt: CheckpointSet, device: str, dtype: torch.dtype, allow_fp32: bool, loras: Sequence,
                          quantize: Optional[str], low_vram: "bool | str", allow_no_lip_sync: bool = False):
    """The DiT with the MultiTalk adapter (without it only if ``allow_no_lip_sync``) in
    ``dtype``, its load-time LoRAs merged, then quantised and/or streamed from host memory,
    in that order."""
    from .checkpoints.dit import dit_parameter_count, load_dit

    adapter = ckpt.components["audio_adapter"].path if ckpt.components["audio_adapter"].found else None
    if adapter is None:
        if not allow_no_lip_sync:
            raise MissingCheckpointError(
                f"no MultiTalk adapter (MeiGen-MultiTalk/multitalk.safetensors) under {ckpt.root}: the DiT would "
                "make video without lip sync. Add the adapter, or set allow_no_lip_sync: true to serve plain "
                "WAN 2.1 I2V on purpose (results then say lip_sync: false)")
        logger.warning("no MultiTalk adapter under %s: the DiT runs without lip sync (allow_no_lip_sync)", ckpt.root)
    check_dit_dtype(dtype, device, dit_parameter_count(ckpt.path("dit"), ckpt.layout("dit"), adapter), allow_fp32)
    on_cpu_first = low_vram or quantize is not None
    model = load_dit(ckpt.path("dit"), ckpt.layout("dit"), adapter, device="cpu" if on_cpu_first else device,
                     dtype=dtype)
    for lora in loras:  # merged before quantisation, streaming and compilation
        from .checkpoints.lora import merge_lora

        spec = {"path": lora} if isinstance(lora, (str, Path)) else dict(lora)
        lora_path = Path(spec["path"]).expanduser()
        merge_lora(model, lora_path if lora_path.is_absolute() else Path(ckpt.root) / lora_path,
                   float(spec.get("scale", 1.0)))
    if quantize is not None:
        from .modules.quantize import quantize_dit_blocks

        quantize_dit_blocks(model, quantize)
        if not low_vram:
            model.to(device)
    if low_vram:
        from .modules.offload import BlockStreamer

        if low_vram not in (True, "prefetch"):
            raise ValueError(f"low_vram must be true, false or 'prefetch', got {low_vram!r}")
        model._block_streamer = BlockStreamer(model, device, prefetch=low_vram == "prefetch")
    return model


def load_vae(ckpt: CheckpointSet, device: str, dtype: torch.dtype = torch.float32):
    """The VAE, in fp32 by default like the official (its convolutions are sensitive to bf16)."""
    from .modules.vae import WanVAE

    if ckpt.layout("vae") == "official":
        return WanVAE.from_original(ckpt.path("vae"), device=device, dtype=dtype)
    return WanVAE.from_pretrained(ckpt.path("vae"), device=device, dtype=dtype)
