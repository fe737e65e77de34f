"""Rotary position embeddings used by the MultiTalk DiT.

Two kinds:

* 3-axis RoPE over (frame, height, width) for the video self-attention, as in Wan 2.1:
  the head dim is split ``d - 4*(d//6)`` / ``2*(d//6)`` / ``2*(d//6)`` between the axes,
  rotation in float64 (real arithmetic: the same numbers as the official complex product,
  and ``torch.compile`` fuses it, which it cannot do for complex tensors).
* 1-D RoPE for MultiTalk's audio cross-attention ("L-RoPE"): video tokens and audio
  tokens get positions in per-person ranges so that each person's tokens attend to
  their own audio. Interleaved-pair rotation in float32.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch


def rope_params(max_seq_len: int, dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Complex rotations ``[max_seq_len, dim // 2]`` (complex128) for one axis."""
    assert dim % 2 == 0
    freqs = torch.outer(
        torch.arange(max_seq_len),
        1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim)),
    )
    return torch.polar(torch.ones_like(freqs), freqs)


def video_rope_freqs(head_dim: int, max_seq_len: int = 1024) -> torch.Tensor:
    """Per-axis rotations concatenated: ``[max_seq_len, head_dim // 2]`` complex128."""
    d = head_dim
    return torch.cat(
        [
            rope_params(max_seq_len, d - 4 * (d // 6)),
            rope_params(max_seq_len, 2 * (d // 6)),
            rope_params(max_seq_len, 2 * (d // 6)),
        ],
        dim=1,
    )


def video_rope_grid(freqs: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """Rotations for every token of an ``(f, h, w)`` grid, flattened frame-major.

    Returns ``[f*h*w, 1, head_dim // 2, 2]`` float64 (cos, sin) pairs. Slicing its first
    dim gives the rotations of any contiguous token range (what a sequence-parallel rank
    holds).
    """
    f, h, w = grid
    c = freqs.shape[1]
    parts = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
    grid_freqs = torch.cat(
        [
            parts[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
            parts[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
            parts[2][:w].view(1, 1, w, -1).expand(f, h, w, -1),
        ],
        dim=-1,
    )
    return torch.view_as_real(grid_freqs.reshape(f * h * w, 1, -1))


class VideoRotaryCache:
    """The 3-axis rotations of token grids, each computed once and kept on its device.

    A DiT forward needs the rotations of its ``(f, h, w)`` grid in every block; the grid
    is the same for every step and chunk of a job, so they are built once (in float64 on
    the CPU, exactly as :func:`video_rope_grid`), copied to the device once, and reused
    (diffusers' ``WanRotaryPosEmbed`` keeps its tables as buffers for the same reason).
    Not a module buffer: the official state dict has no rope tensors, and a model cast to
    bf16 must not cast them. The most recent ``max_grids`` grid shapes are kept (at 480p a
    grid is about 34 MB).
    """

    def __init__(self, head_dim: int, max_seq_len: int = 1024, max_grids: int = 4):
        self.head_dim, self.max_seq_len, self.max_grids = head_dim, max_seq_len, max_grids
        self._freqs: "torch.Tensor | None" = None
        self._grids: "OrderedDict[tuple, torch.Tensor]" = OrderedDict()
        self._lock = threading.Lock()
        self.built = 0  # grids computed so far (the tests count them)

    @property
    def freqs(self) -> torch.Tensor:
        """``[max_seq_len, head_dim // 2]`` complex128 on the CPU (:func:`video_rope_freqs`)."""
        if self._freqs is None:
            self._freqs = video_rope_freqs(self.head_dim, self.max_seq_len)
        return self._freqs

    def rotations(self, grid: tuple[int, int, int], device: "torch.device | str") -> torch.Tensor:
        """``[f*h*w, 1, head_dim // 2, 2]`` float64 on ``device`` (see :func:`video_rope_grid`)."""
        key = (tuple(int(g) for g in grid), torch.device(device))
        with self._lock:
            cached = self._grids.get(key)
            if cached is not None:
                self._grids.move_to_end(key)
                return cached
            rotations = video_rope_grid(self.freqs, key[0]).to(key[1])
            self._grids[key] = rotations
            self.built += 1
            while len(self._grids) > self.max_grids:
                self._grids.popitem(last=False)
            return rotations

    def clear(self) -> None:
        with self._lock:
            self._grids.clear()

    def __getstate__(self) -> dict:
        # A copied (or pickled) model starts with an empty cache of its own.
        return {"head_dim": self.head_dim, "max_seq_len": self.max_seq_len, "max_grids": self.max_grids}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)


def apply_video_rope(x: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[B, S, H, D]`` by ``rotations`` ``[S, 1, D/2, 2]`` (cos, sin); returns float32.

    Consecutive channel pairs ``(re, im)`` are multiplied by ``cos + i sin`` in float64,
    written out in real arithmetic. ``rotations`` must be on ``x``'s device already
    (:class:`VideoRotaryCache` keeps them there): no copy per block.
    """
    b, s, n, d = x.shape
    pairs = x.to(torch.float64).reshape(b, s, n, d // 2, 2)
    re, im = pairs.unbind(-1)
    cos, sin = rotations.unbind(-1)
    out = torch.stack((re * cos - im * sin, re * sin + im * cos), dim=-1).flatten(3)
    return out.float()


def _rotate_interleaved_half(x: torch.Tensor) -> torch.Tensor:
    # pairs (x0, x1) -> (-x1, x0), pairs interleaved along the last dim
    x = x.unflatten(-1, (-1, 2))
    x1, x2 = x.unbind(dim=-1)
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rope_1d(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """1-D RoPE with fractional positions.

    Args:
        x: ``[B, H, S, D]``.
        positions: ``[S]`` (any float dtype; may be fractional: L-RoPE scales attention
            maps into position ranges).
    Returns:
        ``[B, H, S, D]`` in ``x``'s dtype.
    """
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    angles = positions.float()[:, None] * inv_freq.to(positions.device)[None, :]
    angles = angles.repeat_interleave(2, dim=-1).to(x.device)  # [S, D], each freq twice
    cos, sin = angles.cos()[None, None], angles.sin()[None, None]
    x_f = x.float()
    return (x_f * cos + _rotate_interleaved_half(x_f) * sin).type_as(x)
