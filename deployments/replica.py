"""Helpers every model replica uses (stage and rank actors alike): building its stage from
the app's stage settings, device/dtype from config, torch threads pinned to the replica's
CPU share, and moving results to CPU before they leave the replica.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import os
import sys
import time
from typing import Any, Callable, Optional

logger = logging.getLogger("multitalk.serve")

# Stages built in this process, by stage name: a replica or rank actor builds its stage
# once, so a count above 1 would mean a reload (the per-request LoRA tests check it).
STAGE_LOADS: "collections.Counter[str]" = collections.Counter()

def to_cpu(obj: Any) -> Any:
    """Recursively move tensors to CPU (tensors, dataclasses, lists/tuples/dicts)."""
    torch = sys.modules.get("torch")
    if torch is None:  # nothing imported torch, so there are no tensors to move
        return obj
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu() if obj.device.type != "cpu" else obj
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_cpu(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.init}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    return obj


def resolve_dtype(name: Any):
    """torch dtype for a config name. Stage classes that do not use torch (nothing has
    imported it) get the name as is, so replicas do not pay for importing torch."""
    torch = sys.modules.get("torch")
    if torch is None or not isinstance(name, str):
        return name
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


def resolve_device(setting: Optional[str]) -> str:
    if setting and setting != "auto":
        return setting
    torch = sys.modules.get("torch")
    if torch is None:
        return "cpu"

    return "cuda" if torch.cuda.is_available() else "cpu"


def pin_torch_threads(settings) -> None:
    """torch threads = this replica's CPU share, rounded up (``settings.torch_threads`` or
    ``OMP_NUM_THREADS`` override): replicas sharing a node must not each start one thread
    per core, or a few concurrent jobs oversubscribe the CPUs and every stage slows down."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    threads = settings.torch_threads
    if not threads and "OMP_NUM_THREADS" not in os.environ:
        import math

        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        threads = max(1, math.ceil(cpus))
    if threads:
        torch.set_num_threads(int(threads))


def load_replica_stage(name: str, settings, adjust: Optional[Callable[[dict], dict]] = None):
    """Build stage ``name`` from the app's :class:`~deployments.app_args.StageSettings`:
    the models root resolved on this node (an ``s3://`` root is mirrored here once), the
    device, that stage's dtype and options (``adjust`` may rewrite the options, e.g. a
    sequence-parallel rank's), through the library's one construction path
    (:func:`multitalk.stage_factory.load_stage`)."""
    from multitalk.stage_factory import load_stage, stage_class

    from .volume import resolve_models_root

    cls = stage_class(name, settings.stage_classes)  # imports torch for the real stages
    device = resolve_device(settings.device)  # `auto` decided here, before the weights are chosen
    started = time.monotonic()
    root = resolve_models_root({"models_root": settings.models_root, "cache_dir": settings.cache_dir},
                               device=device)
    root_s = time.monotonic() - started  # an s3:// root: this node's mirror (downloaded once per node)
    pin_torch_threads(settings)  # before loading: the load itself runs on these threads
    dtype, options = settings.options_for(name)
    if adjust is not None:
        options = adjust(options)
    logger.info("%s stage: loading %s from %s on %s (%s), options %s", name, cls.__name__, root, device, dtype,
                options)
    STAGE_LOADS[name] += 1
    started = time.monotonic()
    stage = load_stage(name, root, device=device, dtype=resolve_dtype(dtype), options=options,
                       stage_classes=settings.stage_classes)
    # Cold start figures (bench/cluster.py reads them): the models root (mirror) and the load.
    logger.info("%s stage: models root ready in %.2f s, loaded in %.2f s", name, root_s, time.monotonic() - started)
    return stage
