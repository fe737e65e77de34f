"""Stage deployments: each a thin wrapper owning one ``multitalk.stages`` object.

Every method runs the blocking torch work in a worker thread so the replica's event loop
stays free: newer Ray health checks mark a replica whose loop is blocked as unhealthy. An
``asyncio.Lock`` keeps one computation per replica at a time (the model objects are not
meant for concurrent use, and the GPU is the bottleneck anyway); extra requests wait in
the replica up to ``max_ongoing_requests``.

Results are moved to CPU before they leave the replica (in the worker thread: a copy off the
GPU waits for the device, and nothing blocking runs on the replica's event loop): a CUDA
tensor in a reply would be rebuilt on a CUDA device on the receiving side, which the ingress
does not have.
Resources (num_gpus, replicas, autoscaling) come from the serve config, not from here;
what each replica loads comes from the app's :class:`~deployments.app_args.StageSettings`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, Callable, Optional

from ray import serve

from multitalk.utils.step_stream import StepStream

from .app_args import StageSettings
from .by_reference import resolve
from .metrics import JOB_LOG_FIELD
from .replica import load_replica_stage, to_cpu

logger = logging.getLogger("multitalk.serve")


class _StageReplica:
    """Loads one stage object (``stage_name``) from the app's stage settings."""

    stage_name: str = ""

    def __init__(self, settings: Any):
        from . import metrics

        metrics.replica_logging()  # our [job <id>] lines into the replica's Serve log
        metrics.replica_logging("multitalk.checkpoints.remote")  # an s3:// root's mirror, with its timing
        self.settings = StageSettings.model_validate(settings)
        self.stage = load_replica_stage(self.stage_name, self.settings)
        self._lock = asyncio.Lock()
        metrics.watch_gpu_memory()  # GPU memory gauge; nothing without CUDA

    async def _run(self, fn: Callable, *args, job_id: Optional[str] = None):
        async with self._lock:
            t0 = time.monotonic()
            out = await asyncio.to_thread(lambda: to_cpu(fn(*args)))
            if job_id:
                logger.info("[job %s] %s.%s done in %.3f s", job_id, type(self).__name__,
                            getattr(fn, "__name__", "call"), time.monotonic() - t0,
                            extra={JOB_LOG_FIELD: job_id})
            return out

    async def loaded_with(self) -> dict:
        """What this replica was built from: its stage settings, dtype and options (for
        operators and the deploy tests)."""
        from .replica import STAGE_LOADS

        import ray

        dtype, options = self.settings.options_for(self.stage_name)
        ctx = ray.get_runtime_context()
        return {"stage": self.stage_name, "class": type(self.stage).__module__ + ":" + type(self.stage).__name__,
                "dtype": dtype, "options": options, "settings": self.settings.model_dump(mode="json"),
                "replica": serve.get_replica_context().replica_id.unique_id, "loads": STAGE_LOADS[self.stage_name],
                # Where Ray placed it: the node, the resources it holds, the GPU(s) its fraction is of.
                "node_id": ctx.get_node_id(), "resources": ctx.get_assigned_resources(),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

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

    async def encode_reference(self, reference, motion_pixels, frames: int, job_id: Optional[str] = None):
        """InfiniteTalk: a chunk's reference frame and motion frames (``ImageStage.encode_reference``)."""
        return await self._run(self.stage.encode_reference, reference, motion_pixels, frames, job_id=job_id)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=4)
class TextEncoder(_StageReplica):
    """UMT5 prompt embeddings with the library's prompt cache (``TextStage``)."""

    stage_name = "text"

    async def encode(self, prompt: str, negative_prompt: str, job_id: Optional[str] = None):
        return await self._run(self.stage.encode, prompt, negative_prompt, job_id=job_id)


@serve.deployment(ray_actor_options={"num_cpus": 0.5}, max_ongoing_requests=2)
class Diffusion(_StageReplica):
    """The DiT and sampler (``DiffusionStage``); streams per-step progress.

    ``sample`` is a generator: it yields ``{"event": "started"}`` when sampling starts (its
    inputs have arrived), ``{"event": "step", "step": i, "total": n}`` after every sampler
    step and finally ``{"event": "result", "latents": tensor}``. Call it with
    ``handle.options(stream=True)``. Cancelling the request stops the sampler at its next
    step (:class:`~multitalk.utils.step_stream.StepStream`).

    With several ranks (app arg ``parallel``: cfg_degree x sp_degree > 1) this actor holds
    no model; it drives one rank actor per placement-group bundle
    (``deployments/diffusion_parallel.py``).
    """

    stage_name = "diffusion"

    async def __init__(self, settings: Any):
        from .diffusion_parallel import RankGroup, dit_num_heads, validate_parallel
        from .volume import resolve_models_root

        self.settings = StageSettings.model_validate(settings)
        self._par = self.settings.parallel
        self._group = None
        if self._par.ranks <= 1:  # the model loads in a worker thread: the replica's loop stays free
            await asyncio.to_thread(_StageReplica.__init__, self, self.settings)
            return
        from .metrics import replica_logging

        replica_logging()  # our lines (ranks ready, LoRA changes) into this replica's Serve log
        replica_logging("multitalk.checkpoints.remote")
        started = time.monotonic()
        root = await asyncio.to_thread(
            resolve_models_root, {"models_root": self.settings.models_root, "cache_dir": self.settings.cache_dir},
            True, self.settings.device)
        root_s = time.monotonic() - started
        self.settings = self.settings.model_copy(update={"models_root": root})
        validate_parallel(self._par, await asyncio.to_thread(dit_num_heads, root))  # a bad config fails here
        self.stage = None
        self._lock = asyncio.Lock()
        self._group = RankGroup(self.settings, self._par)
        started = time.monotonic()
        await self._group.start()
        logger.info("Diffusion: %d ranks ready (guidance %d x sequence %d: ulysses %d x ring %d); "
                    "models root ready in %.2f s, ranks loaded in %.2f s", self._par.ranks, self._par.cfg_degree,
                    self._par.sp_degree, self._par.ulysses, self._par.ring_degree, root_s,
                    time.monotonic() - started)

    async def reconfigure(self, user_config: dict) -> None:
        """Serve's ``user_config``: ``{"loras": {name: file under the models root}}``, the
        LoRAs jobs may pick (``deployments/live_settings.py``). Applied between two samplings
        (under the sampling lock) on every rank, without reloading the DiT."""
        from .live_settings import check_one_place
        from .volume import resolve_models_root

        user_config = dict(user_config or {})
        unknown = sorted(set(user_config) - {"loras"})
        if unknown:
            raise ValueError(f"Diffusion user_config: unknown keys {unknown}; it takes 'loras' only")
        registry = dict(user_config.get("loras") or {})
        from_args = (self.settings.stage_options.get("diffusion") or {}).get("lora_registry") or {}
        check_one_place({"loras": dict(from_args)} if from_args else {}, user_config, "Diffusion")
        root = await asyncio.to_thread(
            resolve_models_root, {"models_root": self.settings.models_root, "cache_dir": self.settings.cache_dir},
            True, self.settings.device)
        if self._group is None and not hasattr(self.stage, "set_lora_registry"):
            if registry:  # another stage class (stage_classes) without per-request LoRAs
                raise ValueError(f"Diffusion user_config names LoRAs, but {type(self.stage).__name__} "
                                 f"takes none (no set_lora_registry)")
            return
        async with self._lock:
            if self._group is not None:
                changes = await self._group.set_loras(registry, root)
            else:
                changes = await asyncio.to_thread(self.stage.set_lora_registry, registry, root)
        if changes["added"] or changes["removed"]:
            logger.info("Diffusion LoRAs: added %s, removed %s", changes["added"], changes["removed"])

    async def check_health(self) -> None:
        """With ranks: ping every rank; a dead one makes this replica unhealthy (Serve replaces it)."""
        if self._group is not None:
            await self._group.check()

    async def ranks(self) -> dict:
        """This replica's rank actors (tests and debugging)."""
        ctx = serve.get_replica_context()
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
        # The encoders' results come by reference (deployments/by_reference.py); one that is
        # gone fails this call with InputLostError, and the ingress re-runs the job.
        audio, image, text = await asyncio.gather(resolve(audio), resolve(image), resolve(text))
        async with self._lock:  # one sampling per replica; a cancelled one has stopped before the next starts
            yield {"event": "started"}  # the conditioning has arrived: what came before was encoding
            if self._group is not None:  # several ranks in lockstep, rank 0 streams
                async for event in self._group.sample(job, audio, image, text):
                    yield event
                return
            stream = StepStream(lambda on_step: self.stage.sample(job, audio, image, text, on_step))
            async for event in stream:
                yield {"event": "step", "step": event.step, "total": event.total}
            yield {"event": "result", "latents": await asyncio.to_thread(to_cpu, stream.result)}


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=4)
class Speech(_StageReplica):
    """Kokoro-82M text to speech (``SpeechStage``), called only for jobs that give text.

    Text to speech is optional: without a ``Kokoro-82M`` folder under the models root the
    replica still starts, and every call is a 422 naming the text (``/v1/models`` says
    ``speech: found false``), so an audio-only deployment needs no TTS weights.
    """

    stage_name = "speech"

    def __init__(self, settings: Any):
        from multitalk.checkpoints.discovery import MissingCheckpointError

        try:
            _StageReplica.__init__(self, settings)
            self.missing = None
        except MissingCheckpointError as e:
            self.settings, self.stage, self.missing = StageSettings.model_validate(settings), None, str(e)
            self._lock = asyncio.Lock()
            logger.info("Speech: no Kokoro-82M folder (%s); text to speech is unavailable", e)

    async def synthesize(self, speech, job_id: Optional[str] = None):
        if self.stage is None:
            from multitalk.api import InputError

            raise InputError(speech.text_field, "text to speech needs a Kokoro-82M folder (config.json, "
                                                "kokoro-v1_0.pth, voices/) under the models root; none was found")
        return await self._run(self.stage.synthesize, speech, job_id=job_id)

    async def voices(self) -> list[str]:
        return [] if self.stage is None else list(self.stage.voices)


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=2)
class VaeDecoder(_StageReplica):
    """VAE decoder: a chunk's latents to its frames, post-processed here (``DecodeStage.decode_chunk``):
    colour-corrected on this replica's device, the video's frames handed back as uint8, the
    next chunk's motion frames put in the object store, so that the next encoder call reads
    them from there (the ingress only passes the reference on)."""

    stage_name = "decode"

    async def decode_chunk(self, latents, request, job_id: Optional[str] = None):
        return await self._run(self._decode_chunk, latents, request, job_id=job_id)

    def _decode_chunk(self, latents, request):  # in the worker thread
        import ray

        decoded = to_cpu(self.stage.decode_chunk(latents, request))
        if decoded.motion is not None:
            decoded = dataclasses.replace(decoded, motion=ray.put(decoded.motion))
        return decoded
