"""Attention kernels behind one interface.

Every attention call in the DiT goes through an ``AttentionKernel``: a callable taking
``q, k, v`` of shape ``[B, S, H, D]`` and returning ``[B, S_q, H, D]``. The local kernel
uses diffusers' attention dispatcher (SDPA, flash attention, sage attention ... chosen by
name), so the fastest available backend is one setting away. Sequence parallelism
(``multitalk.distributed``) swaps the *self-attention* kernel for a Ulysses/ring one;
nothing else in the model changes.
"""
from __future__ import annotations

from typing import Optional, Protocol

import torch


class AttentionKernel(Protocol):
    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor: ...


class LocalAttention:
    """Full attention on one device through ``diffusers``' dispatcher.

    Args:
        backend: a ``diffusers.models.attention_dispatch.AttentionBackendName`` value
            (``"native"``, ``"flash"``, ``"_flash_3"``, ``"sage"``, ``"_native_cudnn"`` ...);
            ``None`` uses diffusers' active default (``DIFFUSERS_ATTN_BACKEND``, else SDPA).
    """

    def __init__(self, backend: Optional[str] = None):
        self.backend = backend

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        # Half-precision kernels want matching dtypes; v keeps the activation dtype.
        q, k = q.to(v.dtype), k.to(v.dtype)
        return dispatch_attention_fn(q, k, v, backend=self.backend)

    def __repr__(self) -> str:
        return f"LocalAttention(backend={self.backend!r})"


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain scaled-dot-product attention in ``[B, S, H, D]`` layout (reference kernel)."""
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    )
    return out.transpose(1, 2)
