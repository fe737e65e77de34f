"""What the models volume holds: the RunPod ``model_check`` / ``volume_explore`` actions
and ``GET /v1/models``.

The model library knows which files its loaders accept, so the reports are its own
(``multitalk.checkpoints.discovery``); this module only resolves the models root the way
the stage replicas do and keeps ``volume_explore`` inside the volume.
"""
from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Optional

from multitalk.api import InputError

DEFAULT_CACHE_DIR = "~/.cache/multitalk"
# ``models_root: tiny`` asks for tiny random weights by name (generated once into the cache).
TINY_WEIGHTS = "tiny"
ENV_MODELS_ROOT = "MULTITALK_MODELS_ROOT"

logger = logging.getLogger("multitalk.serve")


def models_root_setting(settings: Mapping[str, Any], env: Optional[Mapping[str, str]] = None) -> str:
    """The configured models root: ``models_root``, else ``MULTITALK_MODELS_ROOT``, else ""."""
    env = os.environ if env is None else env
    return (settings.get("models_root") or env.get(ENV_MODELS_ROOT) or "").strip()


def check_weights_choice(models_root: str, device: Optional[str]) -> None:
    """Refuse to serve tiny random weights on a GPU by accident: an empty ``models_root``
    (no ``MULTITALK_MODELS_ROOT`` either) with a CUDA device raises ``ValueError`` naming
    the setting. ``models_root: tiny`` asks for them by name and is allowed anywhere; on a
    CPU an empty root still means tiny weights (logged). ``device: auto`` is decided where
    the device is known, by each model replica (:func:`resolve_models_root`)."""
    if not models_root and str(device or "").startswith("cuda"):
        raise ValueError(
            f"models_root is empty and device is {device!r}: refusing to serve tiny random weights on a GPU. "
            f"Set models_root (or {ENV_MODELS_ROOT}) to the model weights (a folder or s3://bucket/prefix), "
            f"or models_root: {TINY_WEIGHTS} to ask for tiny random weights by name")


def _cache_dir(settings: Mapping[str, Any]) -> Path:
    return Path(settings.get("cache_dir") or os.environ.get("MULTITALK_CACHE_DIR") or DEFAULT_CACHE_DIR).expanduser()


def resolve_models_root(settings: Mapping[str, Any], download: bool = True, device: Optional[str] = None) -> str:
    """The models root from settings, as a local folder.

    ``s3://bucket/prefix`` is mirrored once into the node-local cache (where the stage
    replicas run; ``download=False`` only finds an existing complete mirror, so the
    ingress never pulls 80 GB for a report). ``tiny`` means "tiny random weights in the
    cache", generated once per machine (``ensure_tiny_weights`` is race-safe; the file
    lock also keeps concurrently starting replicas from all doing the work); so does an
    empty root, on a CPU only (``device``: the device the weights are for, checked by
    :func:`check_weights_choice`).
    """
    root = models_root_setting(settings)
    check_weights_choice(root, device)
    if root.startswith("s3://"):
        from multitalk.checkpoints.remote import mirrored_path
        from multitalk.checkpoints.remote import resolve_models_root as mirror

        if download:
            return mirror(root, str(_cache_dir(settings)))
        local = mirrored_path(root, str(_cache_dir(settings)))
        if local is None:
            raise FileNotFoundError(f"{root} is not mirrored on this node yet")
        return str(local)
    if root and root != TINY_WEIGHTS:
        return str(Path(root).expanduser())
    if not root and device is not None:
        logger.warning("models_root is empty: tiny random weights on %s (models_root: %s says so explicitly)",
                       device, TINY_WEIGHTS)
    cache_dir = _cache_dir(settings)
    cache_dir.mkdir(parents=True, exist_ok=True)
    from multitalk.checkpoints.tiny import ensure_tiny_weights

    with open(cache_dir / ".tiny.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return str(ensure_tiny_weights(str(cache_dir)))
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def optional_models_root(settings: Mapping[str, Any]) -> Optional[str]:
    """Like :func:`resolve_models_root`, but ``None`` where the tiny-weights generator is
    not available (reports must not fail because of it)."""
    try:
        return resolve_models_root(settings, download=False)
    except (ImportError, FileNotFoundError):
        return None


def model_check(models_root: str, verify: bool = True) -> dict[str, Any]:
    """Which model components are present (and which layout/dtype) under ``models_root``,
    and (``verify``) whether each would load: the loaders run on the meta device, reading
    headers only, so a set that would fail names the key that breaks it."""
    from multitalk.checkpoints.discovery import find_checkpoints

    ckpt = find_checkpoints(models_root)
    if verify:
        from multitalk.checkpoints.verify import verify_checkpoints

        verify_checkpoints(ckpt)
    report = ckpt.report()
    report["ready"] = report.get("kind") != "incomplete"
    report["speech_voices"] = speech_voices(models_root)
    return report


def speech_voices(models_root: str) -> list[str]:
    """The text-to-speech voices under ``models_root`` (empty without a Kokoro-82M folder)."""
    from multitalk.checkpoints.discovery import find_checkpoints
    from multitalk.modules.speech_kokoro import voice_names

    speech = find_checkpoints(models_root).components.get("speech")
    return voice_names(speech.path) if speech is not None and speech.found else []


def volume_explore(models_root: str, path: str = "", max_depth: int = 3, max_entries: int = 500) -> dict[str, Any]:
    """A size-annotated listing of the models volume, or of a folder inside it."""
    from multitalk.checkpoints.discovery import explore

    from .storage import validate_key

    root = Path(models_root).expanduser().resolve()
    base = root
    if path:
        validate_key(path, "path")
        base = (root / path).resolve()
        if base != root and root not in base.parents:
            raise InputError("path", "outside the models volume")
    out = explore(base, max_depth=max_depth, max_entries=max_entries)
    out["models_root"] = str(root)
    out["path"] = path
    return out
