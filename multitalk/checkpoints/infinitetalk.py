"""The InfiniteTalk DiT: the WAN 2.1 I2V base with InfiniteTalk's audio adapters.

InfiniteTalk (MeiGen-AI) ships two adapters for the very same base and DiT code as
MultiTalk, with the MultiTalk adapter's keys (``audio_proj.*``, ``blocks.N.audio_cross_attn.*``,
``blocks.N.norm_x.*``): ``InfiniteTalk/single/infinitetalk.safetensors`` for one speaker and
``InfiniteTalk/multi/infinitetalk.safetensors`` for two. Its model code differs from
MultiTalk's in one place, an fp32 autocast around the audio projection's output norm
(``MultiTalkTransformer3DModel``'s ``audio_norm_fp32``).

How one loaded stage serves both speaker counts without loading the 14B base twice: the
base and the first adapter load as for MultiTalk (same strict loader); every other adapter
loads, just as strictly, into its own set of adapter modules (:class:`AudioAdapterWeights`,
2.5 B parameters, 5 GB in bf16). A job picks its adapter by *swapping those modules into the
blocks* (:meth:`AdapterBank.select`): a reference swap, nothing is copied, so switching
between a one-speaker and a two-speaker job costs nothing. Each adapter stays resident
where the DiT runs, which costs its memory once; the alternatives were worse for a
service: copying 5 GB of adapter weights on every switch (~0.2-0.5 s from pinned host
memory, and it breaks with quantised weights), or two stages each holding the 33 GB base.
A deployment short of memory can hold one adapter (``adapters=("single",)``).

The levers act on every adapter: LoRAs are merged into each (the base once), quantisation
quantises each adapter's block linears, ``low_vram`` streams whichever adapter is in the
blocks (the block streamer is re-attached after a swap), the attention backend and
sequence parallelism's kernels carry over to the incoming modules, and a compiled block
re-specialises at most once per adapter.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..modules.loading import load_strict
from .discovery import INFINITETALK_ADAPTERS, CheckpointSet, MissingCheckpointError
from .dit import is_adapter_key

logger = logging.getLogger(__name__)


def adapter_for_speakers(people: int) -> str:
    """The adapter the official README pairs with a speaker count: ``single`` or ``multi``."""
    return "multi" if people >= 2 else "single"


def infinitetalk_adapter_files(ckpt: CheckpointSet, adapters: Optional[Sequence[str]] = None) -> dict[str, str]:
    """``{variant: path}`` of the InfiniteTalk adapters to load (``adapters``: a subset of
    ``single``/``multi``; default all found). Raises :class:`MissingCheckpointError` when
    none (or a requested one) is present."""
    found = ckpt.infinitetalk_adapters()
    wanted = tuple(adapters) if adapters else tuple(found)
    unknown = [a for a in wanted if a not in INFINITETALK_ADAPTERS]
    if unknown:
        raise ValueError(f"InfiniteTalk adapters are {INFINITETALK_ADAPTERS}, got {unknown}")
    missing = [a for a in wanted if a not in found]
    if missing or not wanted:
        raise MissingCheckpointError(
            f"InfiniteTalk adapter(s) {', '.join(missing) or 'single/multi'} not found under {ckpt.root} "
            f"(expected InfiniteTalk/<single|multi>/infinitetalk.safetensors)")
    return {a: found[a] for a in INFINITETALK_ADAPTERS if a in wanted}


def with_adapter(ckpt: CheckpointSet, path: str) -> CheckpointSet:
    """``ckpt`` with ``audio_adapter`` pointing at ``path`` (the loaders read the adapter there)."""
    comps = dict(ckpt.components)
    comps["audio_adapter"] = dataclasses.replace(comps["audio_adapter"], found=True, path=str(path),
                                                 layout="official", note="InfiniteTalk adapter")
    return dataclasses.replace(ckpt, components=comps)


class _AdapterBlock(nn.Module):
    def __init__(self, audio_cross_attn: nn.Module, norm_x: nn.Module):
        super().__init__()
        self.audio_cross_attn = audio_cross_attn
        self.norm_x = norm_x


class AudioAdapterWeights(nn.Module):
    """One audio adapter apart from the DiT: ``audio_proj`` and, per block, ``audio_cross_attn``
    and ``norm_x``. Its state-dict names are the checkpoint's, so a file loads into it strictly."""

    def __init__(self, audio_proj: nn.Module, blocks: Sequence[_AdapterBlock]):
        super().__init__()
        self.audio_proj = audio_proj
        self.blocks = nn.ModuleList(blocks)

    @classmethod
    def of(cls, model: nn.Module) -> "AudioAdapterWeights":
        """The adapter modules now in ``model`` (shared, not copied)."""
        return cls(model.audio_proj, [_AdapterBlock(b.audio_cross_attn, b.norm_x) for b in model.blocks])

    @classmethod
    def load(cls, model: nn.Module, path: str | Path, device, dtype: torch.dtype) -> "AudioAdapterWeights":
        """Another adapter for ``model``'s config, read strictly from ``path``."""
        from ..modules.transformer_multitalk import MultiTalkTransformer3DModel

        config = {k: v for k, v in model.config.items() if not k.startswith("_")}
        with torch.device("meta"):
            weights = cls.of(MultiTalkTransformer3DModel(**config))
        load_strict(weights, [path], device=device, dtype=dtype)
        return weights.eval().requires_grad_(False)

    def install(self, model: nn.Module) -> None:
        """Put these modules into ``model``'s blocks, keeping the attention kernels in use there."""
        for block, mine in zip(model.blocks, self.blocks):
            mine.audio_cross_attn.attention = block.audio_cross_attn.attention
            block.audio_cross_attn = mine.audio_cross_attn
            block.norm_x = mine.norm_x
        model.audio_proj = self.audio_proj


def use_fp32_audio_norm(model: nn.Module) -> None:
    """The InfiniteTalk model difference, on a model already built."""
    model.register_to_config(audio_norm_fp32=True)
    model.audio_proj.norm_fp32 = True


class AdapterBank:
    """The InfiniteTalk adapters one DiT holds; :meth:`select` puts one in its blocks."""

    def __init__(self, model: nn.Module, adapters: dict[str, AudioAdapterWeights], current: str):
        self.model, self.adapters, self.current = model, adapters, current

    @property
    def names(self) -> list[str]:
        return list(self.adapters)

    @classmethod
    def attach(cls, model: nn.Module, first: str, others: dict[str, str], device, dtype: torch.dtype,
               loras: Sequence = (), models_root: str = ".", quantize: Optional[str] = None,
               low_vram: "bool | str" = False) -> "AdapterBank":
        """``model`` holds adapter ``first`` (levers applied); load ``others`` ``{variant: path}``
        and apply the same levers to them."""
        use_fp32_audio_norm(model)
        adapters = {first: AudioAdapterWeights.of(model)}
        for name, path in others.items():
            weights = AudioAdapterWeights.load(model, path, "cpu", dtype)
            weights.audio_proj.norm_fp32 = True
            for lora in loras:
                spec = {"path": lora} if isinstance(lora, (str, Path)) else dict(lora)
                lora_path = Path(spec["path"]).expanduser()
                merge_lora_into_adapter(weights, lora_path if lora_path.is_absolute() else Path(models_root) / lora_path,
                                        float(spec.get("scale", 1.0)))
            if quantize is not None:
                from ..modules.quantize import quantize_dit_blocks

                quantize_dit_blocks(weights, quantize)  # the block linears, as for the DiT
            adapters[name] = weights if low_vram else weights.to(device)
            logger.info("InfiniteTalk %s adapter loaded from %s", name, path)
        return cls(model, adapters, first)

    def select(self, name: Optional[str]) -> str:
        """Put adapter ``name`` into the DiT (``None``: keep the current one). A variant
        that is not held falls back to the one that is, with a warning. Returns the one in use."""
        if name is None or name == self.current:
            return self.current
        if name not in self.adapters:
            logger.warning("InfiniteTalk %s adapter not loaded: using the %s one", name, self.current)
            return self.current
        self.adapters[name].install(self.model)
        self.current = name
        streamer = getattr(self.model, "_block_streamer", None)
        if streamer is not None:  # it tracks the blocks' parameters: re-attach over the new ones
            from ..modules.offload import BlockStreamer

            streamer.remove()
            self.model._block_streamer = BlockStreamer(self.model, streamer.device, prefetch=streamer.prefetch)
        return name


@torch.no_grad()
def merge_lora_into_adapter(weights: AudioAdapterWeights, path: Path, scale: float) -> int:
    """Merge the adapter part of a LoRA (its ``audio_proj`` / ``audio_cross_attn`` / ``norm_x``
    keys) into a held adapter; the base part was merged into the DiT once. Strict as
    :func:`multitalk.checkpoints.lora.merge_lora`. Returns the parameters merged."""
    from .lora import merge_lora, read_lora

    lora = read_lora(weights, path, only=is_adapter_key)
    return 0 if lora is None else len(merge_lora(weights, lora, scale).merged)
