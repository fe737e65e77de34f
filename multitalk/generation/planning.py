"""What is settled before a job's first stage call: request checks, the clip length, the
chunk plan and the inputs decoded (CPU work, raising :class:`~multitalk.api.InputError`
naming the bad field)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..api import MAX_SPEAKERS, GenerationRequest, InputError, Limits, SamplingOptions
from ..stages import VAE_SPATIAL_STRIDE

# The official MultiTalk config's default negative prompt (overrides Wan's Chinese one).
DEFAULT_NEGATIVE_PROMPT = (
    "bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, "
    "overall gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, "
    "poorly drawn hands, poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, "
    "messy background, three legs, many people in the background, walking backwards"
)
FPS = 25
SPEECH_RATE = 16000
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
    from ..utils.audio import combine_speakers, load_speech
    from ..utils.faces import choose_speaker_boxes
    from ..utils.image import bucket_size, load_image, masks_to_latent, resize_and_center_crop, speaker_masks

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


def frames_added(chunks: int, frames: int, motion: int, total: int) -> list[int]:
    """Frames each of ``chunks`` chunks adds to a video of ``total`` frames: the first all of
    its own, the others all but the ``motion`` frames they continue from, the end cut at
    ``total`` (a last chunk may add none: the official's audio extension)."""
    ends = [min(frames + i * (frames - motion), total) for i in range(chunks)]
    return [max(0, end - start) for start, end in zip([0] + ends[:-1], ends)]


def chunk_frames(chunks: int, frames: int, motion: int, total: int) -> list[int]:
    """:func:`frames_added` without the chunks that add none: the video's segments."""
    return [n for n in frames_added(chunks, frames, motion, total) if n > 0]
