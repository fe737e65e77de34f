"""Weight-only quantisation of the DiT through torchao (the official ``--quant int8|fp8``).

Only the ``nn.Linear`` layers of the transformer blocks are quantised: they hold ~97 % of
the weights; embeddings, norms, modulation tables and the head stay in the model dtype.
Weights are quantised on the CPU before they reach the GPU, so the device never holds the
full-precision copy (38 GB in bf16 → about 19 GB in int8 or fp8).
"""
from __future__ import annotations

import torch

MODES = ("int8", "fp8")


def quantize_dit_blocks(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Quantise ``model.blocks``' linear weights in place; returns ``model``.

    ``int8``: per-channel int8 weights (any device). ``fp8``: float8 e4m3 weights (CUDA
    with compute capability 8.9+ for the fast kernels).
    """
    if mode not in MODES:
        raise ValueError(f"quantisation must be one of {MODES}, got {mode!r}")
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as e:  # optional dependency: pip install 'multitalk-serve[fast]'
        raise ImportError("weight quantisation needs torchao (pip install torchao)") from e
    config = Int8WeightOnlyConfig() if mode == "int8" else Float8WeightOnlyConfig()
    quantize_(model.blocks, config)
    return model
