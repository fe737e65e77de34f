"""Quantisation of the DiT through torchao (the official ``--quant int8|fp8``, and more).

Only the ``nn.Linear`` layers of the transformer blocks are quantised: they hold ~97 % of
the weights; embeddings, norms, modulation tables and the head stay in the model dtype.
Weights are quantised on the CPU before they reach the GPU, so the device never holds the
full-precision copy (38 GB in bf16 → about 19 GB in int8 or fp8).

Modes:

* ``int8``: per-channel int8 weights, bf16 activations (any device; saves memory, the
  matmuls dequantise on the fly).
* ``fp8``: float8 e4m3 weights, bf16 activations (memory; fast kernels on CUDA 8.9+).
* ``fp8_dynamic``: float8 weights *and* activations (per-row scales computed on the fly):
  the matmuls run on the fp8 tensor cores (Ada/Hopper: about 2x the bf16 rate). CUDA
  compute capability 8.9+ only. Lossy: check ``bench/dit_gpu.py``'s quality column.
"""
from __future__ import annotations

import torch

MODES = ("int8", "fp8", "fp8_dynamic")


def _fp8_compute_available() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def quantize_dit_blocks(model: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Quantise ``model.blocks``' linear layers in place; returns ``model``."""
    if mode not in MODES:
        raise ValueError(f"quantisation must be one of {MODES}, got {mode!r}")
    if mode == "fp8_dynamic" and not _fp8_compute_available():
        raise ValueError("fp8_dynamic needs a CUDA GPU with compute capability 8.9+ (Ada, Hopper or newer); "
                         "use int8 or fp8 (weight-only) here")
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig, Float8WeightOnlyConfig, Int8WeightOnlyConfig, PerRow, quantize_,
        )
    except ImportError as e:  # optional dependency: pip install 'multitalk-serve[fast]'
        raise ImportError("quantisation needs torchao (pip install torchao)") from e
    config = {
        "int8": Int8WeightOnlyConfig,
        "fp8": Float8WeightOnlyConfig,
        "fp8_dynamic": lambda: Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
    }[mode]()
    quantize_(model.blocks, config)
    return model
