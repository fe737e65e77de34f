"""Helpers every model replica uses (stage and rank actors alike): which stage class to
load, device/dtype from config, torch threads pinned to the replica's CPU share, and
moving results to CPU before they leave the replica.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Optional

# Default implementation of each stage; ``settings["stage_classes"]`` may name others
# ("module:Class" with the same interface, e.g. a quantised DiT).
DEFAULT_STAGE_CLASSES = {
    "audio": "multitalk.stages:AudioStage",
    "image": "multitalk.stages:ImageStage",
    "text": "multitalk.stages:TextStage",
    "diffusion": "multitalk.stages:DiffusionStage",
    "decode": "multitalk.stages:DecodeStage",
}


class StageCancelled(Exception):
    """Raised inside the sampler thread when the request that started it was cancelled."""


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


def pin_torch_threads(settings: dict) -> None:
    """torch threads = this replica's CPU share, rounded up (``settings["torch_threads"]`` or
    ``OMP_NUM_THREADS`` override): replicas sharing a node must not each start one thread
    per core, or a few concurrent jobs oversubscribe the CPUs and every stage slows down."""
    torch = sys.modules.get("torch")
    if torch is None:
        return
    threads = settings.get("torch_threads")
    if not threads and "OMP_NUM_THREADS" not in os.environ:
        import math

        import ray

        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1.0)
        threads = max(1, math.ceil(cpus))
    if threads:
        torch.set_num_threads(int(threads))
