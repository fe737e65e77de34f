"""Which dtype each model runs in: the official's per stage on a GPU, fp32 on a CPU.

The official MultiTalk (``MeiGen-AI/MultiTalk``) runs every model in its own dtype:

==========  ========  ====================================================================
component   on CUDA   where the official sets it
==========  ========  ====================================================================
``dit``     bf16      ``wan/configs/shared_config.py``: ``param_dtype = torch.bfloat16``;
                      ``wan/multitalk.py``: ``to_param_dtype_fp32only(self.model, self.param_dtype)``
                      casts every fp32 parameter/buffer of the loaded (fp32) DiT to bf16
``text``    bf16      ``shared_config.py``: ``t5_dtype = torch.bfloat16``, passed as
                      ``T5EncoderModel(dtype=config.t5_dtype)`` in ``wan/multitalk.py``
``clip``    fp16      ``wan/configs/wan_multitalk_14B.py``: ``clip_dtype = torch.float16``,
                      ``CLIPModel(dtype=config.clip_dtype)`` (weights cast, fp16 autocast)
``vae``     fp32      ``wan/modules/vae.py``: ``WanVAE(..., dtype=torch.float)`` is built
                      without a dtype in ``wan/multitalk.py``
``audio``   fp32      ``generate_multitalk.py``: ``Wav2Vec2Model.from_pretrained(wav2vec,
                      local_files_only=True).to(device)`` with ``custom_init('cpu', ...)``:
                      fp32 on the CPU; the windows are cast to the DiT dtype afterwards
                      (``audio_embs.to(self.param_dtype)`` in ``wan/multitalk.py``)
==========  ========  ====================================================================

On a CPU every stage runs in fp32 (bf16 matmuls are slow there and fp16 ones partly
unsupported). An fp32 14B DiT on a GPU (75.5 GB of weights with the adapter) is refused
unless asked for explicitly: it is what a forgotten ``--dtype`` would give.

Names: components ``audio`` (wav2vec2), ``text`` (UMT5), ``clip``, ``vae``, ``dit``; the
stage names ``diffusion`` (= dit), ``image`` (= clip; the image stage's VAE encoder is
``vae``) and ``decode`` (= vae) are accepted too. Dtypes: ``fp32``/``float32``,
``bf16``/``bfloat16``, ``fp16``/``float16``, or a ``torch.dtype``.
"""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Union

import torch

COMPONENTS = ("audio", "text", "clip", "vae", "dit")

ALIASES = {
    "wav2vec2": "audio", "audio_encoder": "audio",
    "umt5": "text", "t5": "text", "text_encoder": "text",
    "image": "clip", "image_encoder": "clip",
    "decode": "vae",
    "diffusion": "dit", "transformer": "dit",
}

#: The official's dtype per component on CUDA (sources in the module docstring).
CUDA_DTYPES = {
    "dit": torch.bfloat16,
    "text": torch.bfloat16,
    "clip": torch.float16,
    "vae": torch.float32,
    "audio": torch.float32,
}

DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}

#: A DiT with more parameters than this is "the 14B DiT" for the fp32 refusal (the tiny and
#: bench-size models run in fp32 on GPUs without complaint).
FP32_DIT_REFUSAL_PARAMS = 2_000_000_000

DtypeLike = Union[str, torch.dtype, None]


class PrecisionError(ValueError):
    """A dtype request the policy refuses (unknown name, or an fp32 14B DiT on a GPU)."""


def parse_dtype(value: DtypeLike) -> Optional[torch.dtype]:
    """``"bf16"`` / ``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16``; ``None``/``""``/``"auto"`` -> ``None``."""
    if value is None or isinstance(value, torch.dtype):
        return value
    name = str(value).strip().lower().replace("torch.", "")
    if name in ("", "auto", "default", "none"):
        return None
    if name not in DTYPE_NAMES:
        raise PrecisionError(f"unknown dtype {value!r}: use one of fp32, bf16, fp16 (or float32, bfloat16, float16)")
    return DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def component_name(name: str) -> str:
    """A component or stage name -> the component (``diffusion`` -> ``dit``)."""
    key = str(name).strip().lower()
    key = ALIASES.get(key, key)
    if key not in COMPONENTS:
        raise PrecisionError(f"unknown stage {name!r}: use one of {', '.join(COMPONENTS)} "
                             f"(or {', '.join(sorted(ALIASES))})")
    return key


def _device_type(device: "str | torch.device | None") -> str:
    return torch.device(device if device is not None else "cpu").type


def default_dtype(component: str, device: "str | torch.device | None") -> torch.dtype:
    """The official's dtype for ``component`` on a CUDA device; fp32 anywhere else."""
    component = component_name(component)
    if _device_type(device) == "cuda":
        return CUDA_DTYPES[component]
    return torch.float32


def resolve_dtype(component: str, device: "str | torch.device | None", dtype: DtypeLike = None) -> torch.dtype:
    """``dtype`` if given, else :func:`default_dtype` — what each ``Stage.from_pretrained`` uses."""
    return parse_dtype(dtype) or default_dtype(component, device)


def parse_stage_dtypes(specs: Union[Iterable[str], Mapping[str, DtypeLike], None]) -> dict[str, torch.dtype]:
    """``["dit=bf16", "audio=fp32"]`` (CLI) or ``{"diffusion": "bfloat16"}`` (configs) -> ``{component: dtype}``."""
    out: dict[str, torch.dtype] = {}
    if not specs:
        return out
    items = specs.items() if isinstance(specs, Mapping) else (_split_spec(s) for s in specs)
    for name, value in items:
        dtype = parse_dtype(value)
        if dtype is None:
            raise PrecisionError(f"stage dtype for {name!r} is empty")
        out[component_name(name)] = dtype
    return out


def _split_spec(spec: str) -> tuple[str, str]:
    name, sep, value = str(spec).partition("=")
    if not sep or not name.strip() or not value.strip():
        raise PrecisionError(f"stage dtype {spec!r} is not STAGE=DTYPE (e.g. dit=bf16, audio=fp32)")
    return name.strip(), value.strip()


def stage_dtypes(device: "str | torch.device | None", all_stages: DtypeLike = None,
                 per_stage: Union[Iterable[str], Mapping[str, DtypeLike], None] = None) -> dict[str, torch.dtype]:
    """Every component's dtype: the per-stage override, else the all-stage override, else the default."""
    overrides = parse_stage_dtypes(per_stage)
    everything = parse_dtype(all_stages)
    return {c: overrides.get(c) or everything or default_dtype(c, device) for c in COMPONENTS}


def check_dit_dtype(dtype: torch.dtype, device: "str | torch.device | None", num_params: int,
                    allow_fp32: bool = False) -> None:
    """Refuse an fp32 14B DiT on a GPU unless ``allow_fp32``.

    Raises:
        PrecisionError: with the size it would take and how to ask for it anyway.
    """
    # The CPU and the meta device (checks, plans) are never refused: only accelerator memory is at stake.
    if (dtype != torch.float32 or allow_fp32 or _device_type(device) in ("cpu", "meta")
            or num_params <= FP32_DIT_REFUSAL_PARAMS):
        return
    raise PrecisionError(
        f"refusing to run the {num_params / 1e9:.1f}B-parameter DiT in float32 on {device}: its weights alone take "
        f"{num_params * 4 / 1e9:.1f} GB ({num_params * 2 / 1e9:.1f} GB in bfloat16, which the official uses). "
        "Use dtype bfloat16 (the default on CUDA), or ask for fp32 explicitly "
        "(multitalk generate --allow-fp32-dit; DiffusionStage.from_pretrained(..., allow_fp32=True))."
    )
