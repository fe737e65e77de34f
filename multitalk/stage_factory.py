"""Building a stage by name (the one construction path of the in-process pipeline, the
stage deployments and the sequence-parallel rank actors), and the generation loop of
each model.

Free of torch on purpose: a stage class that does not use torch (a test double, a remote
proxy) is built without importing it.
"""
from __future__ import annotations

import importlib
from typing import Any, Optional

# The implementation of each stage by name; a deployment config may name others
# ("module:Class" with the same interface, e.g. a quantised DiT): ``stage_classes``.
STAGE_CLASSES = {
    "audio": "multitalk.stages:AudioStage",
    "image": "multitalk.stages:ImageStage",
    "text": "multitalk.stages:TextStage",
    "diffusion": "multitalk.stages:DiffusionStage",
    "decode": "multitalk.stages:DecodeStage",
    "speech": "multitalk.stages:SpeechStage",
}


def import_attr(path: str):
    """``"package.module:Name"`` → the object."""
    module, _, attr = path.partition(":")
    if not module or not attr:
        raise ValueError(f"expected 'module:Name', got {path!r}")
    return getattr(importlib.import_module(module), attr)


def stage_class(name: str, stage_classes: Optional[dict] = None) -> type:
    """The class of stage ``name`` (a key of :data:`STAGE_CLASSES`, or of ``stage_classes``)."""
    classes = {**STAGE_CLASSES, **(stage_classes or {})}
    if name not in classes:
        raise ValueError(f"unknown stage {name!r}; expected one of {sorted(classes)}")
    return import_attr(classes[name])


def load_stage(name: str, models: Any, device: str = "cpu", dtype: Any = "float32",
               options: Optional[dict] = None, stage_classes: Optional[dict] = None):
    """Build stage ``name`` from a models root (or a ``CheckpointSet``).

    ``options``: that stage's extra ``from_pretrained`` arguments (e.g. for ``diffusion``
    ``batch_guidance``, ``compile``, ``quantize``, ``low_vram``, ``loras``); an unknown
    option fails here, naming it. ``stage_classes``: overrides of :data:`STAGE_CLASSES`.
    """
    return stage_class(name, stage_classes).from_pretrained(models, device=device, dtype=dtype, **(options or {}))


# The generation loop of each model: a module with ``generate(request, stages, progress,
# limits, on_chunk)`` and ``precheck(request, limits)`` (the media checks a service runs at
# submit, so that a bad file is a 4xx then and not a failed job later).
DRIVERS = {
    "multitalk": "multitalk.driver",
    "infinitetalk": "multitalk.infinitetalk",
}


def driver_for(model: str):
    """The generation-loop module of ``model`` (a key of :data:`DRIVERS`)."""
    if model not in DRIVERS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(DRIVERS)}")
    return importlib.import_module(DRIVERS[model])
