"""LoRA files for the DiT (the official ``--lora_dir`` / ``--lora_scale``): reading and merging.

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

:func:`read_lora` parses a file strictly against a model where the official wrapper is
silent: a key naming no parameter of the model, or a delta of the wrong shape, raises
:class:`CheckpointError` naming it; a file with nothing to apply is an error too. The
parsed :class:`LoraFile` is what both users apply: :func:`merge_lora` (into the weights, at
load) and :mod:`multitalk.modules.lora_runtime` (per request, without touching the base).
Merged products are computed in float32 (the official one runs in the parameter dtype on
GPUs) and added in the parameter's dtype.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

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


@dataclass
class LoraDelta:
    """One parameter's change from one file: low rank ``up [out, r] @ down [r, in]`` or
    ``full`` (the parameter's shape). ``key`` is the file key it came from (for messages)."""

    param: str
    key: str
    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    full: Optional[torch.Tensor] = None

    @property
    def low_rank(self) -> bool:
        return self.full is None

    @property
    def rank(self) -> int:
        return 0 if self.down is None else int(self.down.shape[0])

    def dense(self, device: "torch.device | str") -> torch.Tensor:
        """The delta as a float32 tensor of the parameter's shape, on ``device``."""
        if self.full is not None:
            return self.full.float().to(device)
        return self.up.float().to(device) @ self.down.float().to(device)


@dataclass
class LoraFile:
    """A LoRA file checked against one model: its deltas in file-key order."""

    path: str
    deltas: list[LoraDelta]
    ignored: list[str] = field(default_factory=list)

    @property
    def rank(self) -> int:
        return max((d.rank for d in self.deltas), default=0)

    @property
    def nbytes(self) -> int:
        tensors = [t for d in self.deltas for t in (d.down, d.up, d.full) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
        return digest.hexdigest()


def _param_name(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def read_lora(model: torch.nn.Module, path: str | os.PathLike,
              only: Optional[Callable[[str], bool]] = None) -> Optional[LoraFile]:
    """Read the LoRA at ``path`` (safetensors) and check every key and shape against ``model``.

    ``only``: read just the keys whose parameter name it accepts (e.g. an InfiniteTalk
    adapter's part of a LoRA); ``None`` is returned when it accepts none of them.
    Raises :class:`CheckpointError` naming the first problem; ``model`` is not changed.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"LoRA file not found: {path}")
    with open_tensors(path) as items:
        tensors = {key: load for key, load, _ in items if only is None or only(_param_name(key))}
        if only is not None and not tensors:
            return None
        return _parse(model, path, tensors)


def _parse(model: torch.nn.Module, path: Path, tensors: dict) -> LoraFile:
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    lora = LoraFile(str(path), [])
    unmatched: list[str] = []
    used: set[str] = set()

    def target(key: str, suffix: str, replacement: str) -> str:
        name = _param_name(key)[: -len(suffix)] + replacement
        if name not in shapes:
            raise CheckpointError(f"{path}: LoRA key {key!r} names {name!r}, which the DiT does not have")
        return name

    def wrong_shape(key: str, name: str, shape) -> CheckpointError:
        return CheckpointError(f"{path}: LoRA key {key!r} gives a delta of shape {tuple(shape)} for "
                               f"{name!r} of shape {shapes[name]}")

    for key in sorted(tensors):
        if key in used:
            continue
        for down_suffix, up_suffix in _PAIRS:
            if key.endswith(down_suffix):
                up_key = key[: -len(down_suffix)] + up_suffix
                if up_key not in tensors:
                    raise CheckpointError(f"{path}: {key!r} has no matching {up_key!r}")
                name = target(key, down_suffix, ".weight")
                down, up = tensors[key](), tensors[up_key]()
                if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                    raise CheckpointError(f"{path}: {key!r} {tuple(down.shape)} and {up_key!r} {tuple(up.shape)} "
                                          f"are not a [r, in] / [out, r] pair")
                if (up.shape[0], down.shape[1]) != shapes[name]:
                    raise wrong_shape(key, name, (up.shape[0], down.shape[1]))
                lora.deltas.append(LoraDelta(name, key, down=down, up=up))
                used.update((key, up_key))
                break
        else:
            if key.endswith(".diff_b") or key.endswith(".diff"):
                suffix, replacement = (".diff_b", ".bias") if key.endswith(".diff_b") else (".diff", ".weight")
                name = target(key, suffix, replacement)
                full = tensors[key]()
                if tuple(full.shape) != shapes[name]:
                    raise wrong_shape(key, name, full.shape)
                lora.deltas.append(LoraDelta(name, key, full=full))
            elif key.endswith(".alpha"):
                lora.ignored.append(key)
            elif any(key.endswith(up) for _, up in _PAIRS):
                continue  # an up half whose down half is missing: reported below
            else:
                unmatched.append(key)
            used.add(key)
    unmatched += [k for k in sorted(tensors) if k not in used and k not in unmatched]
    if unmatched:
        shown = ", ".join(repr(k) for k in unmatched[:5])
        raise CheckpointError(f"{path}: {len(unmatched)} key(s) are not LoRA weights for the DiT: {shown}")
    if not lora.deltas:
        raise CheckpointError(f"{path}: nothing to merge (expected diffusion_model.<param>.lora_down/lora_up, "
                              f".diff or .diff_b keys)")
    return lora


@torch.no_grad()
def merge_lora(model: torch.nn.Module, path: "str | os.PathLike | LoraFile", scale: float = 1.0) -> LoraReport:
    """Add the LoRA at ``path`` (safetensors, or an already read :class:`LoraFile`) times
    ``scale`` into ``model``'s weights, in place."""
    lora = path if isinstance(path, LoraFile) else read_lora(model, path)
    scale = float(scale)
    params = dict(model.named_parameters())
    report = LoraReport(lora.path, scale, ignored=list(lora.ignored))
    for delta in lora.deltas:
        param = params[delta.param]
        param.add_((delta.dense(param.device) * scale).to(param.dtype))
        report.merged.append(delta.param)
    logger.info("LoRA %s (scale %g): %d parameters merged, %d alpha keys ignored", Path(lora.path).name, scale,
                len(report.merged), len(report.ignored))
    return report
