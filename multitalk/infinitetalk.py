"""InfiniteTalk: talking video of any length from one image, or dubbing of a video.

``generate(request, stages)`` runs the official ``generate_infinitetalk`` loop
(MeiGen-AI/InfiniteTalk ``wan/multitalk.py``) as the steps of the chunk loop MultiTalk runs
too (:class:`~multitalk.generation.loop.ChunkLoop`), over the same
:class:`~multitalk.generation.protocol.Stages`, on a DiT holding the InfiniteTalk adapters
(``DiffusionStage.from_pretrained(..., model="infinitetalk")``). Against MultiTalk's steps
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
import re
from typing import Any, Callable, Optional

import torch

from .api import GenerationRequest, GenerationResult, InputError, Limits, Progress, ProgressCallback
from .checkpoints.infinitetalk import adapter_for_speakers
from .generation.loop import ChunkLoop
from .generation.planning import ChunkPlan, PreparedInputs, fit_frames, plan_chunks, prepare_inputs
from .generation.protocol import Stages
from .generation.speech import validate_speech
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


class ReferenceFrames:
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


class InfiniteTalkLoop(ChunkLoop):
    """InfiniteTalk's steps (see the module docstring)."""

    def __init__(self, request: GenerationRequest, stages: Stages, limits: Optional[Limits] = None,
                 progress: Optional[ProgressCallback] = None, on_chunk: Optional[Callable[[Any], Any]] = None):
        super().__init__(request, stages, limits or INFINITETALK_LIMITS, progress, on_chunk)
        self.source: Optional[VideoSource] = None
        self.references: Optional[ReferenceFrames] = None
        self.cuts: list[int] = []

    def prepare_inputs(self) -> PreparedInputs:
        prep, self.source = prepare(self.request, self.limits)
        if self.request.scene_cuts and self.source is not None:
            self.cuts = detect_cuts(self.source.path)
        return prep

    def make_plan(self) -> ChunkPlan:
        request, prep = self.request, self.prep
        self.request = request = request.replace(frames=fit_frames(request, prep.audio_frames, self.limits))
        streaming = request.mode == "streaming"
        plan = plan_chunks(prep.audio_frames, request.frames, request.mode, request.motion_frames,
                           prep.audio_frames if streaming else request.frames)
        # Official: the streamed video is cut to the audio's length, a clip to its frames.
        plan = dataclasses.replace(plan, total_frames=prep.audio_frames if streaming else request.frames)
        picks = chunk_references(plan.starts, request.frames, request.motion_frames, plan.total_frames, self.cuts)
        self.references = ReferenceFrames(prep, self.source, picks)
        return plan

    async def encode_condition(self, index: int, motion: Any) -> Any:
        reference = await self.references.get(index)
        self.emit(Progress("encode", chunk=index + 1, total_chunks=len(self.plan.starts), message="reference frame"))
        return self.stages.reference_encode(reference, reference if self.references.restarts(index) else motion,
                                            self.request.frames)

    def color_reference(self, index: int) -> Any:
        return self.references.colour()  # the shot's first reference frame

    def chunk_job(self, index: int) -> ChunkJob:
        """MultiTalk's job on the size's bucket, with the motion written back clean and the
        adapter of the speaker count."""
        return dataclasses.replace(self.sampling_job(index, bucket_name(self.request.size)), clean_motion=True,
                                   adapter=adapter_for_speakers(len(self.prep.tracks)))

    async def release(self) -> None:
        if self.references is not None:
            await self.references.cancel()
        if self.source is not None:
            await asyncio.to_thread(self.source.close)


async def generate(request: GenerationRequest, stages: Stages, progress: Optional[ProgressCallback] = None,
                   limits: Optional[Limits] = None, on_chunk: Optional[Callable[[Any], Any]] = None) -> GenerationResult:
    """Run one InfiniteTalk job through the stages; returns the finished mp4 as a file. ``on_chunk``:
    each chunk's fMP4 segment as soon as it is encoded (as in :func:`multitalk.driver.generate`).
    A job may give text instead of audio (``speech``), spoken first as in MultiTalk's loop."""
    return await InfiniteTalkLoop(request, stages, limits, progress, on_chunk).run()
