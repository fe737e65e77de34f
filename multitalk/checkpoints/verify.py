"""The loaders' verdict on a models root, without loading a byte of tensor data.

:func:`verify_checkpoints` runs every component's own strict loader with ``device="meta"``:
safetensors headers and ``.pth`` pickles give the keys, shapes and dtypes, the models are
built at their real size on the meta device, and the same checks run as in a real load
(missing, unexpected and misshapen keys; truncated files; shards an index names but the
folder lacks). A set that would fail to load is reported ``incomplete``, with the error
naming the key. On the real 14B set this takes seconds and needs no GPU and little RAM.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Optional

from .discovery import CheckpointSet

logger = logging.getLogger(__name__)

META = "meta"
_MAX_ERROR = 2000


def _check_dit(ckpt: CheckpointSet, adapter: Optional[str]) -> None:
    import torch

    from .dit import load_dit

    load_dit(ckpt.path("dit"), ckpt.layout("dit"), adapter, device=META, dtype=torch.bfloat16)


def _check_vae(ckpt: CheckpointSet) -> None:
    from ..modules.vae import WanVAE

    if ckpt.layout("vae") == "official":
        WanVAE.from_original(ckpt.path("vae"), device=META)
    else:
        WanVAE.from_pretrained(ckpt.path("vae"), device=META)


def _check_tokenizer(ckpt: CheckpointSet) -> None:
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(ckpt.path("tokenizer"))


def _check_text_encoder(ckpt: CheckpointSet) -> None:
    from ..modules.text_encoder import TextEncoder

    if ckpt.layout("text_encoder") == "official":
        TextEncoder.from_original(ckpt.path("text_encoder"), ckpt.path("tokenizer"), device=META)
    else:
        TextEncoder.from_pretrained(ckpt.path("text_encoder"), ckpt.path("tokenizer"), device=META)


def _check_image_encoder(ckpt: CheckpointSet) -> None:
    from ..modules.image_encoder import ImageEncoder

    if ckpt.layout("image_encoder") == "official":
        ImageEncoder.from_original(ckpt.path("image_encoder"), device=META)
    else:
        ImageEncoder.from_diffusers(Path(ckpt.path("image_encoder")).parent, device=META)


def _check_audio_encoder(ckpt: CheckpointSet) -> None:
    from ..modules.audio_encoder import AudioEncoder

    AudioEncoder.from_pretrained(ckpt.path("audio_encoder"), device=META)


def _verdict(check: Callable[[], None]) -> tuple[bool, str]:
    try:
        check()
    except Exception as e:  # the verdict, not a crash: any failure means "would not load"
        logger.debug("check failed", exc_info=True)
        message = f"{type(e).__name__}: {e}"
        return False, message if len(message) <= _MAX_ERROR else message[:_MAX_ERROR] + " ..."
    return True, ""


def verify_checkpoints(ckpt: CheckpointSet) -> CheckpointSet:
    """Fill ``loadable``/``error`` of every found component (in place) and demote the set's
    ``kind`` to ``incomplete`` when any component it would load fails. Returns ``ckpt``."""
    comps = ckpt.components
    checks: dict[str, Callable[[], None]] = {
        "dit": lambda: _check_dit(ckpt, None),
        "vae": lambda: _check_vae(ckpt),
        "tokenizer": lambda: _check_tokenizer(ckpt),
        "text_encoder": lambda: _check_text_encoder(ckpt),
        "image_encoder": lambda: _check_image_encoder(ckpt),
        "audio_encoder": lambda: _check_audio_encoder(ckpt),
    }
    for name, check in checks.items():
        comp = comps.get(name)
        if comp is None or not comp.found:
            continue
        if name == "text_encoder" and comps.get("tokenizer") is not None and comps["tokenizer"].loadable is False:
            comp.loadable, comp.error = None, "not checked: the tokenizer does not load"
            continue
        comp.loadable, comp.error = _verdict(check)
    adapter = comps.get("audio_adapter")
    if adapter is not None and adapter.found:
        if comps["dit"].loadable:
            # The base loads alone, so a failure now is the adapter's.
            adapter.loadable, adapter.error = _verdict(lambda: _check_dit(ckpt, adapter.path))
        else:
            adapter.loadable, adapter.error = None, "not checked: the DiT base does not load"
    if ckpt.kind != "incomplete" and any(c.loadable is False for c in comps.values()):
        ckpt.kind = "incomplete"
    return ckpt
