"""The stage calls the chunk loop makes: :class:`Stages`, in-process or served.

Each encode/sample/decode method returns a *handle*: an awaitable that may be awaited
more than once and may be passed, un-awaited, into later stage calls. In-process handles
are asyncio tasks (:class:`multitalk.generation.local.LocalStages`); served handles are Ray
Serve responses, which Serve hands from deployment to deployment without a round trip
through the ingress (``deployments.serve_stages.ServeStages``).
"""
from __future__ import annotations

from typing import Any, Awaitable, Callable, Optional, Protocol

import numpy as np
import torch

from ..api import SpeechRequest
from ..stages import ChunkJob, DecodedChunk, DecodeRequest

StepCallback = Callable[[int, int], None]


class Stages(Protocol):
    """What the chunk loop needs from the model stages."""

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
        """Fetch what the loop reads synchronously (:attr:`lip_sync`); cheap after the first call."""
        ...

    def cancel(self) -> None:
        """Stop every call this view started that is still running (best effort)."""
        ...

    def audio_encode(self, speeches: list[np.ndarray]) -> Awaitable[torch.Tensor]: ...
    def image_encode(self, cond_pixels: Any, frames: int) -> Awaitable[Any]: ...
    def text_encode(self, prompt: str, negative_prompt: str) -> Awaitable[Any]: ...

    def diffusion_sample(self, job: ChunkJob, audio: Any, image: Any, text: Any,
                         on_step: Optional[StepCallback]) -> Awaitable[torch.Tensor]:
        """Sample one chunk. ``on_step(0, 0)`` is called when sampling starts (its
        conditioning has arrived), then ``on_step(step, total)`` after every step."""
        ...

    def vae_decode(self, latents: Any, request: DecodeRequest) -> Awaitable[DecodedChunk]:
        """Decode, colour-correct and convert one chunk where the decoder runs (see
        :class:`~multitalk.stages.DecodeRequest`)."""
        ...

    def speech_synthesize(self, speech: SpeechRequest) -> Awaitable[list[np.ndarray]]: ...

    # InfiniteTalk (multitalk.infinitetalk): ImageStage.encode_reference.
    def reference_encode(self, reference: Any, motion_pixels: Any, frames: int) -> Awaitable[Any]: ...


async def resolve(handle: Any) -> Any:
    """A handle's value (a plain value passes through)."""
    return await handle if hasattr(handle, "__await__") else handle
