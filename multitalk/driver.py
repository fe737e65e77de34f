"""The generation driver: one async orchestration for in-process and served runs.

``generate(request, stages)`` prepares the inputs (decode, loudness, bucket, masks — CPU
work), starts the three encoders concurrently, then runs the diffusion chunk by chunk
(``streaming`` chains 81-frame clips, each conditioned on the last 25 frames of the one
before, until the audio ends), decodes, colour-corrects and muxes the mp4.

Stages are reached through the :class:`Stages` protocol. Its methods return *handles*:
awaitables that may be awaited more than once and may be passed, un-awaited, into other
stage calls. In-process handles are asyncio tasks (:class:`LocalStages`); served handles are
Ray Serve ``DeploymentResponse`` objects, which Serve hands from deployment to deployment
without a round trip through this process.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol

import numpy as np
import torch

from .api import GenerationRequest, GenerationResult, InputError, Progress, ProgressCallback
from .stages import VAE_SPATIAL_STRIDE, ChunkJob
from .utils.sampler import GuidanceConfig

logger = logging.getLogger(__name__)

# The official MultiTalk config's default negative prompt (overrides Wan's Chinese one).
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)
FPS = 25
SPEECH_RATE = 16000


class Cancelled(Exception):
    """Raised inside a stage when its job was cancelled."""


class Stages(Protocol):
    lip_sync: bool

    def audio_encode(self, speeches: list[np.ndarray]) -> Awaitable[torch.Tensor]: ...
    def image_encode(self, cond_pixels: Any, frames: int) -> Awaitable[Any]: ...
    def text_encode(self, prompt: str, negative_prompt: str) -> Awaitable[Any]: ...
    def diffusion_sample(self, job: ChunkJob, audio: Any, image: Any, text: Any,
                         on_step: Optional[Callable[[int, int], None]]) -> Awaitable[torch.Tensor]: ...
    def vae_decode(self, latents: Any) -> Awaitable[torch.Tensor]: ...
    # InfiniteTalk (multitalk.infinitetalk): ImageStage.encode_reference.
    def reference_encode(self, reference: Any, motion_pixels: Any, frames: int) -> Awaitable[Any]: ...


@dataclass
class Limits:
    """Request bounds (the service's configurable caps)."""

    max_audio_seconds: float = 300.0
    max_image_pixels: int = 40_000_000
    max_prompt_chars: int = 2000
    min_frames: int = 5
    max_clip_frames: int = 201
    max_steps: int = 100
    # Source videos (InfiniteTalk video-to-video), checked from the header before decoding.
    max_video_bytes: int = 1 << 30
    max_video_seconds: float = 600.0
    max_video_pixels: int = 3840 * 2160


@dataclass
class ChunkPlan:
    """Where each chunk starts in the audio timeline and how the audio is extended."""

    starts: list[int]
    audio_extend: int  # frames of time-reversed audio appended at the end (official)
    total_frames: int  # frames of the final video


def plan_chunks(audio_frames: int, frames: int, mode: str, motion: int, max_frames: int) -> ChunkPlan:
    """Official chunking (``MultiTalkPipeline.generate``'s loop), computed up front."""
    if audio_frames <= frames:
        raise InputError(
            "audio",
            f"the speech lasts {audio_frames / FPS:.2f} s ({audio_frames} frames at {FPS} fps) but a clip of "
            f"{frames} frames needs more than {frames} frames of audio: send longer audio or ask for fewer frames",
        )
    if mode == "clip":
        return ChunkPlan([0], 0, frames)
    limit = min(max_frames, audio_frames)
    starts, start, extend = [0], 0, 0
    while True:
        start += frames - motion
        end = start + frames
        starts.append(start)
        if end >= limit:
            if end >= audio_frames:
                extend = end - audio_frames + 3
            break
    generated = frames + (frames - motion) * (len(starts) - 1)
    total = min(generated, max_frames)
    if extend > 0:
        total -= extend
    return ChunkPlan(starts, extend, total)


def validate(request: GenerationRequest, limits: Limits) -> None:
    if not request.audio:
        raise InputError("audio_1", "at least one speaker's audio is required")
    if len(request.audio) > 2:
        raise InputError("audio", f"at most 2 speakers are supported, got {len(request.audio)}")
    if request.mode not in ("clip", "streaming"):
        raise InputError("mode", f"must be 'clip' or 'streaming', got {request.mode!r}")
    f = request.frames
    if not isinstance(f, int) or f % 4 != 1 or not (limits.min_frames <= f <= limits.max_clip_frames):
        raise InputError("frames", f"must be 4n+1 between {limits.min_frames} and {limits.max_clip_frames}, got {f!r}")
    if request.mode == "streaming" and not (1 <= request.motion_frames < f and request.motion_frames % 4 == 1):
        raise InputError("motion_frames", f"must be 4n+1 and below frames ({f}), got {request.motion_frames}")
    if len(request.prompt) > limits.max_prompt_chars:
        raise InputError("prompt", f"is {len(request.prompt)} characters; the limit is {limits.max_prompt_chars}")
    s = request.sampling
    if not (1 <= s.steps <= limits.max_steps):
        raise InputError("steps", f"must be between 1 and {limits.max_steps}, got {s.steps}")
    if not (0.0 <= request.color_correction <= 1.0):
        raise InputError("color_correction", f"must be in [0, 1], got {request.color_correction}")
    if request.max_frames < request.frames:
        raise InputError("max_frames", f"must be at least frames ({request.frames})")


@dataclass
class PreparedInputs:
    tracks: list[np.ndarray]
    mixed: np.ndarray
    reference: torch.Tensor  # [3, H, W] in [-1, 1]
    ref_masks: torch.Tensor  # [3, h, w]
    target_hw: tuple[int, int]
    audio_frames: int


def prepare_inputs(request: GenerationRequest, limits: Limits, image: Any = None) -> PreparedInputs:
    """Decode and check the inputs (CPU). Raises :class:`InputError` naming the bad field.

    ``image``: the reference as an RGB PIL image already decoded (InfiniteTalk: the source
    video's first frame) instead of ``request.image``."""
    from .utils.audio import combine_speakers, load_speech
    from .utils.image import bucket_size, load_image, masks_to_latent, resize_and_center_crop, speaker_masks

    validate(request, limits)
    speeches = [load_speech(a, field=f"audio_{i + 1}", max_seconds=limits.max_audio_seconds)
                for i, a in enumerate(request.audio)]
    tracks, mixed = combine_speakers(speeches, request.audio_type)
    if len(tracks) > 1 and len(mixed) / SPEECH_RATE > limits.max_audio_seconds:
        raise InputError("audio", f"both speakers together last {len(mixed) / SPEECH_RATE:.1f} s; "
                                  f"the limit is {limits.max_audio_seconds:.0f} s", status=413)
    image = load_image(request.image, max_pixels=limits.max_image_pixels) if image is None else image
    target_hw = bucket_size(image.height, image.width, request.size)
    reference = resize_and_center_crop(image, target_hw)
    masks = speaker_masks(image.height, image.width, len(tracks), request.bbox)
    lat_hw = (target_hw[0] // VAE_SPATIAL_STRIDE, target_hw[1] // VAE_SPATIAL_STRIDE)
    ref_masks = masks_to_latent(masks, target_hw, lat_hw)
    audio_frames = int(len(tracks[0]) / SPEECH_RATE * FPS)
    return PreparedInputs(tracks, mixed, reference, ref_masks, target_hw, audio_frames)


@dataclass
class _Timer:
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 4)


async def generate(
    request: GenerationRequest,
    stages: Stages,
    progress: Optional[ProgressCallback] = None,
    limits: Limits = Limits(),
) -> GenerationResult:
    """Run one job through the stages; returns the finished mp4."""
    from .utils.video import Mp4Writer, color_match

    timer = _Timer()
    emit = progress or (lambda p: None)
    started = time.perf_counter()
    emit(Progress("prepare", message="decoding inputs"))
    prep = await asyncio.to_thread(prepare_inputs, request, limits)
    timer.add("prepare", time.perf_counter() - started)
    plan = plan_chunks(prep.audio_frames, request.frames, request.mode,
                       request.motion_frames, request.frames if request.mode == "clip" else request.max_frames)
    warnings = []
    if not stages.lip_sync:
        warnings.append("no MultiTalk audio adapter found: the video is generated without lip sync")

    s = request.sampling
    shift = s.resolved_shift(request.size)
    guidance = GuidanceConfig(s.text_scale, s.audio_scale, s.use_apg, s.apg_momentum, s.apg_norm_threshold)
    negative = s.negative_prompt if s.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
    lat_hw = tuple(prep.ref_masks.shape[-2:])
    total_steps = s.steps * len(plan.starts)

    # The encoders are independent: start all three, await none of them here.
    t_enc = time.perf_counter()
    emit(Progress("encode", message="audio, image and text encoders"))
    audio = stages.audio_encode(prep.tracks)
    text = stages.text_encode(request.prompt, negative)
    image = stages.image_encode(prep.reference[:, None], request.frames)

    height, width = prep.target_hw
    speech = prep.mixed[: int(math.ceil(plan.total_frames / FPS * SPEECH_RATE))]
    # Frames stream into the encoder chunk by chunk: a long video never sits in memory whole.
    writer = Mp4Writer(height, width, plan.total_frames, speech, FPS)
    try:
        motion_pixels: Optional[torch.Tensor] = None  # last frames of the previous chunk
        for index, start in enumerate(plan.starts):
            if index > 0:
                image = stages.image_encode(motion_pixels, request.frames)
            job = ChunkJob(
                frames=request.frames, latent_hw=lat_hw, audio_start=start, ref_masks=prep.ref_masks,
                seed=s.seed + index, steps=s.steps, shift=shift, guidance=guidance,
                teacache_thresh=s.teacache_thresh, size=request.size, audio_extend=plan.audio_extend,
            )
            done_before = index * s.steps

            def on_step(step: int, total: int, _done=done_before, _chunk=index) -> None:
                emit(Progress("diffusion", step=_done + step, total_steps=total_steps,
                              chunk=_chunk + 1, total_chunks=len(plan.starts)))

            t0 = time.perf_counter()
            latents = stages.diffusion_sample(job, audio, image, text, on_step)
            # Conditioning is ready before sampling can start: book that wait as encoding.
            # Audio and text are the same for every chunk: wait for them once (a served
            # handle fetches its result on every await).
            await asyncio.gather(*([_await(audio), _await(text)] if index == 0 else []), _await(image))
            timer.add("encode", time.perf_counter() - (t_enc if index == 0 else t0))
            t0 = time.perf_counter()
            await _await(latents)
            timer.add("diffusion", time.perf_counter() - t0)
            emit(Progress("decode", chunk=index + 1, total_chunks=len(plan.starts)))
            t0 = time.perf_counter()
            pixels = await _await(stages.vae_decode(latents))
            timer.add("decode", time.perf_counter() - t0)
            if request.color_correction > 0:
                t0 = time.perf_counter()
                pixels = await asyncio.to_thread(color_match, pixels, prep.reference, request.color_correction)
                timer.add("color_correction", time.perf_counter() - t0)
            motion_pixels = pixels[:, -request.motion_frames:].contiguous()
            keep = pixels if index == 0 else pixels[:, request.motion_frames:]
            t0 = time.perf_counter()
            await asyncio.to_thread(writer.write, keep)
            timer.add("mux", time.perf_counter() - t0)
            del pixels, keep
    except BaseException:
        writer.abort()
        raise

    emit(Progress("mux", message=f"{writer.written} frames"))
    t0 = time.perf_counter()
    mp4 = await asyncio.to_thread(writer.close)
    timer.add("mux", time.perf_counter() - t0)
    timer.add("total", time.perf_counter() - started)
    return GenerationResult(mp4, writer.written, FPS, width, height, len(plan.starts), stages.lip_sync,
                            timer.timings, warnings)


async def _await(handle: Any) -> Any:
    return await handle if hasattr(handle, "__await__") else handle


# --------------------------------------------------------------------------- in-process
class LocalStages:
    """:class:`Stages` over in-process stage objects; each call runs in a worker thread."""

    def __init__(self, audio, image, text, diffusion, decode):
        self.audio, self.image, self.text, self.diffusion, self.decode = audio, image, text, diffusion, decode
        self.lip_sync = diffusion.lip_sync

    @staticmethod
    async def _resolve(*values):
        return [await _await(v) for v in values]

    def _spawn(self, fn, *args) -> "asyncio.Task":
        async def run():
            resolved = await self._resolve(*args)
            return await asyncio.to_thread(fn, *resolved)

        return asyncio.ensure_future(run())

    def audio_encode(self, speeches):
        return self._spawn(self.audio.encode, speeches)

    def image_encode(self, cond_pixels, frames):
        return self._spawn(self.image.encode, cond_pixels, frames)

    def text_encode(self, prompt, negative_prompt):
        return self._spawn(self.text.encode, prompt, negative_prompt)

    def diffusion_sample(self, job, audio, image, text, on_step=None):
        cancelled = threading.Event()

        def step(done: int, total: int) -> None:
            if cancelled.is_set():
                raise Cancelled()
            if on_step is not None:
                on_step(done, total)

        async def run():
            resolved = await self._resolve(audio, image, text)
            try:
                return await asyncio.to_thread(self.diffusion.sample, job, *resolved, step)
            except asyncio.CancelledError:
                cancelled.set()  # the worker thread stops at its next step
                raise

        return asyncio.ensure_future(run())

    def vae_decode(self, latents):
        return self._spawn(self.decode.decode, latents)

    def reference_encode(self, reference, motion_pixels, frames):
        return self._spawn(self.image.encode_reference, reference, motion_pixels, frames)
