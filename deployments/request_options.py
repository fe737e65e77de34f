"""Where a job's options come from when the request leaves them out.

Three layers, the first that sets a field wins:

1. the request itself;
2. the preset it names (``preset: fast``), from the serve config's ``ingress.presets``;
3. the server's request defaults (``ingress.request_defaults``: e.g. a small size and few
   steps for the embedded tiny CPU model; the production config keeps the official
   defaults by setting none);

then the library's own defaults (``multitalk.api.GenerationRequest``). Nested objects
(``sampling``) merge field by field, so ``{"sampling": {"seed": 3}}`` keeps a preset's
step count. Every field filled in from layer 2 or 3 is reported, with its source, in
the job's status (``options_applied``).
"""
from __future__ import annotations

import copy
from typing import Any, Optional

from multitalk.api import InputError

from .schemas import OPTION_NAMES

# Fields a preset or the server defaults may set: the library's options.
SETTABLE = frozenset(OPTION_NAMES)


def check_layer(name: str, layer: dict) -> dict:
    """A preset or the defaults, validated for its keys (config errors fail at start-up)."""
    unknown = sorted(set(layer) - SETTABLE)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; a preset or request default may set {sorted(SETTABLE)}")
    return layer


def _fill(body: dict, layer: dict, source: str, applied: dict, prefix: str = "") -> None:
    for key, value in layer.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(body.get(key, {}), dict):
            _fill(body.setdefault(key, {}), value, source, applied, f"{path}.")  # report leaf fields
        elif key not in body:
            body[key] = copy.deepcopy(value)
            applied[path] = {"value": value, "source": source}


def apply_layers(body: dict, presets: dict[str, dict], defaults: dict,
                 preset_field: str = "preset") -> tuple[dict, dict[str, Any]]:
    """``body`` (a raw request object) with the named preset's and the server's defaults
    filled in where it leaves fields out; returns ``(body, applied)``. An unknown preset
    is a 422 naming ``preset_field`` and listing the known ones."""
    body = copy.deepcopy(body)
    applied: dict[str, Any] = {}
    name: Optional[str] = body.get("preset")
    if name is not None:
        if not isinstance(name, str) or name not in presets:
            known = ", ".join(sorted(presets)) or "none are configured"
            raise InputError(preset_field, f"unknown preset {name!r} (known: {known})")
        _fill(body, presets[name], f"preset {name}", applied)
    _fill(body, defaults, "server default", applied)
    return body, applied
