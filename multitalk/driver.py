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
import io
import logging
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Optional, Protocol

import numpy as np
import torch

from .api import (
    MAX_SPEAKERS, GenerationRequest, GenerationResult, InputError, Limits, Progress, ProgressCallback, SamplingOptions,
    SpeechRequest,
)
from .modules.lora_runtime import normalize_lora_set
from .stages import VAE_SPATIAL_STRIDE, ChunkJob
from .utils.sampler import GuidanceConfig
from .utils.step_stream import StepStream

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


class Stages(Protocol):
    """What :func:`generate` needs from the model stages, in-process or served.

    Each encode/sample/decode method returns a *handle*: an awaitable that may be awaited
    more than once and may be passed, un-awaited, into later stage calls.
    """

    @property
    def lip_sync(self) -> bool:
        """Whether the DiT has the audio adapter (read after :meth:`prepare`)."""
        ...

    def for_job(self, job_id: Optional[str] = None, retries: Any = None) -> "Stages":
        """A view for one job: its calls are tracked (and tagged with ``job_id``) so that
        :meth:`cancel` stops exactly them. ``retries``: the job's retry budget, spent by
        stages that re-send failed calls (the served ones, ``deployments/retry.py``)."""
        ...

    async def prepare(self) -> None:
        """Fetch what the driver reads synchronously (:attr:`lip_sync`); cheap after the first call."""
        ...

    def cancel(self) -> None:
        """Stop every call this view started that is still running (best effort)."""
        ...

    def audio_encode(self, speeches: list[np.ndarray]) -> Awaitable[torch.Tensor]: ...
    def image_encode(self, cond_pixels: Any, frames: int) -> Awaitable[Any]: ...
    def text_encode(self, prompt: str, negative_prompt: str) -> Awaitable[Any]: ...
    def diffusion_sample(self, job: ChunkJob, audio: Any, image: Any, text: Any,
                         on_step: Optional[Callable[[int, int], None]]) -> Awaitable[torch.Tensor]: ...
    def vae_decode(self, latents: Any) -> Awaitable[torch.Tensor]: ...
    def speech_synthesize(self, speech: SpeechRequest) -> Awaitable[list[np.ndarray]]: ...
    # InfiniteTalk (multitalk.infinitetalk): ImageStage.encode_reference.
    def reference_encode(self, reference: Any, motion_pixels: Any, frames: int) -> Awaitable[Any]: ...


DEFAULT_FRAMES = 81  # the official clip length (3.24 s at 25 fps), what the model was trained on


def fit_frames(request: GenerationRequest, audio_frames: int, limits: Limits) -> int:
    """Frames per clip: the request's; left out, the official 81, except that a clip is
    shortened to the longest 4n+1 clip the speech allows (the official CLI refuses speech
    shorter than its clip; a service should make the clip fit). Fitted clips shorter than
    ``limits.min_fit_frames`` are refused, naming the audio."""
    if request.frames is not None:
        return request.frames
    if request.mode != "clip":
        return DEFAULT_FRAMES
    longest = (audio_frames - 2) // 4 * 4 + 1  # the largest 4n+1 below the audio's frame count
    frames = min(DEFAULT_FRAMES, longest)
    if frames < max(limits.min_fit_frames, limits.min_frames):
        raise InputError("audio", f"the speech lasts {audio_frames / FPS:.2f} s ({audio_frames} frames at {FPS} fps): "
                                  f"too short for a clip of at least {max(limits.min_fit_frames, limits.min_frames)} "
                                  f"frames; send longer audio")
    return frames


def precheck(request: GenerationRequest, limits: Limits) -> None:
    """Everything about a job's media that can be checked before it runs (a service calls
    this at submit): the image, the speech and the clip length. A text-to-speech job has
    only its options and image to check; its speech exists after synthesis."""
    from .utils.image import load_image

    if request.video is not None or request.scene_cuts:
        raise InputError("condition_video" if request.video is not None else "scene_cuts",
                         "video-to-video needs the InfiniteTalk model; this one runs MultiTalk")
    if request.speech is not None:
        validate_speech(request, limits)
        load_image(request.image, max_pixels=limits.max_image_pixels)
        return
    plan_request(request, prepare_inputs(request, limits).audio_frames, limits)


def plan_request(request: GenerationRequest, audio_frames: int, limits: Limits) -> tuple[GenerationRequest, "ChunkPlan"]:
    """The request with its clip length settled (:func:`fit_frames`) and its chunk plan."""
    request = request.replace(frames=fit_frames(request, audio_frames, limits))
    plan = plan_chunks(audio_frames, request.frames, request.mode, request.motion_frames,
                       request.frames if request.mode == "clip" else request.max_frames)
    return request, plan


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


def validate_sampling(s: SamplingOptions, max_steps: Optional[int] = None) -> None:
    """Sampler settings that can be run (``max_steps``: the configured cap, if any)."""
    if s.steps < 1 or (max_steps is not None and s.steps > max_steps):
        bound = f"between 1 and {max_steps}" if max_steps is not None else "at least 1"
        raise InputError("sampling.steps", f"must be {bound}, got {s.steps}")
    if s.shift is not None and not s.shift > 0:
        raise InputError("sampling.shift", f"must be > 0, got {s.shift}")
    for name in ("text_scale", "audio_scale", "teacache_thresh"):
        if not getattr(s, name) >= 0:
            raise InputError(f"sampling.{name}", f"must be >= 0, got {getattr(s, name)}")


def validate(request: GenerationRequest, limits: Limits) -> None:
    if not request.audio:
        raise InputError("audio_1", "at least one speaker's audio is required")
    if len(request.audio) > MAX_SPEAKERS:
        raise InputError("audio", f"at most {MAX_SPEAKERS} speakers are supported, got {len(request.audio)}")
    if request.mode not in ("clip", "streaming"):
        raise InputError("mode", f"must be 'clip' or 'streaming', got {request.mode!r}")
    f = request.frames
    if f is not None and (not isinstance(f, int) or f % 4 != 1
                          or not (limits.min_frames <= f <= limits.max_clip_frames)):
        raise InputError("frames", f"must be 4n+1 between {limits.min_frames} and {limits.max_clip_frames}, got {f!r}")
    f = DEFAULT_FRAMES if f is None else f
    if request.mode == "streaming" and not (1 <= request.motion_frames < f and request.motion_frames % 4 == 1):
        raise InputError("motion_frames", f"must be 4n+1 and below frames ({f}), got {request.motion_frames}")
    if len(request.prompt) > limits.max_prompt_chars:
        raise InputError("prompt", f"is {len(request.prompt)} characters; the limit is {limits.max_prompt_chars}")
    validate_sampling(request.sampling, limits.max_steps)
    if not (0.0 <= request.color_correction <= 1.0):
        raise InputError("color_correction", f"must be in [0, 1], got {request.color_correction}")
    if request.max_frames < f:
        raise InputError("max_frames", f"must be at least frames ({f})")


@dataclass
class PreparedInputs:
    tracks: list[np.ndarray]
    mixed: np.ndarray
    reference: torch.Tensor  # [3, H, W] in [-1, 1]
    ref_masks: torch.Tensor  # [speakers + 1, h, w] (one speaker: [3, h, w] of ones)
    target_hw: tuple[int, int]
    audio_frames: int
    boxes: Optional[list] = None  # the speaker boxes used (source pixels) and their source
    boxes_source: Optional[str] = None


def prepare_inputs(request: GenerationRequest, limits: Limits, image: Any = None) -> PreparedInputs:
    """Decode and check the inputs (CPU). Raises :class:`InputError` naming the bad field.

    ``image``: the reference as an RGB PIL image already decoded (InfiniteTalk: the source
    video's first frame) instead of ``request.image``."""
    from .utils.audio import combine_speakers, load_speech
    from .utils.faces import choose_speaker_boxes
    from .utils.image import bucket_size, load_image, masks_to_latent, resize_and_center_crop, speaker_masks

    validate(request, limits)
    speeches = [load_speech(a, field=f"audio_{i + 1}", max_seconds=limits.max_audio_seconds)
                for i, a in enumerate(request.audio)]
    tracks, mixed = combine_speakers(speeches, request.audio_type)
    if len(tracks) > 1 and len(mixed) / SPEECH_RATE > limits.max_audio_seconds:
        raise InputError("audio", f"the speakers together last {len(mixed) / SPEECH_RATE:.1f} s; "
                                  f"the limit is {limits.max_audio_seconds:.0f} s", status=413)
    image = load_image(request.image, max_pixels=limits.max_image_pixels) if image is None else image
    target_hw = bucket_size(image.height, image.width, request.size)
    reference = resize_and_center_crop(image, target_hw)
    boxes, boxes_source = choose_speaker_boxes(image, len(tracks), request.bbox, request.speaker_order)
    masks = speaker_masks(image.height, image.width, len(tracks), boxes)
    lat_hw = (target_hw[0] // VAE_SPATIAL_STRIDE, target_hw[1] // VAE_SPATIAL_STRIDE)
    ref_masks = masks_to_latent(masks, target_hw, lat_hw)
    audio_frames = int(len(tracks[0]) / SPEECH_RATE * FPS)
    return PreparedInputs(tracks, mixed, reference, ref_masks, target_hw, audio_frames, boxes, boxes_source)


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
    on_chunk: Optional[Callable[[Any], Any]] = None,
) -> GenerationResult:
    """Run one job through the stages; returns the finished mp4.

    ``on_chunk``: called with each chunk's :class:`multitalk.utils.segments.ChunkSegment`
    (fragmented MP4: ``init`` + this chunk's ``data``) as soon as it is encoded, in order,
    while later chunks are generated; may return an awaitable (awaited before the next
    segment is handed over). The returned mp4 is unchanged.
    """
    from .utils.video_output import VideoOutput, chunk_frames

    timer = _Timer()
    emit = progress or (lambda p: None)
    started = time.perf_counter()
    lora_set = normalize_lora_set(request.loras)  # syntax here; names and scales at the Diffusion stage
    if request.video is not None or request.scene_cuts:
        raise InputError("condition_video" if request.video is not None else "scene_cuts",
                         "video-to-video needs the InfiniteTalk model; this one runs MultiTalk")
    if request.speech is not None:
        request = await synthesize_speech(request, stages, limits, emit, timer)
    prepare_started = time.perf_counter()
    emit(Progress("prepare", message="decoding inputs"))
    prep, _ = await asyncio.gather(asyncio.to_thread(prepare_inputs, request, limits), stages.prepare())
    timer.add("prepare", time.perf_counter() - prepare_started)
    request, plan = plan_request(request, prep.audio_frames, limits)
    warnings = [] if stages.lip_sync else ["no MultiTalk audio adapter found: the video is generated without lip sync"]

    height, width = prep.target_hw
    speech = prep.mixed[: int(math.ceil(plan.total_frames / FPS * SPEECH_RATE))]
    out = VideoOutput(height, width, plan.total_frames, speech, FPS,
                      chunk_frames(len(plan.starts), request.frames, request.motion_frames, plan.total_frames),
                      on_chunk)
    try:
        await _run_chunks(request, stages, prep, plan, lora_set, out, emit, timer)
    except BaseException:
        out.abort()
        raise
    emit(Progress("mux", message=f"{out.written} frames"))
    return await finish(out, request, prep, len(plan.starts), stages, timer, started, warnings)


async def finish(out, request: GenerationRequest, prep: PreparedInputs, chunks: int, stages: Stages,
                 timer: "_Timer", started: float, warnings: list[str]) -> GenerationResult:
    """Close the video (``VideoOutput``) and report the job: both loops end here."""
    t0 = time.perf_counter()
    mp4 = await out.close()
    timer.add("mux", time.perf_counter() - t0)
    timer.add("total", time.perf_counter() - started)
    height, width = prep.target_hw
    return GenerationResult(mp4, out.written, FPS, width, height, chunks, stages.lip_sync, timer.timings, warnings,
                            speech_wav=_wav_bytes(prep.mixed) if request.speech is not None else None,
                            loras=[{"name": n, "scale": v} for n, v in normalize_lora_set(request.loras)],
                            boxes=prep.boxes, boxes_source=prep.boxes_source)


def chunk_job(request: GenerationRequest, prep: PreparedInputs, plan: ChunkPlan, index: int, lora_set: tuple) -> ChunkJob:
    """The Diffusion stage's work for chunk ``index`` (noise from ``seed + index``, so a chunk
    gives the same noise on whichever replica runs it)."""
    s = request.sampling
    return ChunkJob(
        frames=request.frames, latent_hw=tuple(prep.ref_masks.shape[-2:]), audio_start=plan.starts[index],
        ref_masks=prep.ref_masks, seed=s.seed + index, steps=s.steps, shift=s.resolved_shift(request.size),
        guidance=GuidanceConfig(s.text_scale, s.audio_scale, s.use_apg, s.apg_momentum, s.apg_norm_threshold),
        teacache_thresh=s.teacache_thresh, size=request.size, audio_extend=plan.audio_extend, loras=lora_set,
    )


async def _run_chunks(request: GenerationRequest, stages: Stages, prep: PreparedInputs, plan: ChunkPlan,
                      lora_set: tuple, out, emit: ProgressCallback, timer: "_Timer") -> None:
    """The official chunk loop: each chunk after the first is conditioned on the last
    ``motion_frames`` frames of the one before; decoded, colour-corrected and written."""
    from .utils.video import color_match

    s = request.sampling
    negative = s.negative_prompt if s.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT
    total_steps = s.steps * len(plan.starts)
    # The encoders are independent: start all three, await none of them here.
    t_enc = time.perf_counter()
    emit(Progress("encode", message="audio, image and text encoders"))
    audio = stages.audio_encode(prep.tracks)
    text = stages.text_encode(request.prompt, negative)
    image = stages.image_encode(prep.reference[:, None], request.frames)
    motion_pixels: Optional[torch.Tensor] = None  # last frames of the previous chunk
    for index in range(len(plan.starts)):
        if index > 0:
            image = stages.image_encode(motion_pixels, request.frames)

        def on_step(step: int, total: int, _done=index * s.steps, _chunk=index) -> None:
            emit(Progress("diffusion", step=_done + step, total_steps=total_steps,
                          chunk=_chunk + 1, total_chunks=len(plan.starts)))

        t0 = time.perf_counter()
        latents = stages.diffusion_sample(chunk_job(request, prep, plan, index, lora_set), audio, image, text,
                                          on_step)
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
        t0 = time.perf_counter()
        await out.write(pixels if index == 0 else pixels[:, request.motion_frames:])
        timer.add("mux", time.perf_counter() - t0)
        del pixels


async def _await(handle: Any) -> Any:
    return await handle if hasattr(handle, "__await__") else handle


# --------------------------------------------------------------------------- text to speech
_VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MIN_SPEED, MAX_SPEED = 0.5, 2.0


def validate_speech(request: GenerationRequest, limits: Limits) -> None:
    """Check a text-to-speech request before anything is synthesised (:class:`InputError`
    naming the field). Whether each voice exists is checked by the speech stage."""
    from .utils.dialogue import parse_script

    speech = request.speech
    if request.audio:
        raise InputError("audio_1", "give either audio or text to speak, not both")
    if not isinstance(speech.voices, list) or not speech.voices:
        raise InputError("voice_1", "a voice is required (e.g. af_heart)")
    if len(speech.voices) > 2:
        raise InputError("voice", f"at most 2 speakers are supported, got {len(speech.voices)} voices")
    for i, voice in enumerate(speech.voices, start=1):
        if not isinstance(voice, str) or not _VOICE_NAME.fullmatch(voice):
            raise InputError(f"voice_{i}", f"not a voice name: {voice!r}")
    if isinstance(speech.speed, bool) or not isinstance(speech.speed, (int, float)) \
            or not MIN_SPEED <= speech.speed <= MAX_SPEED:
        raise InputError("speed", f"must be between {MIN_SPEED} and {MAX_SPEED}, got {speech.speed!r}")
    if (speech.texts is None) == (speech.script is None):
        raise InputError("text_1", "give either one text per speaker or one script with (s1)/(s2) turns")
    texts = [speech.script] if speech.script is not None else list(speech.texts)
    fields = ["script"] if speech.script is not None else [f"text_{i}" for i in range(1, len(texts) + 1)]
    if speech.texts is not None and len(texts) != len(speech.voices):
        raise InputError(f"text_{len(texts) + 1}" if len(texts) < len(speech.voices) else f"voice_{len(texts)}",
                         f"{len(texts)} text(s) for {len(speech.voices)} voice(s): give one text per voice")
    for text, name in zip(texts, fields):
        if not isinstance(text, str) or not any(ch.isalnum() for ch in text):
            raise InputError(name, "is empty: nothing to speak")
    chars = sum(len(t) for t in texts)
    if chars > limits.max_speech_chars:
        raise InputError(fields[0], f"is {chars} characters; the limit is {limits.max_speech_chars}", 413)
    if speech.script is not None:
        spoken = {turn.speaker for turn in parse_script(speech.script)}
        for number in sorted(spoken):
            if number > len(speech.voices):
                raise InputError(f"voice_{number}", f"the script has (s{number}) turns but no voice is given "
                                                    f"for speaker {number}")
        if len(speech.voices) == 2 and len(spoken) == 1:
            raise InputError("script", "has turns of one speaker only; give one voice for a one-speaker video")


async def synthesize_speech(request: GenerationRequest, stages: Stages, limits: Limits,
                            emit: ProgressCallback, timer: "_Timer") -> GenerationRequest:
    """Text to speech for a job that gives text: the synthesised 16 kHz tracks become the
    job's audio (float WAV, lossless), so they take the path uploaded speech takes (loudness
    normalisation, wav2vec2, the soundtrack). A script's tracks are already laid out turn by
    turn, so they are combined ``para``; per-speaker texts by the job's ``audio_type``."""
    speech = request.speech
    validate_speech(request, limits)
    emit(Progress("speech", message="text to speech"))
    t0 = time.perf_counter()
    tracks = [np.asarray(t, dtype=np.float32) for t in await _await(stages.speech_synthesize(speech))]
    timer.add("speech", time.perf_counter() - t0)
    audio_type = "para" if speech.script is not None else request.audio_type
    lengths = [len(t) for t in tracks]
    seconds = (sum(lengths) if audio_type == "add" else max(lengths)) / SPEECH_RATE
    if seconds > limits.max_audio_seconds:
        raise InputError(speech.text_field, f"the synthesised speech lasts {seconds:.1f} s; the limit is "
                                            f"{limits.max_audio_seconds:g} s", 413)
    return request.replace(audio=[_wav_bytes(t, "FLOAT") for t in tracks], audio_type=audio_type)


def _wav_bytes(speech: np.ndarray, subtype: str = "PCM_16") -> bytes:
    """Mono 16 kHz WAV file bytes."""
    import soundfile

    samples = np.asarray(speech, dtype=np.float32)
    if subtype == "PCM_16":
        samples = np.clip(samples, -1.0, 1.0)
    buffer = io.BytesIO()
    soundfile.write(buffer, samples, SPEECH_RATE, subtype=subtype, format="WAV")
    return buffer.getvalue()


# --------------------------------------------------------------------------- in-process
class LocalStages:
    """:class:`Stages` over in-process stage objects; each call runs in a worker thread.

    Handles are asyncio tasks. :meth:`for_job` gives a view that tracks its own tasks, so
    cancelling one job (:meth:`cancel`) stops its sampler at the next step and leaves the
    other jobs sharing these stages alone.
    """

    def __init__(self, audio, image, text, diffusion, decode, speech=None):
        self.audio, self.image, self.text, self.diffusion, self.decode = audio, image, text, diffusion, decode
        self.speech = speech  # SpeechStage, or None without a Kokoro-82M folder
        self._tasks: list[asyncio.Task] = []

    @property
    def lip_sync(self) -> bool:
        return bool(self.diffusion.lip_sync)

    def for_job(self, job_id: Optional[str] = None, retries: Any = None) -> "LocalStages":
        return LocalStages(self.audio, self.image, self.text, self.diffusion, self.decode, self.speech)

    async def prepare(self) -> None:
        return None  # everything is in this process already

    def cancel(self) -> None:
        for task in self._tasks:
            task.cancel()

    @staticmethod
    async def _resolve(*values):
        return [await _await(v) for v in values]

    def _track(self, coro) -> "asyncio.Task":
        task = asyncio.ensure_future(coro)
        self._tasks = [t for t in self._tasks if not t.done()] + [task]
        return task

    def _spawn(self, fn, *args) -> "asyncio.Task":
        async def run():
            resolved = await self._resolve(*args)
            return await asyncio.to_thread(fn, *resolved)

        return self._track(run())

    def audio_encode(self, speeches):
        return self._spawn(self.audio.encode, speeches)

    def image_encode(self, cond_pixels, frames):
        return self._spawn(self.image.encode, cond_pixels, frames)

    def text_encode(self, prompt, negative_prompt):
        return self._spawn(self.text.encode, prompt, negative_prompt)

    def diffusion_sample(self, job, audio, image, text, on_step=None):
        async def run():
            resolved = await self._resolve(audio, image, text)
            # Cancelling this task stops the sampler thread at its next step (StepStream).
            stream = StepStream(lambda step: self.diffusion.sample(job, *resolved, step))
            async for event in stream:
                if on_step is not None:
                    on_step(event.step, event.total)
            return stream.result

        return self._track(run())

    def vae_decode(self, latents):
        return self._spawn(self.decode.decode, latents)

    def speech_synthesize(self, speech):
        if self.speech is None:
            raise InputError(speech.text_field, "text to speech needs a Kokoro-82M folder (config.json, "
                                                "kokoro-v1_0.pth, voices/) under the models root; none was found")
        return self._spawn(self.speech.synthesize, speech)
    def reference_encode(self, reference, motion_pixels, frames):
        return self._spawn(self.image.encode_reference, reference, motion_pixels, frames)
