"""The chunk loop: one job through the stages, chunk by chunk, for every model.

:class:`ChunkLoop` is the loop MultiTalk (:mod:`multitalk.driver`) and InfiniteTalk
(:mod:`multitalk.infinitetalk`) share, in the manner of a diffusers pipeline: :meth:`ChunkLoop.run`
is the loop, and the steps a model differs in are methods its subclass supplies:

* :meth:`~ChunkLoop.prepare_inputs`: the inputs decoded and checked (CPU);
* :meth:`~ChunkLoop.make_plan`: where the chunks start, and the video's length;
* :meth:`~ChunkLoop.encode_condition`: the conditioning of chunk *k* (from the reference, or
  from the previous chunk's motion frames);
* :meth:`~ChunkLoop.chunk_job`: what the Diffusion stage samples for chunk *k*;
* :meth:`~ChunkLoop.release`: what the model opened for the job (a source video).

For every chunk the loop starts its conditioning, samples it, has the decoder stage decode
it (colour correction against the job's reference, the video's frames as uint8, the next
chunk's motion frames as float, all where the decoder runs) and hands the frames to the
video output (:class:`multitalk.utils.video_output.VideoOutput`: encoded once, while the
next chunk is generated). Each chunk's handles are dropped once consumed, so nothing the
loop holds grows with the job's length.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import Any, Callable, Optional

from ..api import GenerationRequest, GenerationResult, Limits, Progress, ProgressCallback
from ..modules.lora_runtime import normalize_lora_set
from ..stages import ChunkJob, DecodeRequest
from ..utils.sampler import GuidanceConfig
from .planning import DEFAULT_NEGATIVE_PROMPT, FPS, SPEECH_RATE, ChunkPlan, PreparedInputs, chunk_frames, frames_added
from .protocol import Stages, resolve
from .speech import synthesize_speech, wav_bytes


class Timings:
    """Seconds per phase of one job (``prepare``, ``encode``, ``diffusion``, ``decode``, ``mux``, ...)."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.timings[name] = round(self.timings.get(name, 0.0) + seconds, 4)


class _SamplingClock:
    """The Diffusion stage's step callback for one chunk: when sampling started (step 0: the
    conditioning had arrived) and the progress of every step."""

    def __init__(self, emit: ProgressCallback, index: int, chunks: int, steps: int):
        self.emit, self.index, self.chunks, self.steps = emit, index, chunks, steps
        self.started: Optional[float] = None

    def __call__(self, step: int, total: int) -> None:
        if step == 0:
            self.started = time.perf_counter()
            return
        self.emit(Progress("diffusion", step=self.index * self.steps + step, total_steps=self.steps * self.chunks,
                           chunk=self.index + 1, total_chunks=self.chunks))


class ChunkLoop:
    """One job of one model (see the module docstring). ``run()`` returns the finished video
    as a file (:attr:`GenerationResult.video_file`).

    ``on_chunk``: called with each chunk's :class:`multitalk.utils.segments.ChunkSegment`
    (fragmented MP4: ``init`` + this chunk's ``data``) as soon as it is encoded, in order,
    while later chunks are generated; may return an awaitable.
    """

    # The result's warning when the DiT has no audio adapter.
    no_adapter_warning = "no audio adapter found: the video is generated without lip sync"

    def __init__(self, request: GenerationRequest, stages: Stages, limits: Limits,
                 progress: Optional[ProgressCallback] = None, on_chunk: Optional[Callable[[Any], Any]] = None):
        self.request, self.stages, self.limits, self.on_chunk = request, stages, limits, on_chunk
        self.emit = progress or (lambda p: None)
        self.timer = Timings()
        self.prep: Optional[PreparedInputs] = None
        self.plan: Optional[ChunkPlan] = None
        self.lora_set: tuple = ()

    # ------------------------------------------------------------------ steps a model supplies
    def check(self) -> None:
        """Checks of the request that need nothing decoded (before text to speech)."""

    def prepare_inputs(self) -> PreparedInputs:
        """The inputs decoded and checked (runs in a worker thread)."""
        raise NotImplementedError

    def make_plan(self) -> ChunkPlan:
        """The chunk plan of :attr:`prep`; may settle the request's clip length (``frames``)."""
        raise NotImplementedError

    async def encode_condition(self, index: int, motion: Any) -> Any:
        """Start chunk ``index``'s conditioning; ``motion``: the previous chunk's motion frames
        (a handle the decoder stage gave, ``None`` for the first chunk). Returns its handle."""
        raise NotImplementedError

    def chunk_job(self, index: int) -> ChunkJob:
        """The Diffusion stage's work for chunk ``index``."""
        raise NotImplementedError

    def color_reference(self, index: int) -> Any:
        """What chunk ``index`` is colour-matched to (``[3, H, W]`` in [-1, 1]; after its
        :meth:`encode_condition`): the job's reference image, as the official."""
        return self.prep.reference

    async def release(self) -> None:
        """Close what :meth:`prepare_inputs` opened (called however the job ends)."""

    # ------------------------------------------------------------------ shared steps
    def sampling_job(self, index: int, size: Optional[str] = None) -> ChunkJob:
        """The sampler settings of chunk ``index`` (noise from ``seed + index``, so a chunk
        gives the same noise on whichever replica runs it); ``size``: the bucket name the
        shift and TeaCache follow (default: the request's)."""
        request, prep, plan, s = self.request, self.prep, self.plan, self.request.sampling
        size = size or request.size
        return ChunkJob(
            frames=request.frames, latent_hw=tuple(prep.ref_masks.shape[-2:]), audio_start=plan.starts[index],
            ref_masks=prep.ref_masks, seed=s.seed + index, steps=s.steps, shift=s.resolved_shift(size),
            guidance=GuidanceConfig(s.text_scale, s.audio_scale, s.use_apg, s.apg_momentum, s.apg_norm_threshold),
            teacache_thresh=s.teacache_thresh, size=size, audio_extend=plan.audio_extend, loras=self.lora_set,
        )

    @property
    def negative_prompt(self) -> str:
        negative = self.request.sampling.negative_prompt
        return negative if negative is not None else DEFAULT_NEGATIVE_PROMPT

    # ------------------------------------------------------------------ the loop
    async def run(self) -> GenerationResult:
        from ..utils.video_output import VideoOutput

        started = time.perf_counter()
        self.lora_set = normalize_lora_set(self.request.loras)  # syntax here; names and scales at the Diffusion stage
        self.check()
        if self.request.speech is not None:
            self.request = await synthesize_speech(self.request, self.stages, self.limits, self.emit, self.timer)
        try:
            t0 = time.perf_counter()
            self.emit(Progress("prepare", message="decoding inputs"))
            # Both run to their end (what prepare_inputs opens is released below even if the other fails).
            prepared, ready = await asyncio.gather(asyncio.to_thread(self.prepare_inputs), self.stages.prepare(),
                                                   return_exceptions=True)
            for outcome in (prepared, ready):
                if isinstance(outcome, BaseException):
                    raise outcome
            self.prep = prepared
            self.timer.add("prepare", time.perf_counter() - t0)
            self.plan = plan = self.make_plan()
            request, (height, width) = self.request, self.prep.target_hw
            speech = self.prep.mixed[: int(math.ceil(plan.total_frames / FPS * SPEECH_RATE))]
            out = VideoOutput(height, width, plan.total_frames, speech, FPS,
                              chunk_frames(len(plan.starts), request.frames, request.motion_frames, plan.total_frames),
                              self.on_chunk)
            try:
                await self.run_chunks(out)
                self.emit(Progress("mux", message=f"{out.written} frames"))
                t0 = time.perf_counter()
                video = await out.close()
                self.timer.add("mux", time.perf_counter() - t0)
            except BaseException:
                out.abort()
                raise
        finally:
            await self.release()
        self.timer.add("total", time.perf_counter() - started)
        return GenerationResult(
            None, out.written, FPS, width, height, len(plan.starts), self.stages.lip_sync, self.timer.timings,
            [] if self.stages.lip_sync else [self.no_adapter_warning],
            speech_wav=wav_bytes(self.prep.mixed) if request.speech is not None else None,
            loras=[{"name": n, "scale": v} for n, v in self.lora_set], boxes=self.prep.boxes,
            boxes_source=self.prep.boxes_source, video_file=video,
        )

    async def run_chunks(self, out) -> None:
        """Every chunk: conditioning → sampling → decoding (colour, uint8, motion) → the video."""
        from ..utils.color import ColorTarget

        request, prep, plan, stages, timer = self.request, self.prep, self.plan, self.stages, self.timer
        chunks = len(plan.starts)
        adds = frames_added(chunks, request.frames, request.motion_frames, plan.total_frames)
        color_reference, color = None, None  # the statistics of the current reference, computed once
        started = time.perf_counter()
        self.emit(Progress("encode", message="audio and text encoders, and the first chunk's conditioning"))
        # Job-wide conditioning, handed un-awaited into every chunk's sampling (served: from
        # encoder to DiT without passing through here).
        self.audio = stages.audio_encode(prep.tracks)
        self.text = stages.text_encode(request.prompt, self.negative_prompt)
        motion = None
        for index in range(chunks):
            image = await self.encode_condition(index, motion)
            motion = None
            clock = _SamplingClock(self.emit, index, chunks, request.sampling.steps)
            latents = stages.diffusion_sample(self.chunk_job(index), self.audio, image, self.text, clock)
            del image  # the sampling call holds it until it has started
            t0 = time.perf_counter()
            await resolve(latents)
            done = time.perf_counter()
            timer.add("encode", (clock.started or t0) - started)
            timer.add("diffusion", done - (clock.started or t0))
            last = index + 1 == chunks
            if adds[index] == 0 and last:  # the official's audio extension: nothing of it is shown
                break
            self.emit(Progress("decode", chunk=index + 1, total_chunks=chunks))
            if self.color_reference(index) is not color_reference:
                color_reference = self.color_reference(index)
                color = ColorTarget.of(color_reference, request.color_correction)
            wanted = DecodeRequest(first=0 if index == 0 else request.motion_frames, count=adds[index],
                                   motion_frames=0 if last else request.motion_frames, color=color)
            decoded = await resolve(stages.vae_decode(latents, wanted))
            del latents
            started = time.perf_counter()
            timer.add("decode", started - done)
            motion = decoded.motion
            await out.write(decoded.frames)
            del decoded  # the video output holds the frames until they are encoded
            timer.add("mux", time.perf_counter() - started)
            self.emit(Progress("mux", chunk=index + 1, total_chunks=chunks,
                               message=f"chunk {index + 1}/{chunks}: {out.written} of {plan.total_frames} frames"))
            started = time.perf_counter()
