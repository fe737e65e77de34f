"""The driver's ``Stages`` protocol (``multitalk.driver``) over deployment handles.

Methods return handles without awaiting: Serve ``DeploymentResponse`` objects, which may be
awaited more than once and, passed as top-level arguments into the next stage call, travel
from deployment to deployment without a round trip through the ingress (audio/image/text
into the DiT). The DiT call is streamed (per-step progress), so its handle is an asyncio
task that consumes the stream and holds the latents; the decoder call awaits it first (the
latents pass through the ingress, a few MB per chunk). Both calls are re-sent in place when
their replica died, within the job's retry budget (``deployments/retry.py``).

One view per job (:meth:`ServeStages.for_job`) remembers its in-flight calls so that
:meth:`ServeStages.cancel` stops them when the job is cancelled.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from .retry import RetryBudget

logger = logging.getLogger("multitalk.serve")


class ServeStages:
    def __init__(self, audio, image, text, diffusion, decode, speech=None, _shared: Optional[dict] = None,
                 job_id: Optional[str] = None, retries: Optional[RetryBudget] = None):
        self.audio, self.image, self.text, self.diffusion, self.decode = audio, image, text, diffusion, decode
        self.speech = speech
        self._kw = {"job_id": job_id} if job_id else {}  # stage replicas log it with their lines
        self._shared = _shared if _shared is not None else {}
        self.retries = retries if retries is not None else RetryBudget()
        self._inflight: list[Any] = []
        self._tasks: list[asyncio.Task] = []

    def for_job(self, job_id: Optional[str] = None, retries: Optional[RetryBudget] = None) -> "ServeStages":
        return ServeStages(self.audio, self.image, self.text, self.diffusion, self.decode, self.speech,
                           self._shared, job_id, retries)

    async def prepare(self) -> None:
        """Fetch what the driver reads synchronously (``lip_sync``) once per ingress."""
        if "lip_sync" not in self._shared:
            self._shared["lip_sync"] = bool(await self.diffusion.lip_sync.remote())

    @property
    def lip_sync(self) -> bool:
        return self._shared.get("lip_sync", True)

    def _track(self, response):
        self._inflight.append(response)
        return response

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        return task

    def audio_encode(self, speeches):
        return self._track(self.audio.encode.remote(speeches, **self._kw))

    def image_encode(self, cond_pixels, frames):
        return self._track(self.image.encode.remote(cond_pixels, frames, **self._kw))

    def text_encode(self, prompt, negative_prompt):
        return self._track(self.text.encode.remote(prompt, negative_prompt, **self._kw))

    def reference_encode(self, reference, motion_pixels, frames):
        return self._track(self.image.encode_reference.remote(reference, motion_pixels, frames, **self._kw))

    def speech_synthesize(self, speech):
        return self._track(self.speech.synthesize.remote(speech, **self._kw))

    def diffusion_sample(self, job, audio, image, text, on_step=None):
        async def sample_once():
            stream = self._track(self.diffusion.options(stream=True).sample.remote(job, audio, image, text,
                                                                                 **self._kw))
            latents = None
            try:
                async for event in stream:
                    if event["event"] == "step":
                        if on_step is not None:
                            on_step(event["step"], event["total"])
                    elif event["event"] == "result":
                        latents = event["latents"]
            except asyncio.CancelledError:
                stream.cancel()
                raise
            if latents is None:
                raise RuntimeError("diffusion stream ended without latents")
            return latents

        return self._spawn(self.retries.run("diffusion call", sample_once))

    def vae_decode(self, latents):
        async def decode():
            # A streamed DiT result is an asyncio task holding the latents: wait for it here.
            resolved = await latents if isinstance(latents, asyncio.Future) else latents
            return await self.retries.run(
                "decode call", lambda: self._track(self.decode.decode.remote(resolved, **self._kw)))

        return self._spawn(decode())

    def cancel(self) -> None:
        """Best-effort cancel of every call this job started (finished ones are unaffected)."""
        for task in self._tasks:
            task.cancel()
        for response in self._inflight:
            try:
                response.cancel()
            except Exception:  # noqa: BLE001 - cancelling is best effort
                logger.debug("cancel failed", exc_info=True)
