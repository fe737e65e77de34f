"""MultiTalk: its steps of the chunk loop, and its entry points ``generate`` and ``precheck``.

``generate(request, stages)`` runs the official ``MultiTalkPipeline.generate`` loop
(``generate_multitalk.py``) over :class:`~multitalk.generation.loop.ChunkLoop`: the inputs
decoded (decode, loudness, bucket, masks), the clip length fitted to the speech, then
chunk by chunk (``streaming`` chains clips of ``frames`` (81) frames, each conditioned on
the last ``motion_frames`` (25) frames of the one before, until the audio ends):

* chunk 0 is conditioned on the reference image (CLIP of it; the VAE encoding of it followed
  by black frames), started together with the audio and text encoders;
* chunk *k > 0* on the previous chunk's last ``motion_frames`` colour-corrected frames,
  handed from the decoder stage to the image encoder.

The loop itself, the stage protocol, the planning and the in-process stages are in
:mod:`multitalk.generation`; the names other modules use from them are importable from
here too (``Stages``, ``LocalStages``, ``validate``, ``plan_chunks``, ...).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from .api import GenerationRequest, GenerationResult, InputError, Limits, ProgressCallback
from .generation.local import LocalStages
from .generation.loop import ChunkLoop
from .generation.planning import (
    DEFAULT_FRAMES, DEFAULT_NEGATIVE_PROMPT, FPS, SPEECH_RATE, ChunkPlan, PreparedInputs, fit_frames, plan_chunks,
    prepare_inputs, validate, validate_sampling,
)  # fmt: skip
from .generation.protocol import Stages
from .generation.speech import synthesize_speech, validate_speech
from .stages import ChunkJob

__all__ = [
    "DEFAULT_FRAMES", "DEFAULT_NEGATIVE_PROMPT", "FPS", "SPEECH_RATE", "ChunkPlan", "Limits", "LocalStages",
    "MultiTalkLoop", "PreparedInputs", "Stages", "fit_frames", "generate", "plan_chunks", "plan_request", "precheck",
    "prepare_inputs", "synthesize_speech", "validate", "validate_sampling", "validate_speech",
]


def plan_request(request: GenerationRequest, audio_frames: int, limits: Limits) -> tuple[GenerationRequest, ChunkPlan]:
    """The request with its clip length settled (:func:`fit_frames`) and its chunk plan
    (a clip is one chunk; a stream runs until the audio ends, at most ``max_frames``)."""
    request = request.replace(frames=fit_frames(request, audio_frames, limits))
    plan = plan_chunks(audio_frames, request.frames, request.mode, request.motion_frames,
                       request.frames if request.mode == "clip" else request.max_frames)
    return request, plan


def _refuse_video(request: GenerationRequest) -> None:
    if request.video is not None or request.scene_cuts:
        raise InputError("condition_video" if request.video is not None else "scene_cuts",
                         "video-to-video needs the InfiniteTalk model; this one runs MultiTalk")


def precheck(request: GenerationRequest, limits: Limits) -> None:
    """Everything about a job's media that can be checked before it runs (a service calls
    this at submit): the image, the speech and the clip length. A text-to-speech job has
    only its options and image to check; its speech exists after synthesis."""
    from .utils.image import load_image

    _refuse_video(request)
    if request.speech is not None:
        validate_speech(request, limits)
        load_image(request.image, max_pixels=limits.max_image_pixels)
        return
    plan_request(request, prepare_inputs(request, limits).audio_frames, limits)


class MultiTalkLoop(ChunkLoop):
    """MultiTalk's steps (see the module docstring)."""

    no_adapter_warning = "no MultiTalk audio adapter found: the video is generated without lip sync"

    def check(self) -> None:
        _refuse_video(self.request)

    def prepare_inputs(self) -> PreparedInputs:
        return prepare_inputs(self.request, self.limits)

    def make_plan(self) -> ChunkPlan:
        self.request, plan = plan_request(self.request, self.prep.audio_frames, self.limits)
        return plan

    async def encode_condition(self, index: int, motion: Any) -> Any:
        pixels = self.prep.reference[:, None] if index == 0 else motion
        return self.stages.image_encode(pixels, self.request.frames)

    def chunk_job(self, index: int) -> ChunkJob:
        return self.sampling_job(index)


async def generate(request: GenerationRequest, stages: Stages, progress: Optional[ProgressCallback] = None,
                   limits: Limits = Limits(), on_chunk: Optional[Callable[[Any], Any]] = None) -> GenerationResult:
    """Run one MultiTalk job through the stages; returns the finished mp4 as a file
    (``GenerationResult.video_file``). ``on_chunk``: each chunk's fMP4 segment as soon as it
    is encoded (see :class:`~multitalk.generation.loop.ChunkLoop`)."""
    return await MultiTalkLoop(request, stages, limits, progress, on_chunk).run()
