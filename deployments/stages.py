"""Stage deployments: each a thin wrapper owning one ``multitalk.stages`` object.

Every method runs the blocking torch work in a worker thread (``asyncio.to_thread``) so
the replica's event loop stays free: newer Ray health checks mark a replica whose loop
is blocked as unhealthy. An ``asyncio.Lock`` keeps one computation per replica at a time
(the model objects are not meant for concurrent use, and the GPU is the bottleneck
anyway); extra requests wait in the replica up to ``max_ongoing_requests``.

Results are moved to CPU before they leave the replica: a CUDA tensor in a reply would
be rebuilt on a CUDA device on the receiving side, which the ingress does not have.

:class:`ServeStages` implements the driver's ``Stages`` protocol over the handles.
Resources (num_gpus, replicas, autoscaling) come from the serve config, not from here.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any, Callable, Optional

from ray import serve

from .metrics import JOB_LOG_FIELD
from .replica import (
    DEFAULT_STAGE_CLASSES, StageCancelled, pin_torch_threads, resolve_device, resolve_dtype, to_cpu,
)

logger = logging.getLogger("multitalk.serve")


class _StageReplica:
    """Loads one stage object from the models root given in ``settings``."""

    stage_name: str = ""

    def __init__(self, settings: dict):
        from .service import import_attr
        from .volume import resolve_models_root

        settings = dict(settings or {})
        root = resolve_models_root(settings)
        cls_path = {**DEFAULT_STAGE_CLASSES, **(settings.get("stage_classes") or {})}[self.stage_name]
        stage_cls = import_attr(cls_path)  # imports torch for the real stages
        pin_torch_threads(settings)
        device = resolve_device(settings.get("device"))
        dtype = resolve_dtype(settings.get("dtype", "float32"))
        logger.info("%s: loading %s from %s on %s (%s)", type(self).__name__, cls_path, root, device, dtype)
        # Per-stage extras from the config, e.g. {diffusion: {batch_guidance: true, quantize: int8}}.
        options = (settings.get("stage_options") or {}).get(self.stage_name, {})
        self.stage = stage_cls.from_pretrained(root, device=device, dtype=dtype, **options)
        self._lock = asyncio.Lock()
        from . import metrics

        metrics.watch_gpu_memory()  # GPU memory gauge; nothing without CUDA
        metrics.replica_logging()  # our [job <id>] lines into the replica's Serve log

    async def _run(self, fn: Callable, *args, job_id: Optional[str] = None, **kwargs):
        async with self._lock:
            t0 = time.monotonic()
            out = to_cpu(await asyncio.to_thread(fn, *args, **kwargs))
            if job_id:
                logger.info("[job %s] %s.%s done in %.3f s", job_id, type(self).__name__,
                            getattr(fn, "__name__", "call"), time.monotonic() - t0,
                            extra={JOB_LOG_FIELD: job_id})
            return out

    def check_health(self) -> None:
        """Serve calls this periodically; loading succeeded if we are here."""
        return None


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=4)
class AudioEncoder(_StageReplica):
    """wav2vec2 speech features (``AudioStage``)."""

    stage_name = "audio"

    async def encode(self, speeches, job_id: Optional[str] = None):
        return await self._run(self.stage.encode, speeches, job_id=job_id)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=4)
class ImageEncoder(_StageReplica):
    """CLIP + VAE encoder for the reference image or a chunk's motion frames (``ImageStage``)."""

    stage_name = "image"

    async def encode(self, cond_pixels, frames: int, job_id: Optional[str] = None):
        return await self._run(self.stage.encode, cond_pixels, frames, job_id=job_id)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=4)
class TextEncoder(_StageReplica):
    """UMT5 prompt embeddings with the library's prompt cache (``TextStage``)."""

    stage_name = "text"

    async def encode(self, prompt: str, negative_prompt: str, job_id: Optional[str] = None):
        return await self._run(self.stage.encode, prompt, negative_prompt, job_id=job_id)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=2)
class Diffusion(_StageReplica):
    """The DiT and sampler (``DiffusionStage``); streams per-step progress.

    ``sample`` is a generator: it yields ``{"event": "step", "step": i, "total": n}`` after
    every sampler step and finally ``{"event": "result", "latents": tensor}``. Call it with
    ``handle.options(stream=True)``. Cancelling the request stops the sampler at its next
    step (a Python thread cannot be killed, so the step callback raises instead).
    """

    stage_name = "diffusion"

    async def __init__(self, settings: dict):
        # Several ranks (app arg ``parallel``: cfg_degree x sp_degree > 1): this actor holds no
        # model; it starts one rank actor per placement-group bundle (deployments/diffusion_parallel.py).
        from .diffusion_parallel import ParallelSettings

        self._par = ParallelSettings.from_settings(settings)
        self._group = None
        if self._par.ranks <= 1:
            _StageReplica.__init__(self, settings)
            return
        from .diffusion_parallel import RankGroup, dit_num_heads, validate_parallel
        from .volume import resolve_models_root

        settings = dict(settings or {})
        settings["models_root"] = await asyncio.to_thread(resolve_models_root, settings)
        num_heads = await asyncio.to_thread(dit_num_heads, settings["models_root"])
        validate_parallel(self._par, num_heads)  # a bad configuration fails the replica start here
        self.stage = None
        self._lock = asyncio.Lock()
        self._group = RankGroup(settings, self._par)
        await self._group.start()
        logger.info("Diffusion: %d ranks ready (guidance %d x sequence %d: ulysses %d x ring %d)",
                    self._par.ranks, self._par.cfg_degree, self._par.sp_degree, self._par.ulysses,
                    self._par.ring_degree)

    async def check_health(self) -> None:
        """With ranks: ping every rank; a dead one makes this replica unhealthy (Serve replaces it)."""
        if self._group is not None:
            await self._group.check()

    async def ranks(self) -> dict:
        """This replica's rank actors (tests and debugging)."""
        from ray import serve as _serve

        ctx = _serve.get_replica_context()
        return {"replica": ctx.replica_id.unique_id, "ranks": list(self._group.ranks) if self._group else [],
                "broken": self._group.broken if self._group else None}

    async def lip_sync(self) -> bool:
        """Whether the loaded DiT has the MultiTalk audio adapter."""
        if self._group is not None:
            return self._group.lip_sync
        return bool(getattr(self.stage, "lip_sync", True))

    async def sample(self, job, audio, image, text, job_id: Optional[str] = None):
        if job_id:
            logger.info("[job %s] Diffusion.sample started", job_id, extra={JOB_LOG_FIELD: job_id})
        if self._group is not None:  # sequence parallel: all ranks in lockstep, rank 0 streams
            async with self._lock:
                async for event in self._group.sample(job, audio, image, text):
                    yield event
            return
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def on_step(step: int, total: int) -> None:
            if cancelled.is_set():
                raise StageCancelled()
            loop.call_soon_threadsafe(events.put_nowait, {"event": "step", "step": int(step), "total": int(total)})

        async with self._lock:
            work = asyncio.ensure_future(asyncio.to_thread(self.stage.sample, job, audio, image, text, on_step))
            try:
                while True:
                    getter = asyncio.ensure_future(events.get())
                    done, _ = await asyncio.wait({work, getter}, return_when=asyncio.FIRST_COMPLETED)
                    if getter in done:
                        yield getter.result()
                        continue
                    getter.cancel()
                    while not events.empty():  # steps reported just before the end
                        yield events.get_nowait()
                    latents = to_cpu(work.result())
                    yield {"event": "result", "latents": latents}
                    return
            finally:
                if not work.done():
                    cancelled.set()
                    # Hold the lock until the thread notices, so the next request does not
                    # share the GPU with a zombie sampler.
                    await asyncio.gather(work, return_exceptions=True)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=2)
class VaeDecoder(_StageReplica):
    """VAE decoder: latents to frames (``DecodeStage``)."""

    stage_name = "decode"

    async def decode(self, latents, job_id: Optional[str] = None):
        return await self._run(self.stage.decode, latents, job_id=job_id)


# Bounded retry of a Diffusion or VaeDecoder chunk call that failed with a retryable error (a
# dead sequence-parallel rank or a dead replica, see deployments/diffusion_parallel.py): the
# broken replica is replaced by Serve meanwhile; ~45 s of back-off in all. Only the failed
# chunk's call is re-sent, not the whole job. (Encoder calls are not retried here: their
# responses travel un-awaited into the DiT call; the job-level retry covers them.)
STAGE_RETRIES = 6


def stage_retry_delay(exc: BaseException, attempt: int) -> Optional[float]:
    """Seconds to wait before re-sending a failed stage call, or ``None``: do not retry."""
    from .diffusion_parallel import is_retryable

    if attempt >= STAGE_RETRIES or not is_retryable(exc):
        return None
    return float(min(2 ** attempt, 15))


class ServeStages:
    """The driver's ``Stages`` protocol (``multitalk.driver``) over deployment handles.

    Methods return handles without awaiting: Serve ``DeploymentResponse`` objects, which
    may be awaited more than once and, passed as top-level arguments into the next stage
    call, travel from deployment to deployment without a round trip through the ingress
    (audio/image/text into the DiT). The DiT call is streamed (per-step progress), so its
    handle is an asyncio task that consumes the stream and holds the latents; the decoder
    call awaits it first (the latents pass through the ingress, a few MB per chunk). Both
    calls are re-sent in place when their replica died (:func:`stage_retry_delay`).

    One instance per job (:meth:`for_job`) remembers its in-flight calls so that
    :meth:`cancel` can stop them when the job is cancelled.
    """

    def __init__(self, audio, image, text, diffusion, decode, _shared: Optional[dict] = None,
                 job_id: Optional[str] = None):
        self.audio, self.image, self.text, self.diffusion, self.decode = audio, image, text, diffusion, decode
        self._kw = {"job_id": job_id} if job_id else {}  # stage replicas log it with their lines
        self._shared = _shared if _shared is not None else {}
        self._inflight: list[Any] = []
        self._tasks: list[asyncio.Task] = []

    def for_job(self, job_id: Optional[str] = None) -> "ServeStages":
        return ServeStages(self.audio, self.image, self.text, self.diffusion, self.decode, self._shared, job_id)

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

    def audio_encode(self, speeches):
        return self._track(self.audio.encode.remote(speeches, **self._kw))

    def image_encode(self, cond_pixels, frames):
        return self._track(self.image.encode.remote(cond_pixels, frames, **self._kw))

    def text_encode(self, prompt, negative_prompt):
        return self._track(self.text.encode.remote(prompt, negative_prompt, **self._kw))

    async def _with_retries(self, what: str, call: Callable[[], Any]) -> Any:
        """``await call()``, re-sent while it fails with a retryable error (:func:`stage_retry_delay`)."""
        attempt = 0
        while True:
            try:
                return await call()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - only retryable failures are retried
                delay = stage_retry_delay(e, attempt)
                if delay is None:
                    raise
                attempt += 1
                logger.warning("%s call failed (%s: %s); retry %d/%d in %.0f s", what, type(e).__name__,
                               str(e)[:200], attempt, STAGE_RETRIES, delay)
                await asyncio.sleep(delay)

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._tasks.append(task)
        return task

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

        return self._spawn(self._with_retries("diffusion", sample_once))

    def vae_decode(self, latents):
        async def decode():
            # A streamed DiT result is an asyncio task holding the latents: wait for it here.
            resolved = await latents if isinstance(latents, asyncio.Future) else latents
            return await self._with_retries(
                "decode", lambda: self._track(self.decode.decode.remote(resolved, **self._kw)))

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
