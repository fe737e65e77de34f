"""Find the model components under a models root (the predecessor's ``model_check`` /
``volume_explore``).

A complete MultiTalk set is looked for first (WAN 2.1 I2V base + ``multitalk.safetensors``
+ a wav2vec2 folder); without the adapter the plain WAN 2.1 I2V base is used and
generation runs without lip sync (and says so). Both on-disk layouts of the base are
recognised: the original Wan one and the diffusers one.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from ..modules.loading import file_dtype

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
T5_TOKENIZER = "google/umt5-xxl"
CLIP_FILE = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
VAE_FILE = "Wan2.1_VAE.pth"
ADAPTER_FILE = "multitalk.safetensors"
COMPONENTS = ("dit", "audio_adapter", "vae", "text_encoder", "tokenizer", "image_encoder", "audio_encoder")
# InfiniteTalk (same base, same adapter keys): InfiniteTalk/{single,multi}/infinitetalk.safetensors.
INFINITETALK_FILE = "infinitetalk.safetensors"
INFINITETALK_ADAPTERS = ("single", "multi")  # one speaker, two speakers
INFINITETALK_COMPONENTS = tuple(f"infinitetalk_{v}" for v in INFINITETALK_ADAPTERS)
# What a set may lack and still serve: the adapters (no lip sync / no InfiniteTalk) and the
# Kokoro-82M text-to-speech folder (``speech``).
OPTIONAL_COMPONENTS = ("audio_adapter", "speech", *INFINITETALK_COMPONENTS)


class MissingCheckpointError(FileNotFoundError):
    """The models root lacks a component generation needs."""


@dataclass
class Component:
    name: str
    found: bool
    path: Optional[str] = None
    layout: Optional[str] = None  # "official" | "diffusers" | "transformers"
    bytes: int = 0
    dtype: Optional[str] = None
    note: str = ""
    # The loaders' verdict (multitalk.checkpoints.verify, run on the meta device): None = not
    # checked, False = the files are there but would not load (``error`` names the key).
    loadable: Optional[bool] = None
    error: str = ""


@dataclass
class CheckpointSet:
    """Where each component lives. ``kind``: ``multitalk`` (lip sync), ``wan-i2v``
    (base only, no lip sync) or ``incomplete``."""

    root: str
    kind: str
    base_layout: Optional[str]
    components: dict[str, Component] = field(default_factory=dict)

    def path(self, name: str) -> str:
        comp = self.components.get(name)
        if comp is None or not comp.found:
            raise MissingCheckpointError(f"{name} not found under {self.root} ({comp.note if comp else 'not looked for'})")
        return comp.path  # type: ignore[return-value]

    def layout(self, name: str) -> str:
        self.path(name)
        return self.components[name].layout  # type: ignore[return-value]

    @property
    def lip_sync(self) -> bool:
        return self.kind == "multitalk"

    def require_complete(self) -> "CheckpointSet":
        if self.kind == "incomplete":
            missing = [c.name for c in self.components.values() if not c.found and c.name not in OPTIONAL_COMPONENTS]
            missing += [f"{c.name} (does not load: {c.error})" for c in self.components.values() if c.loadable is False]
            raise MissingCheckpointError(f"incomplete model set under {self.root}: missing {', '.join(missing)}")
        return self

    def infinitetalk_adapters(self) -> dict[str, str]:
        """The InfiniteTalk adapter files found: ``{"single": path, "multi": path}`` (either may be absent)."""
        return {v: self.components[f"infinitetalk_{v}"].path for v in INFINITETALK_ADAPTERS
                if f"infinitetalk_{v}" in self.components and self.components[f"infinitetalk_{v}"].found}

    def models(self) -> list[str]:
        """The models this set can run with lip sync: ``multitalk`` and/or ``infinitetalk``."""
        if self.kind == "incomplete" or not self.components["audio_encoder"].found:
            return []
        return (["multitalk"] if self.kind == "multitalk" else []) + (["infinitetalk"] if self.infinitetalk_adapters() else [])

    def report(self) -> dict:
        return {
            "root": self.root,
            "kind": self.kind,
            "lip_sync": self.lip_sync,
            "models": self.models(),
            "base_layout": self.base_layout,
            "components": {k: asdict(v) for k, v in self.components.items()},
        }


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _candidate_dirs(root: Path, depth: int = 2) -> list[Path]:
    out = [root]
    frontier = [root]
    for _ in range(depth):
        nxt = []
        for d in frontier:
            try:
                children = sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            nxt.extend(children)
        out.extend(nxt)
        frontier = nxt
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _component(name: str, path: Optional[Path], layout: str, weights: Optional[Path] = None, note: str = "") -> Component:
    if path is None or not path.exists():
        return Component(name, False, str(path) if path else None, layout, note=note or "not found")
    weights = weights or path
    dtype = None
    if weights.is_file():
        dtype = file_dtype(weights)
    else:
        files = sorted(weights.glob("*.safetensors")) or sorted(weights.glob("*.bin")) or sorted(weights.glob("*.pth"))
        dtype = file_dtype(files[0]) if files else None
    return Component(name, True, str(path), layout, _size(path), dtype, note)


def find_checkpoints(root: str | os.PathLike) -> CheckpointSet:
    """Scan ``root`` (and two levels below) for the MultiTalk components.
    (One pass over the candidate folders, component by component, in the order the layouts are tried: kept together so the precedence between layouts reads top to bottom.)
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        comps = {n: Component(n, False, note=f"models root {root} does not exist") for n in COMPONENTS}
        return CheckpointSet(str(root), "incomplete", None, comps)
    dirs = _candidate_dirs(root)

    official = [d for d in dirs if (d / VAE_FILE).exists() or (d / T5_FILE).exists()]
    # Prefer a Wan folder whose DiT config says i2v (MultiTalk needs the I2V base).
    official.sort(key=lambda d: (_read_json(d / "config.json").get("model_type") != "i2v", len(d.parts)))
    diffusers = [d for d in dirs if (d / "model_index.json").exists() and (d / "transformer").is_dir()]
    adapters = [d / ADAPTER_FILE for d in dirs if (d / ADAPTER_FILE).exists()]
    wav2vec = [d for d in dirs if _read_json(d / "config.json").get("model_type") == "wav2vec2"]
    wav2vec.sort(key=lambda d: ("wav2vec2" not in d.name, len(d.parts)))

    comps: dict[str, Component] = {}
    base_layout = None
    if official:
        base_layout = "official"
        w = official[0]
        shards = sorted(w.glob("diffusion_pytorch_model*.safetensors"))
        comps["dit"] = (
            Component("dit", True, str(w), "official", sum(_size(s) for s in shards), file_dtype(shards[0]),
                      f"{len(shards)} shard(s)")
            if shards and (w / "config.json").exists()
            else Component("dit", False, str(w), "official", note="no config.json + diffusion_pytorch_model*.safetensors")
        )
        comps["vae"] = _component("vae", w / VAE_FILE, "official")
        comps["text_encoder"] = _component("text_encoder", w / T5_FILE, "official")
        comps["tokenizer"] = _component("tokenizer", w / T5_TOKENIZER, "official")
        comps["image_encoder"] = _component("image_encoder", w / CLIP_FILE, "official")
    elif diffusers:
        base_layout = "diffusers"
        d = diffusers[0]
        comps["dit"] = _component("dit", d / "transformer", "diffusers")
        comps["vae"] = _component("vae", d / "vae", "diffusers")
        comps["text_encoder"] = _component("text_encoder", d / "text_encoder", "diffusers")
        comps["tokenizer"] = _component("tokenizer", d / "tokenizer", "diffusers")
        comps["image_encoder"] = _component("image_encoder", d / "image_encoder", "diffusers")
    else:
        note = "no WAN 2.1 I2V base found (original layout with Wan2.1_VAE.pth, or diffusers layout with model_index.json)"
        for n in ("dit", "vae", "text_encoder", "tokenizer", "image_encoder"):
            comps[n] = Component(n, False, note=note)

    if adapters:
        # The adapter linked into the Wan folder wins over a separate MeiGen-MultiTalk folder.
        adapters.sort(key=lambda p: (official and p.parent != official[0], len(p.parts)))
        comps["audio_adapter"] = _component("audio_adapter", adapters[0], "official")
    else:
        comps["audio_adapter"] = Component("audio_adapter", False, note=f"no {ADAPTER_FILE}: generation runs without lip sync")
    comps["audio_encoder"] = (
        _component("audio_encoder", wav2vec[0], "transformers")
        if wav2vec
        else Component("audio_encoder", False, note="no wav2vec2 folder (e.g. chinese-wav2vec2-base)")
    )

    base_ok = all(comps[n].found for n in ("dit", "vae", "text_encoder", "tokenizer", "image_encoder"))
    if base_ok and comps["audio_adapter"].found and comps["audio_encoder"].found:
        kind = "multitalk"
    elif base_ok:
        kind = "wan-i2v"
    else:
        kind = "incomplete"
    ordered = {n: comps[n] for n in COMPONENTS}
    ordered["speech"] = find_speech(dirs)
    ordered.update(_infinitetalk_components(dirs))
    return CheckpointSet(str(root), kind, base_layout, ordered)


def find_speech(dirs: list[Path]) -> Component:
    """The optional Kokoro-82M folder (official layout: ``config.json`` with ``istftnet`` and
    ``plbert``, ``kokoro-v1_0.pth``, ``voices/<name>.pt``); its note lists the voices."""
    from ..modules.speech_kokoro import WEIGHTS_FILE, voice_names

    folders = [d for d in dirs if {"istftnet", "plbert"} <= set(_read_json(d / "config.json"))]
    folders.sort(key=lambda d: ("kokoro" not in d.name.lower(), len(d.parts)))
    if not folders:
        return Component("speech", False, note="no Kokoro-82M folder (config.json, kokoro-v1_0.pth, voices/*.pt): "
                                               "text to speech is unavailable")
    folder = folders[0]
    weights = folder / WEIGHTS_FILE
    voices = voice_names(folder)
    if not weights.is_file() or not voices:
        lacks = " and ".join(x for x, ok in ((WEIGHTS_FILE, weights.is_file()), ("voices/*.pt", voices)) if not ok)
        return Component("speech", False, str(folder), "official", note=f"Kokoro folder without {lacks}")
    return Component("speech", True, str(folder), "official", _size(folder), None,
                     f"{len(voices)} voices: {', '.join(voices)}")


def _infinitetalk_components(dirs: list[Path]) -> dict[str, Component]:
    """``infinitetalk_single`` / ``infinitetalk_multi``: ``<d>/{single,multi}/infinitetalk.safetensors``
    (the official download puts them under ``InfiniteTalk/``; that parent is preferred)."""
    out = {}
    for variant in INFINITETALK_ADAPTERS:
        name = f"infinitetalk_{variant}"
        found = [d / INFINITETALK_FILE for d in dirs if d.name == variant and (d / INFINITETALK_FILE).is_file()]
        found.sort(key=lambda p: (p.parent.parent.name != "InfiniteTalk", len(p.parts)))
        out[name] = (_component(name, found[0], "official") if found else
                     Component(name, False, note=f"no InfiniteTalk/{variant}/{INFINITETALK_FILE}"))
    return out


def explore(root: str | os.PathLike, max_depth: int = 3, max_entries: int = 500) -> dict:
    """What the models volume holds: a bounded tree of folders and files with sizes."""
    root = Path(root).expanduser()
    entries = []
    total = 0
    if root.is_dir():
        for dirpath, dirnames, filenames in os.walk(root):
            rel = Path(dirpath).relative_to(root)
            depth = 0 if str(rel) == "." else len(rel.parts)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if depth < max_depth else []
            for f in sorted(filenames):
                p = Path(dirpath) / f
                try:
                    size = p.stat().st_size
                except OSError:
                    continue
                total += size
                if len(entries) < max_entries:
                    entries.append({"path": str(rel / f) if str(rel) != "." else f, "bytes": size})
    return {
        "root": str(root),
        "exists": root.is_dir(),
        "files": entries,
        "truncated": len(entries) >= max_entries,
        "total_bytes": total,
    }


def find_checkpoints_resolved(root: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> CheckpointSet:
    """Like :func:`find_checkpoints`, but ``root`` may be an ``s3://bucket/prefix``: it is
    mirrored once into the node-local cache (``multitalk.checkpoints.remote``) and the
    mirror is scanned."""
    from .remote import resolve_models_root

    return find_checkpoints(resolve_models_root(str(root), cache_dir))
