"""LoRAs chosen per request, applied to one loaded DiT without touching its base weights.

A :class:`LoraRuntime` holds a registry of named LoRA files (read once and checked strictly
against the DiT at registration: keys and shapes, as :func:`merge_lora` does) and applies a
job's *LoRA set* — ``((name, scale), ...)``, see :func:`normalize_lora_set` — for that job:

* **Low-rank pairs on the block linears** (nearly all of a distillation LoRA) run unmerged:
  a forward hook on each adapted ``nn.Linear`` adds ``(x · A_s^T) · B^T`` to ``x · W^T + b``,
  where ``A_s`` stacks the set's ``scale · down`` matrices ``[R, in]`` and ``B`` their ``up``
  matrices ``[out, R]`` (R = the sum of the ranks: one pair of matmuls per linear however
  many LoRAs the set holds). The base weights are never written, so a job's result cannot
  depend on the jobs before it, and quantised (torchao) and low-VRAM-streamed weights work
  unchanged: the LoRA path is computed beside them in the activation dtype.
* **Everything else** — full ``diff``/``diff_b`` deltas (norm weights, biases) and low-rank
  pairs on the linears the DiT calls through ``F.linear`` on their weights (the fp32 time
  embedding/projection and the head, which hooks never see) — is merged in place when the
  set changes, after keeping the untouched original of each such parameter on the CPU; the
  next change copies the originals back first (exact restore, bit for bit). These are small
  (vectors) for the LoRAs in use; a full delta on a quantised weight is refused.

Compile: the hooks are installed once, when the runtime is created (before
``torch.compile``), and read their matrices from non-persistent buffers (``lora_down``,
``lora_up``; ``None`` when inactive), so dynamo traces them and guards on them: a job with
no LoRA and a job with one run two graphs, switching between sets of the same total rank
reuses the graph, a new total rank recompiles once.

Shapes: a hooked linear maps ``[..., in] → [..., out]``; its buffers are ``lora_down``
``[R, in]`` and ``lora_up`` ``[out, R]`` in the model dtype on the compute device.
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..api import InputError, LoraChoice
from ..checkpoints.lora import LoraDelta, LoraFile, read_lora
from .loading import CheckpointError

logger = logging.getLogger(__name__)

LoraSet = tuple[tuple[str, float], ...]  # canonical: sorted by name, float scales

DEFAULT_SCALE_RANGE = (0.0, 2.0)
DEFAULT_MAX_LORAS = 4
REQUEST_FIELD = "loras"  # the request field an InputError about the set names (GenerationRequest.loras)

# Linears whose weights the DiT uses through F.linear (fp32 paths), not by calling the
# module: a forward hook on them would never run, so their deltas are merged in place.
UNHOOKED_LINEARS = ("time_embedding.", "time_projection.", "head.head")


# --------------------------------------------------------------------------- the set spec
def normalize_lora_set(spec: Any, known: Optional[Iterable[str]] = None,
                       scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE,
                       max_loras: int = DEFAULT_MAX_LORAS) -> LoraSet:
    """A request's LoRA choice → the canonical :data:`LoraSet`.

    ``spec``: ``None``/empty, or a sequence of :class:`multitalk.api.LoraChoice`,
    ``(name, scale)`` pairs, ``{"name", "scale"}`` dicts or bare names (scale 1).
    ``known``: the registered names (``None``: check the syntax only, e.g. in the driver).
    Sorted by name, so ``[a, b]`` and ``[b, a]`` are one set (one result, one multiplexing
    id). Raises :class:`InputError` (422) on field ``loras`` naming the unknown name, the
    out-of-range scale, a repeated name or too many LoRAs.
    """
    if not spec:
        return ()
    if isinstance(spec, (str, Mapping, LoraChoice)) or not isinstance(spec, Iterable):
        spec = [spec]
    chosen: dict[str, float] = {}
    for item in spec:
        name, scale = _name_and_scale(item)
        if name in chosen:
            raise InputError(REQUEST_FIELD, f"LoRA {name!r} is listed twice")
        chosen[name] = scale
    if len(chosen) > max_loras:
        raise InputError(REQUEST_FIELD, f"{len(chosen)} LoRAs asked for; at most {max_loras} per job")
    if known is not None:
        known = sorted(known)
        unknown = [n for n in chosen if n not in known]
        if unknown:
            offered = ", ".join(repr(n) for n in known) or "none"
            raise InputError(REQUEST_FIELD, f"unknown LoRA {unknown[0]!r} (this deployment has: {offered})")
    low, high = scale_range
    for name, scale in chosen.items():
        if not (math.isfinite(scale) and low <= scale <= high):
            raise InputError(REQUEST_FIELD, f"scale {scale} of LoRA {name!r} is outside [{low:g}, {high:g}]")
    return tuple(sorted(chosen.items()))


def _name_and_scale(item: Any) -> tuple[str, float]:
    if isinstance(item, str):
        name, scale = item, 1.0
    elif isinstance(item, LoraChoice):
        name, scale = item.name, item.scale
    elif isinstance(item, Mapping):
        if "name" not in item or set(item) - {"name", "scale"}:
            raise InputError(REQUEST_FIELD, f"each LoRA is {{name, scale}}, got {dict(item)!r}")
        name, scale = item["name"], item.get("scale", 1.0)
    elif isinstance(item, Sequence) and len(item) == 2:
        name, scale = item
    else:
        raise InputError(REQUEST_FIELD, f"each LoRA is a name, a (name, scale) pair or {{name, scale}}, got {item!r}")
    if not isinstance(name, str) or not name:
        raise InputError(REQUEST_FIELD, f"a LoRA name must be a non-empty string, got {name!r}")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise InputError(REQUEST_FIELD, f"scale of LoRA {name!r} must be a number, got {scale!r}")
    return name, float(scale)


def lora_set_id(lora_set: LoraSet) -> str:
    """A stable string for a set (``""`` for none): logs, result records, and the
    ``multiplexed_model_id`` if a deployment routes by set."""
    return "+".join(f"{name}@{scale:g}" for name, scale in lora_set)


# --------------------------------------------------------------------------- the runtime
@dataclass
class RegisteredLora:
    name: str
    file: LoraFile
    sha256: str

    def describe(self) -> dict:
        return {"name": self.name, "path": self.file.path, "sha256": self.sha256, "rank": self.file.rank,
                "parameters": len(self.file.deltas), "bytes": self.file.nbytes}


def _lora_hook(module: nn.Linear, args: tuple, output: torch.Tensor) -> Optional[torch.Tensor]:
    """``output + (x · A_s^T) · B^T`` while a set is active on this linear."""
    down = module.lora_down
    if down is None:
        return None
    low = F.linear(args[0], down)  # [..., R]
    # addmm: the add rides in the second matmul's epilogue (one pass over the output, not three)
    return torch.addmm(output.reshape(-1, output.shape[-1]), low.reshape(-1, low.shape[-1]),
                       module.lora_up.t()).view(output.shape)


def _plain_tensor(param: torch.Tensor) -> bool:
    """False for tensor subclasses (torchao's quantised weights): no in-place arithmetic."""
    return type(param.data) is torch.Tensor


class LoraRuntime:
    """Named LoRAs for one DiT and the set currently applied to it.

    Args:
        model: the DiT (plain, quantised, or with a ``_block_streamer`` for low VRAM).
        device: where the DiT computes (the hooks' matrices live there).
        dtype: the activation dtype (the hooks' matrices are cast to it).
        scale_range, max_loras: what a job may ask for (:func:`normalize_lora_set`).
    """

    def __init__(self, model: nn.Module, device: "str | torch.device" = "cpu", dtype: torch.dtype = torch.float32,
                 scale_range: tuple[float, float] = DEFAULT_SCALE_RANGE, max_loras: int = DEFAULT_MAX_LORAS):
        self.model, self.device, self.dtype = model, torch.device(device), dtype
        self.scale_range, self.max_loras = (float(scale_range[0]), float(scale_range[1])), int(max_loras)
        self.loras: dict[str, RegisteredLora] = {}
        self.current: LoraSet = ()
        self._params = dict(model.named_parameters())
        self._linears: dict[str, nn.Linear] = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not name.startswith(UNHOOKED_LINEARS):
                module.register_buffer("lora_down", None, persistent=False)
                module.register_buffer("lora_up", None, persistent=False)
                module.register_forward_hook(_lora_hook)
                self._linears[name + ".weight"] = module
        self._originals: dict[str, torch.Tensor] = {}  # parameters changed in place → untouched copies (CPU)

    # ------------------------------------------------------------------ registry
    def register(self, name: str, path: "str | os.PathLike") -> RegisteredLora:
        """Read and check the file once; raises :class:`CheckpointError` naming a bad key,
        shape, or a full delta on a quantised weight."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a LoRA name must be a non-empty string, got {name!r}")
        if name in self.loras:
            raise ValueError(f"a LoRA named {name!r} is already registered ({self.loras[name].file.path})")
        lora = read_lora(self.model, path)
        for delta in lora.deltas:
            if not self._hooked(delta) and not _plain_tensor(self._params[delta.param]):
                raise CheckpointError(f"{lora.path}: {delta.key!r} changes {delta.param!r}, which is quantised; "
                                      f"only low-rank pairs can be applied to quantised weights")
        entry = RegisteredLora(name, lora, lora.sha256())
        self.loras[name] = entry
        logger.info("LoRA %r registered: %s (rank %d, %d parameters, %.1f MB)", name, lora.path, lora.rank,
                    len(lora.deltas), lora.nbytes / 1e6)
        return entry

    def unregister(self, name: str) -> None:
        """Forget a LoRA (a deployment's live settings dropped it); if the applied set uses
        it, the base weights are restored first."""
        if name not in self.loras:
            raise KeyError(f"no LoRA named {name!r}")
        if any(n == name for n, _ in self.current):
            self._restore()
            self.current = ()
        del self.loras[name]
        logger.info("LoRA %r unregistered", name)

    @property
    def names(self) -> list[str]:
        return sorted(self.loras)

    def normalize(self, spec: Any) -> LoraSet:
        """A job's spec → the canonical set, checked against this registry (raises :class:`InputError`)."""
        return normalize_lora_set(spec, self.loras, self.scale_range, self.max_loras)

    def describe(self, lora_set: LoraSet) -> list[dict]:
        """What a set means here: per LoRA its name, scale, file, sha256 and rank."""
        return [{**self.loras[name].describe(), "scale": scale} for name, scale in self.normalize(lora_set)]

    # ------------------------------------------------------------------ switching
    def _hooked(self, delta: LoraDelta) -> bool:
        return delta.low_rank and delta.param in self._linears

    @torch.no_grad()
    def activate(self, spec: Any) -> float:
        """Make ``spec`` the applied set (no-op if it already is); returns the seconds spent.
        Call between forwards (the stage does, under its sampling lock)."""
        lora_set = self.normalize(spec)
        if lora_set == self.current:
            return 0.0
        started = time.perf_counter()
        self._restore()
        self.current = ()
        stacked: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for name, scale in lora_set:
            for delta in self.loras[name].file.deltas:
                if self._hooked(delta):
                    downs, ups = stacked.setdefault(delta.param, ([], []))
                    downs.append(delta.down.float() * scale)
                    ups.append(delta.up.float())
                else:
                    self._merge_in_place(delta, scale)
        for param, (downs, ups) in stacked.items():
            linear = self._linears[param]
            linear.lora_down = torch.cat(downs).to(self.device, self.dtype)
            linear.lora_up = torch.cat(ups, dim=1).to(self.device, self.dtype)
        self._discard_streamed_copies()
        self.current = lora_set
        seconds = time.perf_counter() - started
        logger.info("LoRA set %r applied in %.3fs (%d linears unmerged, %d parameters merged in place)",
                    lora_set_id(lora_set), seconds, len(stacked), len(self._originals))
        return seconds

    def _merge_in_place(self, delta: LoraDelta, scale: float) -> None:
        param = self._params[delta.param]
        if delta.param not in self._originals:
            self._originals[delta.param] = param.detach().to("cpu", copy=True)
        param.data.add_((delta.dense(param.device) * scale).to(param.dtype))

    def _restore(self) -> None:
        for module in self._linears.values():
            module.lora_down = module.lora_up = None
        for name, original in self._originals.items():
            self._params[name].data.copy_(original)
        self._originals.clear()

    def _discard_streamed_copies(self) -> None:
        """Low VRAM: a block copy the streamer staged before the switch holds old values."""
        streamer = getattr(self.model, "_block_streamer", None)
        if streamer is not None:
            streamer.discard_staged()


def resolve_registry(registry: Mapping[str, Any], root: "str | os.PathLike") -> dict[str, Path]:
    """A config's ``{name: path}`` (or ``{name: {"path": ...}}``) → absolute paths; relative
    paths are under the models ``root``."""
    resolved = {}
    for name, entry in registry.items():
        raw = entry["path"] if isinstance(entry, Mapping) else entry
        path = Path(raw).expanduser()
        resolved[str(name)] = path if path.is_absolute() else Path(root) / path
    return resolved
