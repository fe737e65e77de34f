"""Multi-GPU Diffusion over Ray: one rank actor per placement-group bundle.

The ``Diffusion`` replica (``deployments/stages.py``) holds no GPU itself when it has more
than one rank (``parallel.cfg_degree × parallel.sp_degree``): its deployment asks for one
bundle per rank packed on one node (``STRICT_PACK``), the replica actor sits in bundle 0,
and it starts one :class:`RankActor` per bundle. The ranks form a ``torch.distributed``
group (nccl on CUDA, gloo on CPU; rendezvous on a port rank 0 picks free on its node), each
loads the DiT once; ``cfg_degree`` groups of ranks split each step's guidance passes
(:class:`multitalk.distributed.GuidanceParallel`) and the ``sp_degree`` ranks of a group
split each forward's tokens (:class:`multitalk.distributed.SequenceParallel`). Every
sampling call runs on all ranks in lockstep (same ``DiffusionStage.sample``); rank 0
streams the step events and returns the latents.

Faults: a rank that dies breaks the group for good. The call in flight fails with
:class:`DiffusionRanksFailed` (retryable: the ingress re-issues the chunk), the surviving
ranks are killed (they may be stuck in a collective), and ``check_health`` raises from then
on so Serve replaces the replica (a new placement group and a fresh group of ranks).

Settings (app arg ``parallel``, passed to every stage; only Diffusion reads it)::

    parallel: {sp_degree: 4, ulysses_degree: 4, ring_degree: 1, backend: auto,
               cpus_per_rank: 1, gpus_per_rank: 1, replica_cpus: 0.5, health_check_period_s: 2}
    parallel: {cfg_degree: 3}                 # 3 GPUs: one guidance pass each
    parallel: {cfg_degree: 2, sp_degree: 2}   # 4 GPUs
"""
from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from typing import Optional

from multitalk.utils.step_stream import StepStream

from .app_args import ParallelSettings, StageSettings
from .retry import TransientStageError

logger = logging.getLogger("multitalk.serve")



class DiffusionRanksFailed(TransientStageError):
    """A sequence-parallel rank died (or the group broke) during or before a call.

    Transient (``deployments.retry``): the replica is unhealthy and will be replaced; the
    same chunk, re-sent, runs on the replacement.
    """


def _wants_gpu(settings) -> bool:
    dev = str(settings.device or "auto")
    if dev == "auto":  # GPUs when the cluster has any (where the app is built)
        try:
            import ray

            return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
        except Exception:  # noqa: BLE001
            return False
    return dev.startswith("cuda")


def deployment_options(settings) -> dict:
    """Serve deployment options for the Diffusion deployment (empty for a single rank).

    ``settings``: the app's :class:`~deployments.app_args.StageSettings` (or its dict).
    ``placement_group_bundles``: one bundle of ``{CPU: cpus_per_rank, GPU: g}`` per rank;
    bundle 0 also holds the replica actor, so it gets ``replica_cpus`` more CPU.
    """
    settings = StageSettings.model_validate(settings)
    par = settings.parallel
    if par.ranks <= 1:
        return {}
    g = par.gpus("cuda" if _wants_gpu(settings) else "cpu")
    bundle = {"CPU": float(par.cpus_per_rank)}
    if g:
        bundle["GPU"] = float(g)
    first = {**bundle, "CPU": float(par.cpus_per_rank) + float(par.replica_cpus)}
    return {
        "ray_actor_options": {"num_cpus": float(par.replica_cpus), "num_gpus": 0},
        "placement_group_bundles": [first] + [dict(bundle) for _ in range(par.ranks - 1)],
        "placement_group_strategy": "STRICT_PACK",
        "health_check_period_s": par.health_check_period_s,
    }


# --------------------------------------------------------------------------- guards
def dit_num_heads(models_root: str) -> int:
    """The DiT's attention head count, read from its config.json without loading weights."""
    from multitalk.checkpoints.dit import read_dit_config
    from multitalk.checkpoints.discovery import find_checkpoints

    ckpt = find_checkpoints(models_root)
    return int(read_dit_config(ckpt.path("dit"), ckpt.layout("dit"))["num_heads"])


def validate_parallel(par: ParallelSettings, num_heads: int) -> None:
    """Deploy-time guards; raises ``ValueError`` with a message meant for the operator."""
    from multitalk.distributed import validate_sp_degrees

    prefix = (f"Diffusion parallelism (cfg_degree={par.cfg_degree}, sp_degree={par.sp_degree}, "
              f"ulysses_degree={par.ulysses}, ring_degree={par.ring_degree}): ")
    if par.cfg_degree > 3:
        raise ValueError(prefix + f"a step has at most 3 guidance passes, cfg_degree {par.cfg_degree} would leave "
                                  f"ranks idle; use 1, 2 or 3")
    if par.cfg_degree > 1 and par.ring_degree > 1:
        raise ValueError(prefix + "ring attention runs on the world group only and cannot be combined with "
                                  "cfg_degree > 1; use Ulysses (ring_degree 1) inside each guidance group")
    try:
        validate_sp_degrees(num_heads, par.ulysses, par.ring_degree, par.sp_degree)
    except ValueError as e:
        raise ValueError(prefix + str(e)) from None
    if par.ring_degree > 1:
        # The ring kernel needs the same number of tokens on every rank; the sequence is
        # split by whole latent frames, so the frame count must divide evenly.
        if par.latent_frames % par.sp_degree:
            raise ValueError(
                prefix + f"ring attention needs the sequence split evenly, but {par.latent_frames} latent frames "
                f"(81-frame clips; set parallel.latent_frames for other clip lengths) do not divide into "
                f"{par.sp_degree} ranks; use ring_degree 1 (Ulysses only) or a degree dividing {par.latent_frames}"
            )
    if par.latent_frames < par.sp_degree:
        raise ValueError(prefix + f"{par.latent_frames} latent frames cannot give every one of "
                                  f"{par.sp_degree} ranks a frame")


# --------------------------------------------------------------------------- the rank actor
def free_port_on_this_node() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankActor:
    """One sequence-parallel rank: a process with one DiT copy (one GPU on CUDA).

    Ray actor with ``max_concurrency > 1`` so ``ping`` answers while ``sample`` runs.
    """

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.stage = None
        self._cancel = threading.Event()

    def where(self) -> dict:
        import ray

        ctx = ray.get_runtime_context()
        return {"rank": self.rank, "node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(),
                "pid": os.getpid(), "port": free_port_on_this_node() if self.rank == 0 else None}

    def setup(self, master_addr: str, port: int, settings) -> dict:
        """Join the process group and load this rank's DiT (``settings``: the app's
        :class:`~deployments.app_args.StageSettings`)."""
        from datetime import timedelta
        import functools

        import torch
        import torch.distributed as dist

        from multitalk.distributed import GuidanceParallel, SequenceParallel, sp_forward

        from .replica import load_replica_stage, resolve_device

        par = settings.parallel
        device = resolve_device(settings.device)
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "gloo":
            if master_addr in ("127.0.0.1", "localhost"):
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            torch.set_num_threads(max(1, int(par.cpus_per_rank)))
        if device.startswith("cuda"):
            torch.cuda.set_device(0)  # Ray exposes this rank's GPU as device 0
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{port}", rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=300))
        stage = load_replica_stage("diffusion", settings, rank_options)
        sp_group, sp_backend = None, None
        if par.cfg_degree > 1:
            gp = GuidanceParallel(par.cfg_degree, par.sp_degree)
            stage.guidance_parallel, sp_group = gp, gp.sp_group
        if par.sp_degree > 1:
            sp = SequenceParallel(sp_group, ulysses_degree=par.ulysses, ring_degree=par.ring_degree,
                                  backend=par.backend)
            sp.parallelize(stage.model)
            stage.forward_fn = functools.partial(sp_forward, stage.model)
            sp_backend = sp.backend
        self.stage, self._device = stage, device
        self._torch, self._dist = torch, dist
        return {"rank": self.rank, "backend": backend, "sp_backend": sp_backend, "cfg_degree": par.cfg_degree,
                "lip_sync": bool(getattr(stage, "lip_sync", True))}

    def ping(self) -> int:
        return self.rank

    def set_loras(self, registry: dict, root: str) -> dict:
        """The replica's live LoRA set, on this rank's DiT (``DiffusionStage.set_lora_registry``)."""
        return self.stage.set_lora_registry(registry, root)

    def cancel(self) -> None:
        self._cancel.set()

    def _all_ranks_cancel(self) -> bool:
        """Every rank must stop at the same step (else the others hang in a collective):
        agree on the cancel flag with one tiny all-reduce per step."""
        dev = self._device if self._device.startswith("cuda") else "cpu"
        flag = self._torch.tensor([1 if self._cancel.is_set() else 0], device=dev)
        self._dist.all_reduce(flag, op=self._dist.ReduceOp.MAX)
        return bool(int(flag.item()))

    def _stream(self, job, audio, image, text) -> StepStream:
        self._cancel.clear()
        return StepStream(lambda on_step: self.stage.sample(job, audio, image, text, on_step),
                          should_stop=self._all_ranks_cancel)

    def sample(self, job, audio, image, text):
        """Ranks > 0: run the sampler in lockstep; returns nothing (rank 0 has the result)."""
        for _ in self._stream(job, audio, image, text):
            pass
        return None

    def sample_stream(self, job, audio, image, text):
        """Rank 0 (a streaming generator): step events, then ``{"event": "result", ...}``."""
        stream = self._stream(job, audio, image, text)
        for event in stream:
            yield {"event": "step", "step": event.step, "total": event.total}
        yield {"event": "result", "latents": stream.result.float().cpu()}


def rank_options(options: dict) -> dict:
    """A rank's Diffusion options: batched guidance is not combined with multi-rank
    sampling, and compile runs with graph breaks (the all-to-all inside each block's
    attention is one)."""
    options = {k: v for k, v in options.items() if k != "batch_guidance"}
    if options.get("compile"):
        options["compile"] = {**(options["compile"] if isinstance(options["compile"], dict) else {}),
                              "fullgraph": False}
    return options


# --------------------------------------------------------------------------- the group
class RankGroup:
    """The replica's ranks: start, health, lockstep sampling. All methods are async."""

    def __init__(self, settings, par: ParallelSettings):
        self.settings, self.par = StageSettings.model_validate(settings), par
        self.ranks: list = []
        self.broken: Optional[str] = None
        self.info: list[dict] = []

    async def start(self, placement_group=None) -> "RankGroup":
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        par = self.par
        pg = placement_group or ray.util.get_current_placement_group()
        if pg is None:
            raise RuntimeError("a multi-rank Diffusion replica needs to run in a placement group "
                               "(deployment option placement_group_bundles)")
        if len(pg.bundle_specs) < par.ranks:
            raise ValueError(f"the placement group has {len(pg.bundle_specs)} bundles, {par.ranks} ranks "
                             f"(cfg_degree x sp_degree) need one each")
        actor_cls = ray.remote(RankActor)
        for i in range(par.ranks):
            gpus = float(pg.bundle_specs[i].get("GPU", 0))  # the rank takes its bundle's GPU (if any)
            self.ranks.append(actor_cls.options(
                num_cpus=par.cpus_per_rank, num_gpus=gpus, max_concurrency=4, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i, placement_group_capture_child_tasks=False),
            ).remote(i, par.ranks))
        where = await asyncio.gather(*[r.where.remote() for r in self.ranks])
        head = where[0]
        same_node = all(w["node_id"] == head["node_id"] for w in where)
        # STRICT_PACK keeps the ranks on one node: rendezvous over loopback there.
        master = "127.0.0.1" if same_node else head["ip"]
        self.master = (head["ip"], head["port"])
        logger.info("Diffusion: %d ranks, rendezvous %s:%d (rank 0 on %s)", par.ranks, master,
                    head["port"], head["ip"])
        self.info = await asyncio.gather(*[
            r.setup.remote(master, head["port"], self.settings) for r in self.ranks])
        return self

    @property
    def lip_sync(self) -> bool:
        return bool(self.info[0].get("lip_sync", True)) if self.info else True

    async def check(self, timeout: float = 20.0) -> None:
        """Ping every rank; raises (and marks the group broken) if one does not answer."""
        if self.broken:
            raise DiffusionRanksFailed(self.broken)
        try:
            await asyncio.wait_for(asyncio.gather(*[r.ping.remote() for r in self.ranks]), timeout)
        except Exception as e:  # noqa: BLE001 - any failure to answer is a dead rank
            self.fail(f"a sequence-parallel rank does not answer: {type(e).__name__}: {e}")
            raise DiffusionRanksFailed(self.broken) from None

    def fail(self, reason: str) -> None:
        import ray

        if self.broken:
            return
        self.broken = reason
        logger.error("Diffusion SP group broken: %s; killing the remaining ranks", reason)
        for r in self.ranks:  # survivors may be stuck in a collective: they cannot be reused
            try:
                ray.kill(r, no_restart=True)
            except Exception:  # noqa: BLE001
                pass

    async def cancel(self) -> None:
        await asyncio.gather(*[r.cancel.remote() for r in self.ranks], return_exceptions=True)

    async def set_loras(self, registry: dict, root: str) -> dict:
        """Every rank holds the same LoRAs (they sample in lockstep); rank 0's changes."""
        changes = await asyncio.gather(*[r.set_loras.remote(registry, root) for r in self.ranks])
        return changes[0]

    async def sample(self, job, audio, image, text):
        """Async generator of rank 0's events; every rank runs the same sampling."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        if self.broken:
            raise DiffusionRanksFailed(self.broken)
        # One copy for all ranks, serialised off the replica's event loop.
        args = await asyncio.to_thread(lambda: [ray.put(a) for a in (job, audio, image, text)])
        stream = self.ranks[0].sample_stream.options(num_returns="streaming").remote(*args)
        others = [asyncio.ensure_future(_await(r.sample.remote(*args))) for r in self.ranks[1:]]
        events: asyncio.Queue = asyncio.Queue()

        async def pump():
            async for ref in stream:
                await events.put(await ref)
            await events.put(None)

        head = asyncio.ensure_future(pump())
        tasks = [head, *others]
        finished = False
        try:
            while True:
                getter = asyncio.ensure_future(events.get())
                running = {t for t in tasks if not t.done()}
                done, _ = await asyncio.wait({getter, *running}, return_when=asyncio.FIRST_COMPLETED)
                failed = [t for t in done if t is not getter and t.exception() is not None]
                if failed:
                    getter.cancel()
                    await self._raise_failure(failed[0].exception(), tasks)
                if getter not in done:
                    getter.cancel()
                    continue
                item = getter.result()
                if item is None:  # rank 0 finished: the others end with it (same steps)
                    await asyncio.gather(*others)
                    break
                yield item
            finished = True
        except (RayActorError, RayTaskError) as e:
            await self._raise_failure(e, tasks)
        finally:
            if not finished and not self.broken and not all(t.done() for t in tasks):
                # Cancelled by the caller: all ranks stop at the same step.
                await self.cancel()
                _, pending = await asyncio.wait(tasks, timeout=60)
                if pending:
                    self.fail("ranks did not stop after a cancel")
                    for t in pending:
                        t.cancel()

    async def _raise_failure(self, exc: BaseException, tasks) -> None:
        from ray.exceptions import RayActorError

        if isinstance(exc, RayActorError) or not isinstance(exc, Exception):
            self.fail(f"rank actor died: {type(exc).__name__}: {str(exc)[:300]}")
            raise DiffusionRanksFailed(self.broken) from None
        # An error raised by the sampler itself: deterministic ones (bad input) happen on
        # every rank before any collective; wait for the others to settle before deciding.
        _, pending = await asyncio.wait([t for t in tasks if not t.done()] or [asyncio.sleep(0)], timeout=15)
        dead = [t for t in tasks if t.done() and isinstance(t.exception(), RayActorError)]
        if pending or dead:
            self.fail(f"ranks diverged after an error on one of them: {type(exc).__name__}: {str(exc)[:300]}")
            raise DiffusionRanksFailed(self.broken) from None
        cause = getattr(exc, "cause", None)
        raise (cause if isinstance(cause, Exception) else exc)


async def _await(ref):
    return await ref

