"""LoRA files for the DiT (the official ``--lora_dir`` / ``--lora_scale``), merged into the weights.

The distillation LoRAs MultiTalk users run (FusionX, lightx2v) cut sampling to 4-8 steps
with text guidance 1, i.e. two DiT passes per step instead of three: about 7-10x fewer
forwards per clip. They ship as safetensors with the official DiT names under a
``diffusion_model.`` prefix:

* ``<param>.lora_down.weight`` ``[r, in]`` + ``<param>.lora_up.weight`` ``[out, r]``
  (``lora_A``/``lora_B`` accepted too): ``weight += scale · up @ down``;
* ``<param>.diff`` (a full weight delta) and ``<param>.diff_b`` (a bias delta):
  ``+= scale · diff``;
* ``<param>.alpha``: ignored, as the official ``WanLoraWrapper`` ignores it (its merge is
  ``up @ down · scale`` with no ``alpha / rank`` factor; matching it keeps the numbers the
  LoRA authors tuned for).

Merging is strict where the official wrapper is silent: a key naming no parameter of the
model, or a delta of the wrong shape, raises :class:`CheckpointError` naming it; a file with
nothing to merge is an error too. The product is computed in float32 (the official one
runs in the parameter dtype on GPUs) and added in the parameter's dtype.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..modules.loading import CheckpointError, open_tensors

logger = logging.getLogger(__name__)

_PREFIXES = ("diffusion_model.", "model.diffusion_model.")
_PAIRS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"))


@dataclass
class LoraReport:
    """What a merge did: ``merged`` parameter names, ``ignored`` file keys (``alpha``)."""

    path: str
    scale: float
    merged: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _param_name(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


@torch.no_grad()
def merge_lora(model: torch.nn.Module, path: str | os.PathLike, scale: float = 1.0) -> LoraReport:
    """Add the LoRA at ``path`` (safetensors) times ``scale`` into ``model``'s weights, in place."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}")
    with open_tensors(path) as items:  # tensors are read lazily: merge while the file is open
        return _merge(model, path, {key: load for key, load, _ in items}, float(scale))


def _merge(model: torch.nn.Module, path: Path, tensors: dict, scale: float) -> LoraReport:
    params = dict(model.named_parameters())
    report = LoraReport(str(path), scale)
    unmatched: list[str] = []
    used: set[str] = set()

    def target(key: str, suffix: str, replacement: str) -> str:
        name = _param_name(key)[: -len(suffix)] + replacement
        if name not in params:
            raise CheckpointError(f"{path}: LoRA key {key!r} names {name!r}, which the DiT does not have")
        return name

    def add(name: str, delta: torch.Tensor, key: str) -> None:
        param = params[name]
        if tuple(delta.shape) != tuple(param.shape):
            raise CheckpointError(f"{path}: LoRA key {key!r} gives a delta of shape {tuple(delta.shape)} for "
                                  f"{name!r} of shape {tuple(param.shape)}")
        param.add_((delta.float().to(param.device) * scale).to(param.dtype))
        report.merged.append(name)

    for key in sorted(tensors):
        if key in used:
            continue
        for down_suffix, up_suffix in _PAIRS:
            if key.endswith(down_suffix):
                up_key = key[: -len(down_suffix)] + up_suffix
                if up_key not in tensors:
                    raise CheckpointError(f"{path}: {key!r} has no matching {up_key!r}")
                name = target(key, down_suffix, ".weight")
                down, up = tensors[key]().float(), tensors[up_key]().float()
                add(name, up.to(params[name].device) @ down.to(params[name].device), key)
                used.update((key, up_key))
                break
        else:
            if key.endswith(".diff_b"):
                add(target(key, ".diff_b", ".bias"), tensors[key](), key)
            elif key.endswith(".diff"):
                add(target(key, ".diff", ".weight"), tensors[key](), key)
            elif key.endswith(".alpha"):
                report.ignored.append(key)
            elif any(key.endswith(up) for _, up in _PAIRS):
                continue  # an up half whose down half is missing: reported below
            else:
                unmatched.append(key)
            used.add(key)
    unmatched += [k for k in sorted(tensors) if k not in used and k not in unmatched]
    if unmatched:
        shown = ", ".join(repr(k) for k in unmatched[:5])
        raise CheckpointError(f"{path}: {len(unmatched)} key(s) are not LoRA weights for the DiT: {shown}")
    if not report.merged:
        raise CheckpointError(f"{path}: nothing to merge (expected diffusion_model.<param>.lora_down/lora_up, "
                              f".diff or .diff_b keys)")
    logger.info("LoRA %s (scale %g): %d parameters merged, %d alpha keys ignored", path.name, scale,
                len(report.merged), len(report.ignored))
    return report
