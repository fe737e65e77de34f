"""``MultiTalkPipeline``: the whole model in one process (CLI, tests, benches).

    pipe = MultiTalkPipeline.from_pretrained("/models")
    result = pipe.generate(GenerationRequest(image=png, audio=[wav], prompt="..."))
    open("out.mp4", "wb").write(result.video)

The same stages and driver run under Ray Serve, one deployment per stage.

``from_pretrained(root, model="infinitetalk")`` loads the InfiniteTalk adapters instead of
MultiTalk's and runs :mod:`multitalk.infinitetalk`'s loop (image-to-video, or dubbing a
``video``; requests from :func:`multitalk.infinitetalk.infinitetalk_request` get its defaults).
"""
from __future__ import annotations

import asyncio
from typing import Optional

from .api import GenerationRequest, GenerationResult, ProgressCallback
from .checkpoints.discovery import CheckpointSet, find_checkpoints
from .driver import Limits, LocalStages, generate
from .stages import AudioStage, DecodeStage, DiffusionStage, ImageStage, TextStage


class MultiTalkPipeline:
    def __init__(self, stages: LocalStages, checkpoints: Optional[CheckpointSet] = None, limits: Limits = Limits(),
                 model: str = "multitalk"):
        self.stages = stages
        self.checkpoints = checkpoints
        self.limits = limits
        self.model = model  # "multitalk" | "infinitetalk"

    @classmethod
    def from_pretrained(cls, models_root: str, device: str = "cpu", dtype: str = "float32",
                        attention_backend: Optional[str] = None, tiled_vae: bool = False,
                        model: str = "multitalk", **diffusion_options) -> "MultiTalkPipeline":
        """Load every stage from a models root (official or diffusers layout, see ``multitalk check``).

        ``diffusion_options``: :meth:`DiffusionStage.from_pretrained` levers (``batch_guidance``,
        ``quantize``, ``low_vram``, ``compile``, ``loras``; InfiniteTalk: ``adapters``).
        ``model``: ``"multitalk"`` or ``"infinitetalk"``.
        """
        ckpt = find_checkpoints(models_root).require_complete()
        stages = LocalStages(
            AudioStage.from_pretrained(ckpt, device, dtype),
            ImageStage.from_pretrained(ckpt, device, dtype),
            TextStage.from_pretrained(ckpt, device, dtype),
            DiffusionStage.from_pretrained(ckpt, device, dtype, attention_backend=attention_backend,
                                           model=model, **diffusion_options),
            DecodeStage.from_pretrained(ckpt, device, dtype, tiled=tiled_vae),
        )
        if model == "infinitetalk":
            from .infinitetalk import INFINITETALK_LIMITS

            return cls(stages, ckpt, INFINITETALK_LIMITS, model)
        return cls(stages, ckpt)

    async def agenerate(self, request: GenerationRequest, progress: Optional[ProgressCallback] = None) -> GenerationResult:
        if self.model == "infinitetalk":
            from . import infinitetalk

            return await infinitetalk.generate(request, self.stages, progress, self.limits)
        if request.video is not None:
            from .api import InputError

            raise InputError("condition_video", "video-to-video needs the InfiniteTalk model; this pipeline runs MultiTalk")
        return await generate(request, self.stages, progress, self.limits)

    def generate(self, request: GenerationRequest, progress: Optional[ProgressCallback] = None) -> GenerationResult:
        return asyncio.run(self.agenerate(request, progress))
