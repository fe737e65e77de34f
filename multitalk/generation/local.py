"""The stages in this process: :class:`LocalStages`, the :class:`~.protocol.Stages` of
``MultiTalkPipeline`` (CLI, tests, benches)."""
from __future__ import annotations

import asyncio
from typing import Any, Optional

from ..api import InputError
from ..utils.step_stream import StepStream
from .calls import CallTracker
from .protocol import resolve


class LocalStages:
    """:class:`~.protocol.Stages` over in-process stage objects; each call runs in a worker thread.

    Handles are asyncio tasks. :meth:`for_job` gives a view with its own
    :class:`~.calls.CallTracker`, so cancelling one job (:meth:`cancel`) stops its calls (the
    sampler at its next step) and leaves the other jobs sharing these stages alone.
    """

    def __init__(self, audio, image, text, diffusion, decode, speech=None):
        self.audio, self.image, self.text, self.diffusion, self.decode = audio, image, text, diffusion, decode
        self.speech = speech  # SpeechStage, or None without a Kokoro-82M folder
        self.calls = CallTracker()

    @property
    def lip_sync(self) -> bool:
        return bool(self.diffusion.lip_sync)

    def for_job(self, job_id: Optional[str] = None, retries: Any = None) -> "LocalStages":
        return LocalStages(self.audio, self.image, self.text, self.diffusion, self.decode, self.speech)

    async def prepare(self) -> None:
        return None  # everything is in this process already

    def cancel(self) -> None:
        self.calls.cancel()

    def _spawn(self, fn, *args) -> "asyncio.Future":
        async def run():
            resolved = [await resolve(a) for a in args]
            return await asyncio.to_thread(fn, *resolved)

        return self.calls.start(run(), consumes=args)

    def audio_encode(self, speeches):
        return self._spawn(self.audio.encode, speeches)

    def image_encode(self, cond_pixels, frames):
        return self._spawn(self.image.encode, cond_pixels, frames)

    def reference_encode(self, reference, motion_pixels, frames):
        return self._spawn(self.image.encode_reference, reference, motion_pixels, frames)

    def text_encode(self, prompt, negative_prompt):
        return self._spawn(self.text.encode, prompt, negative_prompt)

    def diffusion_sample(self, job, audio, image, text, on_step=None):
        async def run():
            resolved = [await resolve(h) for h in (audio, image, text)]
            if on_step is not None:
                on_step(0, 0)
            # Cancelling this task stops the sampler thread at its next step (StepStream).
            stream = StepStream(lambda step: self.diffusion.sample(job, *resolved, step))
            async for event in stream:
                if on_step is not None:
                    on_step(event.step, event.total)
            return stream.result

        return self.calls.start(run(), consumes=(audio, image, text))

    def vae_decode(self, latents, request):
        return self._spawn(self.decode.decode_chunk, latents, request)

    def speech_synthesize(self, speech):
        if self.speech is None:
            raise InputError(speech.text_field, "text to speech needs a Kokoro-82M folder (config.json, "
                                                "kokoro-v1_0.pth, voices/) under the models root; none was found")
        return self._spawn(self.speech.synthesize, speech)
