"""Load the MultiTalk DiT from the layouts users have on disk.

* ``official``: ``Wan2.1-I2V-14B-480P/`` (``config.json`` + ``diffusion_pytorch_model-*.safetensors``
  with the original key names) plus the MultiTalk adapter ``multitalk.safetensors`` (in the
  Wan folder, linked there as the MultiTalk README says, or in a ``MeiGen-MultiTalk/`` folder).
* ``diffusers``: ``Wan2.1-I2V-14B-480P-Diffusers/transformer/`` (diffusers key names, renamed
  here with the inverse of diffusers' own ``convert_wan_transformer_to_diffusers``), plus the
  same adapter file.

Without adapter weights the model is built without the audio branch (plain WAN 2.1 I2V).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..modules.transformer_multitalk import MultiTalkTransformer3DModel
from ..modules.loading import CheckpointError, is_allowed_extra, load_strict, read_keys

logger = logging.getLogger(__name__)

ADAPTER_FILE = "multitalk.safetensors"


def is_adapter_key(key: str) -> bool:
    return key.startswith("audio_proj.") or ".audio_cross_attn." in key or ".norm_x." in key


def diffusers_to_official_keys(official_keys: Sequence[str]) -> dict[str, str]:
    """diffusers name → official name, derived from diffusers' own converter.

    The converter only renames keys, so feeding it ``{key: key}`` yields the mapping.
    """
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    converted = convert_wan_transformer_to_diffusers({k: k for k in official_keys if not is_adapter_key(k)})
    mapping = {new: old for new, old in converted.items()}
    if len(mapping) != len([k for k in official_keys if not is_adapter_key(k)]):
        raise CheckpointError("diffusers key conversion is not one-to-one for this model")
    return mapping


def config_from_diffusers(cfg: dict) -> dict:
    """A diffusers ``WanTransformer3DModel`` config → ``MultiTalkTransformer3DModel`` kwargs."""
    heads = cfg["num_attention_heads"]
    return dict(
        patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
        in_dim=cfg.get("in_channels", 36),
        out_dim=cfg.get("out_channels", 16),
        dim=heads * cfg["attention_head_dim"],
        num_heads=heads,
        ffn_dim=cfg["ffn_dim"],
        freq_dim=cfg.get("freq_dim", 256),
        text_dim=cfg.get("text_dim", 4096),
        num_layers=cfg["num_layers"],
        cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
        qk_norm=bool(cfg.get("qk_norm")),
        eps=cfg.get("eps", 1e-6),
        image_dim=cfg.get("image_dim") or 1280,
    )


def config_to_diffusers(model_cfg: dict) -> dict:
    """The inverse of :func:`config_from_diffusers` (used to write diffusers-layout files)."""
    heads = model_cfg["num_heads"]
    return {
        "_class_name": "WanTransformer3DModel",
        "_diffusers_version": "0.42.0",
        "patch_size": list(model_cfg["patch_size"]),
        "num_attention_heads": heads,
        "attention_head_dim": model_cfg["dim"] // heads,
        "in_channels": model_cfg["in_dim"],
        "out_channels": model_cfg["out_dim"],
        "text_dim": model_cfg["text_dim"],
        "freq_dim": model_cfg["freq_dim"],
        "ffn_dim": model_cfg["ffn_dim"],
        "num_layers": model_cfg["num_layers"],
        "cross_attn_norm": model_cfg["cross_attn_norm"],
        "qk_norm": "rms_norm_across_heads" if model_cfg["qk_norm"] else None,
        "eps": model_cfg["eps"],
        "image_dim": model_cfg["image_dim"],
        "added_kv_proj_dim": model_cfg["dim"],
        "rope_max_seq_len": 1024,
    }


# Keys of the MultiTalk adapter config that the official WanModel takes from defaults; a
# tiny adapter records its own values in a small json beside multitalk.safetensors.
ADAPTER_CONFIG_FILE = "multitalk_adapter_config.json"
_ADAPTER_CONFIG_KEYS = ("audio_window", "intermediate_dim", "output_dim", "context_tokens", "vae_scale",
                        "norm_input_visual", "norm_output_audio", "audio_blocks", "audio_channels")


def _official_shards(wan_dir: Path) -> list[Path]:
    index = wan_dir / "diffusion_pytorch_model.safetensors.index.json"
    if index.exists():
        # The Wan index, or MultiTalk's linked in its place (which also maps the adapter keys
        # to multitalk.safetensors, loaded separately).
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()) - {ADAPTER_FILE})
        missing = [n for n in names if not (wan_dir / n).exists()]
        if missing:
            raise CheckpointError(f"{index} names DiT shards that are not in {wan_dir}: {', '.join(missing)}")
        return [wan_dir / n for n in names]
    shards = sorted(wan_dir.glob("diffusion_pytorch_model*.safetensors"))
    if not shards:
        raise CheckpointError(f"no DiT shards (diffusion_pytorch_model*.safetensors) in {wan_dir}")
    return shards


def read_dit_config(base_dir: str | Path, layout: str) -> dict:
    """The DiT's ``config.json`` under the official parameter names (both layouts), read
    without touching the weights: what the loader builds and the deploy-time guards check."""
    raw_cfg = json.loads((Path(base_dir) / "config.json").read_text())
    if layout == "official":
        return {k: v for k, v in raw_cfg.items() if not k.startswith("_")}
    if layout == "diffusers":
        return config_from_diffusers(raw_cfg)
    raise ValueError(f"unknown DiT layout {layout!r}")


def load_dit(
    base_dir: str | Path,
    layout: str,
    adapter_file: Optional[str | Path] = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MultiTalkTransformer3DModel:
    """Build the DiT on ``meta`` and fill it from files, strictly.

    Args:
        base_dir: the Wan folder (``official``) or the diffusers ``transformer/`` folder.
        layout: ``"official"`` or ``"diffusers"``.
        adapter_file: ``multitalk.safetensors``; ``None`` builds the plain WAN 2.1 I2V DiT.
    (Config, build on meta, renames per layout, adapter check and the strict load are one sequence; split, each piece would need the others' state.)
    """
    started = time.perf_counter()
    base_dir = Path(base_dir)
    cfg = read_dit_config(base_dir, layout)
    if layout == "official":
        shards = _official_shards(base_dir)
        rename = lambda k: k  # noqa: E731 - the official names are ours
        source_name = None
    else:
        shards = sorted(base_dir.glob("diffusion_pytorch_model*.safetensors"))
        if not shards:
            raise CheckpointError(f"no transformer weights in {base_dir}")
        rename = None  # set below, once the model's keys are known

    adapter_cfg = {}
    if adapter_file is not None:
        side = Path(adapter_file).with_name(ADAPTER_CONFIG_FILE)
        if side.exists():
            adapter_cfg = {k: v for k, v in json.loads(side.read_text()).items() if k in _ADAPTER_CONFIG_KEYS}
    cfg.update(adapter_cfg)
    cfg["audio_adapter"] = adapter_file is not None

    with torch.device("meta"):
        model = MultiTalkTransformer3DModel(**cfg)
    if rename is None:
        mapping = diffusers_to_official_keys(list(model.state_dict()))

        def rename(k: str) -> Optional[str]:
            if is_allowed_extra("dit_diffusers", k):  # the 40 zero norm_added_q tensors
                return None
            return mapping.get(k, k)  # unknown keys fail in load_strict

        inverse = {v: k for k, v in mapping.items()}
        source_name = lambda k: inverse.get(k, k)  # noqa: E731 - missing keys named as the files name them

    files = list(shards) + ([Path(adapter_file)] if adapter_file is not None else [])
    if adapter_file is not None:
        adapter_keys = read_keys(adapter_file)
        if not any(is_adapter_key(k) for k in adapter_keys):
            raise CheckpointError(f"{adapter_file} holds no MultiTalk adapter keys (audio_proj.*, *.audio_cross_attn.*)")
    load_strict(model, files, rename=rename, device=device, dtype=dtype, source_name=source_name)
    model.eval().requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    logger.info(
        "DiT loaded: %s layout from %s%s, %.2fB parameters, %s on %s in %.1fs",
        layout, base_dir, f" + {adapter_file}" if adapter_file else " (no audio adapter)",
        params / 1e9, dtype, device, time.perf_counter() - started,
    )
    return model


def dit_files(base_dir: str | Path, layout: str, adapter_file: Optional[str | Path] = None) -> list[Path]:
    """The files :func:`load_dit` reads: the base shards, then the adapter."""
    base_dir = Path(base_dir)
    if layout == "official":
        shards = _official_shards(base_dir)
    else:
        shards = sorted(base_dir.glob("diffusion_pytorch_model*.safetensors"))
    return list(shards) + ([Path(adapter_file)] if adapter_file is not None else [])


def dit_parameter_count(base_dir: str | Path, layout: str, adapter_file: Optional[str | Path] = None) -> int:
    """Parameters in the DiT files, from their headers (no tensor data is read)."""
    import math

    return sum(math.prod(shape) for f in dit_files(base_dir, layout, adapter_file) for shape in read_keys(f).values())


def save_dit(
    model: MultiTalkTransformer3DModel,
    base_dir: str | Path,
    layout: str,
    adapter_dir: Optional[str | Path] = None,
    shards: int = 2,
    adapter_config: Optional[dict] = None,
) -> None:
    """Write a DiT in the official or diffusers layout (used for tiny test weights).

    Base weights go to ``base_dir`` split into ``shards`` files with an index json (as the
    real checkpoints are); the adapter goes to ``adapter_dir/multitalk.safetensors`` with
    the MultiTalk-style index json that maps base keys to the Wan shards.
    """
    from safetensors.torch import save_file

    base_dir = Path(base_dir)
    base_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    base = {k: v for k, v in sd.items() if not is_adapter_key(k)}
    adapter = {k: v for k, v in sd.items() if is_adapter_key(k)}
    cfg = {k: v for k, v in model.config.items() if not k.startswith("_")}
    if layout == "official":
        config = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "i2v",
                  **{k: cfg[k] for k in ("dim", "eps", "ffn_dim", "freq_dim", "in_dim", "num_heads",
                                         "num_layers", "out_dim", "text_len", "text_dim", "image_dim")}}
        names = base
    else:
        config = config_to_diffusers(cfg)
        inverse = {v: k for k, v in diffusers_to_official_keys(list(sd)).items()}
        names = {inverse[k]: v for k, v in base.items()}
    (base_dir / "config.json").write_text(json.dumps(config, indent=2))
    keys = list(names)
    per = -(-len(keys) // shards)
    weight_map = {}
    for i in range(shards):
        fname = f"diffusion_pytorch_model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: names[k] for k in keys[i * per : (i + 1) * per]}
        save_file(part, str(base_dir / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in part})
    total = sum(v.numel() * v.element_size() for v in names.values())
    (base_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    if adapter_dir is not None and adapter:
        adapter_dir = Path(adapter_dir)
        adapter_dir.mkdir(parents=True, exist_ok=True)
        save_file(adapter, str(adapter_dir / ADAPTER_FILE), metadata={"format": "pt"})
        full_map = dict(weight_map) if layout == "official" else {k: "diffusion_pytorch_model.safetensors" for k in base}
        full_map.update({k: ADAPTER_FILE for k in adapter})
        (adapter_dir / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": full_map}, indent=2)
        )
        if adapter_config:
            (adapter_dir / ADAPTER_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2))
