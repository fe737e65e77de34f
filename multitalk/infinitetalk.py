"""InfiniteTalk: talking video of any length from one image, or dubbing of a video.

``generate(request, stages)`` runs the official ``generate_infinitetalk`` loop
(MeiGen-AI/InfiniteTalk ``wan/multitalk.py``) over the same :class:`~multitalk.driver.Stages`
as MultiTalk, on a DiT holding the InfiniteTalk adapters
(``DiffusionStage.from_pretrained(..., model="infinitetalk")``). Against MultiTalk's loop
(:mod:`multitalk.driver`), every chunk of ``frames`` (81) frames is

* conditioned on a *reference frame*: the source video's frame at the chunk's audio start
  (image-to-video: the image): CLIP of that frame, and the VAE encoding of that frame
  followed by black frames, with only the first frame set in the mask;
* continued from *motion latents*: the VAE encoding of the previous chunk's last
  ``motion_frames`` (9) colour-corrected frames (the first chunk: of the reference frame),
  written back clean over the first latent frames at every sampling step;

and the video is cut to the audio's length. Length comes from the audio alone (no frame
cap; the audio cap bounds it: 10 minutes by default here, :data:`INFINITETALK_LIMITS`).
Memory stays flat with length: the source video is decoded one frame at a time
(:class:`multitalk.utils.video_source.VideoSource`, any fps converted to 25) and finished
chunks stream into the mp4 writer. A source shorter than the audio is held on its last
frame (the official reader's behaviour). The adapter follows the speaker count (``single``
for one, ``multi`` for two). TeaCache, APG, LoRAs, batched guidance and sequence/guidance
parallelism are the Diffusion stage's and work as for MultiTalk.
"""
from __future__ import annotations

import asyncio
import dataclasses
import math
import re
import time
from typing import Optional

import torch

from .api import GenerationRequest, GenerationResult, InputError, Limits, Progress, ProgressCallback
from .checkpoints.infinitetalk import adapter_for_speakers
from .driver import chunk_job as driver_chunk_job
from .driver import (
    DEFAULT_NEGATIVE_PROMPT, FPS, SPEECH_RATE, PreparedInputs, Stages, _await, _Timer, finish, fit_frames,
    plan_chunks, prepare_inputs, synthesize_speech,
)
from .stages import ChunkJob
from .utils.shots import chunk_references, detect_cuts
from .utils.video_source import VIDEO_FIELD, VideoLimits, VideoSource

# Defaults of the official generate_infinitetalk.py as its README runs it (the sampler's are
# SamplingOptions' own: 40 steps, text scale 5, audio scale 4, shift 7 / 11).
DEFAULTS = dict(mode="streaming", frames=81, motion_frames=9, size="infinitetalk-480", color_correction=1.0)
INFINITETALK_LIMITS = Limits(max_audio_seconds=600.0)
_SIZE_RE = re.compile(r"^(?:infinitetalk|multitalk)-(\d{1,4})$")


def infinitetalk_request(audio: list[bytes], *, image: Optional[bytes] = None, video: Optional[bytes] = None,
                         **options) -> GenerationRequest:
    """A :class:`GenerationRequest` with InfiniteTalk's defaults (streaming, 9 motion frames,
    ``infinitetalk-480``); ``options`` override them."""
    return GenerationRequest(image=image, audio=audio, video=video, **{**DEFAULTS, **options})


def bucket_name(size: str) -> str:
    """``infinitetalk-480``/``-720`` (and the scaled ``infinitetalk-N`` of CPU runs) → the
    bucket table of the same name on the MultiTalk side (the official tables are the same)."""
    match = _SIZE_RE.match(size) if isinstance(size, str) else None
    if match is None:
        raise InputError("size", f"unknown size {size!r}: use infinitetalk-480, infinitetalk-720 or infinitetalk-N")
    return f"multitalk-{match.group(1)}"


def check_condition(request: GenerationRequest) -> None:
    """Exactly one of ``image`` and ``video``; shot cuts only for a video."""
    if request.video is not None and request.image:
        raise InputError(VIDEO_FIELD, "give condition_image or condition_video, not both")
    if request.video is None and not request.image:
        raise InputError("condition_image", "a condition image (image-to-video) or video (video-to-video) is required")
    if request.scene_cuts and request.video is None:
        raise InputError("scene_cuts", "splits a source video at its shot cuts: give condition_video")


def video_limits(limits: Limits) -> VideoLimits:
    return VideoLimits(limits.max_video_bytes, limits.max_video_seconds, limits.max_video_pixels)


def prepare(request: GenerationRequest, limits: Limits) -> tuple[PreparedInputs, Optional[VideoSource]]:
    """Checks and decodes the inputs (CPU); the source video is opened, frame 0 decoded."""
    from PIL import Image

    check_condition(request)
    bucket = bucket_name(request.size)
    source = VideoSource(request.video, video_limits(limits)) if request.video is not None else None
    try:
        first = Image.fromarray(source.frame(0)) if source is not None else None
        prep = prepare_inputs(request.replace(size=bucket), limits, image=first)
    except BaseException:
        if source is not None:
            source.close()
        raise
    return prep, source


def precheck(request: GenerationRequest, limits: Limits) -> None:
    """The submit-time checks (see :func:`multitalk.driver.precheck`): the image or the
    source video (from its header and first frame), the speech, the clip length."""
    from .driver import validate_speech

    if request.speech is not None:
        validate_speech(request, limits)
        check_condition(request)
        if request.video is not None:
            VideoSource(request.video, video_limits(limits)).close()
        return
    prep, source = prepare(request, limits)
    if source is not None:
        source.close()
    frames = fit_frames(request, prep.audio_frames, limits)
    streaming = request.mode == "streaming"
    plan_chunks(prep.audio_frames, frames, request.mode, request.motion_frames,
                prep.audio_frames if streaming else frames)


def reference_at(source: VideoSource, index: int, target_hw: tuple[int, int]) -> torch.Tensor:
    """The source frame ``index`` (25 fps) as the official prepares it: ``[3, 1, H, W]`` in [-1, 1]."""
    from PIL import Image

    from .utils.image import resize_and_center_crop

    return resize_and_center_crop(Image.fromarray(source.frame(index)), target_hw)[:, None]


class _References:
    """Each chunk's reference frame (``picks``: :func:`multitalk.utils.shots.chunk_references`);
    the next one is decoded while the current chunk samples. With shot cuts, the first chunk
    of a shot restarts from its reference and each chunk is colour-matched to its shot's."""

    def __init__(self, prep: PreparedInputs, source: Optional[VideoSource], picks: list):
        self.prep, self.source, self.picks = prep, source, picks
        self._next: Optional[asyncio.Future] = None
        self._colour = prep.reference

    async def get(self, index: int) -> torch.Tensor:
        pick = self.picks[index]
        if self.source is None or pick.frame == 0:
            frame = self.prep.reference[:, None]
        elif self._next is not None:
            frame = await self._next
        else:  # the first chunk, in a shot after a cut
            frame = await asyncio.to_thread(reference_at, self.source, pick.frame, self.prep.target_hw)
        if self.source is not None and index + 1 < len(self.picks):
            self._next = asyncio.ensure_future(asyncio.to_thread(
                reference_at, self.source, self.picks[index + 1].frame, self.prep.target_hw))
        if self.restarts(index):
            self._colour = frame[:, 0]
        return frame

    def restarts(self, index: int) -> bool:
        return index == 0 or self.picks[index].new_shot

    def colour(self) -> torch.Tensor:
        """What the current chunk is colour-matched to: its shot's first reference."""
        return self._colour

    async def cancel(self) -> None:
        if self._next is not None and not self._next.done():
            await asyncio.gather(self._next, return_exceptions=True)


async def generate(
    request: GenerationRequest,
    stages: Stages,
    progress: Optional[ProgressCallback] = None,
    limits: Optional[Limits] = None,
    on_chunk=None,
) -> GenerationResult:
    """Run one InfiniteTalk job through the stages; returns the finished mp4. ``on_chunk``:
    each chunk's fMP4 segment as soon as it is encoded (as in :func:`multitalk.driver.generate`).
    A job may give text instead of audio (``speech``), spoken first as in MultiTalk's loop."""
    limits = limits or INFINITETALK_LIMITS
    timer = _Timer()
    emit = progress or (lambda p: None)
    started = time.perf_counter()
    if request.speech is not None:
        request = await synthesize_speech(request, stages, limits, emit, timer)
    emit(Progress("prepare", message="decoding inputs"))
    prepared, ready = await asyncio.gather(asyncio.to_thread(prepare, request, limits), stages.prepare(),
                                           return_exceptions=True)
    for failed in (prepared, ready):
        if isinstance(failed, BaseException):
            if not isinstance(prepared, BaseException) and prepared[1] is not None:
                prepared[1].close()
            raise failed
    prep, source = prepared
    try:
        timer.add("prepare", time.perf_counter() - started)
        request = request.replace(frames=fit_frames(request, prep.audio_frames, limits))
        return await _run(request, stages, prep, source, emit, timer, started, on_chunk)
    finally:
        if source is not None:
            await asyncio.to_thread(source.close)


async def _run(request: GenerationRequest, stages: Stages, prep: PreparedInputs, source: Optional[VideoSource],
               emit: ProgressCallback, timer: _Timer, started: float, on_chunk=None) -> GenerationResult:
    from .utils.video_output import VideoOutput, chunk_frames

    streaming = request.mode == "streaming"
    plan = plan_chunks(prep.audio_frames, request.frames, request.mode, request.motion_frames,
                       prep.audio_frames if streaming else request.frames)
    # Official: the streamed video is cut to the audio's length, a clip to its frames.
    total_frames = prep.audio_frames if streaming else request.frames
    cuts = []
    if request.scene_cuts and source is not None:
        emit(Progress("prepare", message="finding shot cuts"))
        cuts = await asyncio.to_thread(detect_cuts, source.path)
    picks = chunk_references(plan.starts, request.frames, request.motion_frames, total_frames, cuts)
    warnings = [] if stages.lip_sync else ["no audio adapter found: the video is generated without lip sync"]
    emit(Progress("encode", message="audio and text encoders"))
    audio = stages.audio_encode(prep.tracks)
    text = stages.text_encode(request.prompt, request.sampling.negative_prompt
                              if request.sampling.negative_prompt is not None else DEFAULT_NEGATIVE_PROMPT)
    speech = prep.mixed[: int(math.ceil(total_frames / FPS * SPEECH_RATE))]
    height, width = prep.target_hw
    writer = VideoOutput(height, width, total_frames, speech, FPS,
                         chunk_frames(len(plan.starts), request.frames, request.motion_frames, total_frames), on_chunk)
    references = _References(prep, source, picks)
    try:
        motion_pixels: Optional[torch.Tensor] = None
        for index, start in enumerate(plan.starts):
            pixels = await _chunk(request, stages, prep, plan, index, start, audio, text, references,
                                  motion_pixels, emit, timer)
            motion_pixels = pixels[:, -request.motion_frames:].contiguous()
            t0 = time.perf_counter()
            await writer.write(pixels if index == 0 else pixels[:, request.motion_frames:])
            timer.add("mux", time.perf_counter() - t0)
            emit(Progress("mux", chunk=index + 1, total_chunks=len(plan.starts),
                          message=f"chunk {index + 1}/{len(plan.starts)}: {writer.written} of {total_frames} frames"))
            del pixels
    except BaseException:
        await references.cancel()
        writer.abort()
        raise
    return await finish(writer, request, prep, len(plan.starts), stages, timer, started, warnings)


def chunk_job(request: GenerationRequest, prep: PreparedInputs, plan, index: int) -> ChunkJob:
    """The Diffusion stage's work for chunk ``index``: MultiTalk's (noise from ``seed + index``,
    the job's LoRAs), on the size's bucket, with the motion written back clean and the
    adapter of the speaker count."""
    from .modules.lora_runtime import normalize_lora_set

    job = driver_chunk_job(request.replace(size=bucket_name(request.size)), prep, plan, index,
                           normalize_lora_set(request.loras))
    return dataclasses.replace(job, clean_motion=True, adapter=adapter_for_speakers(len(prep.tracks)))


async def _chunk(request, stages: Stages, prep: PreparedInputs, plan, index: int, start: int, audio, text,
                 references: _References, motion_pixels: Optional[torch.Tensor], emit: ProgressCallback,
                 timer: _Timer) -> torch.Tensor:
    """Encode, sample, decode and colour-correct one chunk → pixels ``[3, frames, H, W]``."""
    from .utils.video import color_match

    chunks, steps = len(plan.starts), request.sampling.steps
    t0 = time.perf_counter()
    reference = await references.get(index)
    emit(Progress("encode", chunk=index + 1, total_chunks=chunks, message="reference frame"))
    image = stages.reference_encode(reference, reference if references.restarts(index) else motion_pixels,
                                    request.frames)

    def on_step(step: int, total: int) -> None:
        emit(Progress("diffusion", step=index * steps + step, total_steps=steps * chunks,
                      chunk=index + 1, total_chunks=chunks))

    latents = stages.diffusion_sample(chunk_job(request, prep, plan, index), audio, image, text, on_step)
    # Audio and text are the same for every chunk: wait for them once.
    await asyncio.gather(*([_await(audio), _await(text)] if index == 0 else []), _await(image))
    timer.add("encode", time.perf_counter() - t0)
    t0 = time.perf_counter()
    await _await(latents)
    timer.add("diffusion", time.perf_counter() - t0)
    emit(Progress("decode", chunk=index + 1, total_chunks=chunks))
    t0 = time.perf_counter()
    pixels = await _await(stages.vae_decode(latents))
    timer.add("decode", time.perf_counter() - t0)
    if request.color_correction > 0:  # against the (shot's) first reference frame, as the official
        t0 = time.perf_counter()
        pixels = await asyncio.to_thread(color_match, pixels, references.colour(), request.color_correction)
        timer.add("color_correction", time.perf_counter() - t0)
    return pixels
