"""The chunk loop's ``Stages`` protocol (``multitalk.generation.protocol``) over deployment handles.

Methods return handles without awaiting. The encoders' handles are Serve responses, which
may be awaited more than once; the DiT call takes them by reference and its replica fetches
them (``deployments/by_reference.py``, which says why not Serve's own chaining), so they
travel from deployment to deployment without a round trip through the ingress. The DiT call
is streamed (per-step progress), so its handle is an asyncio task that consumes the stream
and holds the latents; the decoder call awaits it first (the latents pass through the ingress, a few MB per chunk). The decoder hands back
the chunk's frames as uint8 and its motion frames as an object reference, which the next
chunk's encoder call resolves: the float frames never pass through the ingress. Both calls
are re-sent in place when their replica died, within the job's retry budget
(``deployments/retry.py``); when an input of the call is lost (the replica or node that made
it died) the failure goes up and the job is re-run.

One view per job (:meth:`ServeStages.for_job`) tracks its calls in a
:class:`~multitalk.generation.calls.CallTracker` (the in-process stages' tracker too): a call
is forgotten once it has ended or been consumed, so a long job holds no finished chunk's
results, and :meth:`ServeStages.cancel` still reaches every call that may be running.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Optional

from multitalk.generation.calls import CallTracker

from .by_reference import by_reference
from .retry import RetryBudget

logger = logging.getLogger("multitalk.serve")


async def fetch(response) -> Any:
    """``await response``; cancelled while waiting, the request is cancelled too."""
    try:
        return await response
    except asyncio.CancelledError:
        response.cancel()
        raise


class ServeStages:
    def __init__(self, audio, image, text, diffusion, decode, speech=None, shared: Optional[dict] = None,
                 job_id: Optional[str] = None, retries: Optional[RetryBudget] = None):
        self.audio, self.image, self.text, self.diffusion, self.decode = audio, image, text, diffusion, decode
        self.speech = speech
        self._kw = {"job_id": job_id} if job_id else {}  # stage replicas log it with their lines
        self._shared = shared if shared is not None else {}
        self.retries = retries if retries is not None else RetryBudget()
        self.calls = CallTracker()

    def for_job(self, job_id: Optional[str] = None, retries: Optional[RetryBudget] = None) -> "ServeStages":
        return ServeStages(self.audio, self.image, self.text, self.diffusion, self.decode, self.speech,
                           self._shared, job_id, retries)

    async def prepare(self) -> None:
        """Fetch what the loop reads synchronously (``lip_sync``) once per ingress."""
        if "lip_sync" not in self._shared:
            self._shared["lip_sync"] = bool(await self.diffusion.lip_sync.remote())

    @property
    def lip_sync(self) -> bool:
        return self._shared.get("lip_sync", True)

    # Calls whose responses go un-awaited into the DiT call.
    def audio_encode(self, speeches):
        return self.calls.add(self.audio.encode.remote(speeches, **self._kw))

    def image_encode(self, cond_pixels, frames):
        return self.calls.add(self.image.encode.remote(cond_pixels, frames, **self._kw))

    def text_encode(self, prompt, negative_prompt):
        return self.calls.add(self.text.encode.remote(prompt, negative_prompt, **self._kw))

    def reference_encode(self, reference, motion_pixels, frames):
        return self.calls.add(self.image.encode_reference.remote(reference, motion_pixels, frames, **self._kw))

    # Calls whose results the loop reads.
    def speech_synthesize(self, speech):
        return self.calls.start(fetch(self.speech.synthesize.remote(speech, **self._kw)))

    def diffusion_sample(self, job, audio, image, text, on_step=None):
        async def sample_once(inputs):
            stream = self.diffusion.options(stream=True).sample.remote(job, *inputs, **self._kw)
            latents = None
            try:
                async for event in stream:
                    if event["event"] == "step":
                        if on_step is not None:
                            on_step(event["step"], event["total"])
                    elif event["event"] == "started":
                        if on_step is not None:
                            on_step(0, 0)
                    elif event["event"] == "result":
                        latents = event["latents"]
            except asyncio.CancelledError:
                stream.cancel()
                raise
            if latents is None:
                raise RuntimeError("diffusion stream ended without latents")
            return latents

        async def sample():
            # A failure to place an encoder call is the input's (a lost input: the job is re-run),
            # so the references are taken once, outside the in-place retries of the DiT call.
            inputs = [await by_reference(value, what) for value, what in (
                (audio, "audio features"), (image, "image conditioning"), (text, "text embeddings"))]
            return await self.retries.run("diffusion call", lambda: sample_once(inputs), resend=True)

        return self.calls.start(sample(), consumes=(audio, image, text))

    def vae_decode(self, latents, request):
        async def decode():
            # A streamed DiT result is an asyncio task holding the latents: wait for it here.
            resolved = await latents if isinstance(latents, asyncio.Future) else latents
            return await self.retries.run(
                "decode call", lambda: fetch(self.decode.decode_chunk.remote(resolved, request, **self._kw)),
                resend=True)

        return self.calls.start(decode(), consumes=(latents,))

    def cancel(self) -> None:
        """Best-effort cancel of every call of this job that may still be running."""
        self.calls.cancel()
