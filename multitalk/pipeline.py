"""``MultiTalkPipeline``: the whole model in one process (CLI, tests, benches).

    pipe = MultiTalkPipeline.from_pretrained("/models")
    result = pipe.generate(GenerationRequest(image=png, audio=[wav], prompt="..."))
    open("out.mp4", "wb").write(result.video)

    # text instead of audio (a Kokoro-82M/ folder under the models root):
    speech = SpeechRequest(voices=["af_heart", "am_adam"], script="(s1) Hi there! (s2) Hello.")
    result = pipe.generate(GenerationRequest(image=png, audio=[], speech=speech))

The same stages and driver run under Ray Serve, one deployment per stage.

``from_pretrained(root, model="infinitetalk")`` loads the InfiniteTalk adapters instead of
MultiTalk's and runs :mod:`multitalk.infinitetalk`'s loop (image-to-video, or dubbing a
``video``; requests from :func:`multitalk.infinitetalk.infinitetalk_request` get its defaults).
"""
from __future__ import annotations

import asyncio
from typing import Optional

from .api import GenerationRequest, GenerationResult, Limits, ProgressCallback
from .checkpoints.discovery import CheckpointSet, find_checkpoints
from .generation.local import LocalStages
from .stage_factory import driver_for
from .stages import AudioStage, DecodeStage, DiffusionStage, ImageStage, SpeechStage, TextStage


class MultiTalkPipeline:
    def __init__(self, stages: LocalStages, checkpoints: Optional[CheckpointSet] = None, limits: Limits = Limits(),
                 model: str = "multitalk"):
        self.stages = stages
        self.checkpoints = checkpoints
        self.limits = limits
        self.model = model  # "multitalk" | "infinitetalk"

    @classmethod
    def from_pretrained(cls, models_root: str, device: str = "cpu", dtype: Optional[str] = None,
                        attention_backend: Optional[str] = None, tiled_vae: bool = False,
                        stage_dtypes=None, allow_fp32_dit: bool = False, model: str = "multitalk",
                        **diffusion_options) -> "MultiTalkPipeline":
        """Load every stage from a models root (official or diffusers layout, see ``multitalk check``).

        ``dtype``: every stage's dtype (``None``: each stage's default, the official's on CUDA
        and fp32 on CPU, :mod:`multitalk.precision`); ``stage_dtypes``: per-stage overrides,
        ``{"dit": "bf16", "audio": "fp32"}`` or ``["dit=bf16", ...]``; ``allow_fp32_dit``:
        let an fp32 14B DiT onto a GPU.
        ``diffusion_options``: :meth:`DiffusionStage.from_pretrained` levers (``batch_guidance``,
        ``quantize``, ``low_vram``, ``compile``, ``loras``; InfiniteTalk: ``adapters``).
        ``model``: ``"multitalk"`` or ``"infinitetalk"``.
        """
        from .checkpoints.dit import dit_parameter_count
        from .precision import check_dit_dtype, stage_dtypes as resolve_stage_dtypes

        dt = resolve_stage_dtypes(device, dtype, stage_dtypes)
        ckpt = find_checkpoints(models_root).require_complete()
        adapter = ckpt.components["audio_adapter"]
        # Refused before any stage loads (DiffusionStage checks again on its own).
        check_dit_dtype(dt["dit"], device, dit_parameter_count(ckpt.path("dit"), ckpt.layout("dit"),
                                                              adapter.path if adapter.found else None), allow_fp32_dit)
        stages = LocalStages(
            AudioStage.from_pretrained(ckpt, device, dt["audio"]),
            ImageStage.from_pretrained(ckpt, device, dt["clip"], vae_dtype=dt["vae"]),
            TextStage.from_pretrained(ckpt, device, dt["text"]),
            DiffusionStage.from_pretrained(ckpt, device, dt["dit"], attention_backend=attention_backend,
                                           allow_fp32=allow_fp32_dit, model=model, **diffusion_options),
            DecodeStage.from_pretrained(ckpt, device, dt["vae"], tiled=tiled_vae),
            speech=load_speech_stage(ckpt, device),
        )
        if model == "infinitetalk":
            from .infinitetalk import INFINITETALK_LIMITS

            return cls(stages, ckpt, INFINITETALK_LIMITS, model)
        return cls(stages, ckpt)

    @property
    def voices(self) -> list[str]:
        """Text-to-speech voices (empty without a Kokoro-82M folder)."""
        return self.stages.speech.voices if self.stages.speech is not None else []

    async def agenerate(self, request: GenerationRequest, progress: Optional[ProgressCallback] = None,
                        on_chunk=None, as_file: bool = False) -> GenerationResult:
        """``on_chunk``: see :func:`multitalk.driver.generate` (each chunk's fMP4 segment as it is done).
        The mp4 comes back as bytes (``result.video``), or with ``as_file`` as the file the loop
        wrote (``result.video_file``, removed by ``result.release()``)."""
        result = await driver_for(self.model).generate(request, self.stages, progress, self.limits, on_chunk=on_chunk)
        if not as_file and result.video is None:
            result.video = result.video_file.read_bytes()
            result.release()
            result.video_file = None
        return result

    def generate(self, request: GenerationRequest, progress: Optional[ProgressCallback] = None,
                 on_chunk=None, as_file: bool = False) -> GenerationResult:
        return asyncio.run(self.agenerate(request, progress, on_chunk, as_file))


def load_speech_stage(ckpt: CheckpointSet, device: str = "cpu") -> Optional[SpeechStage]:
    """The text-to-speech stage when the models root has a Kokoro-82M folder, else ``None``
    (jobs that give text are then refused with an :class:`~multitalk.api.InputError`)."""
    speech = ckpt.components.get("speech")
    return SpeechStage.from_pretrained(ckpt, device) if speech is not None and speech.found else None
