"""Wan 2.1 causal 3D VAE (z_dim 16, stride 4x8x8) on top of diffusers' ``AutoencoderKLWan``.

Two checkpoint layouts are accepted:

* the original ``Wan2.1_VAE.pth`` (a plain ``torch.save`` state dict with the Wan key names,
  e.g. ``encoder.downsamples.0.residual.2.weight``), converted with diffusers'
  ``convert_wan_vae_to_diffusers`` into a locally configured ``AutoencoderKLWan``;
* the diffusers ``vae/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

Both give the same numbers as the official ``wan.modules.vae.WanVAE``: ``encode`` returns the
normalised posterior mean ``(mu - latents_mean) * (1 / latents_std)``, ``decode`` undoes the
normalisation, decodes and clamps to [-1, 1].

The diffusers converter hard-codes the real block layout (``dim_mult [1, 2, 4, 4]``,
``num_res_blocks 2``, ``temperal_downsample [False, True, True]``), so only ``base_dim`` (and
``z_dim``) may differ between the real VAE (base_dim 96) and the tiny test VAE (base_dim 8).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Dict, List, Optional

import torch
from diffusers import AutoencoderKLWan
from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

from .loading import (
    CheckpointError, ConvertedTensor, is_meta, load_file_state_dict, load_state_dict_strict, meta_leftovers,
    open_tensors, require_tensor,
)

__all__ = [
    "WanVAE",
    "TINY_CONFIG",
    "REAL_CONFIG",
    "original_vae_key_names",
    "original_to_diffusers_key_map",
    "save_tiny_original",
    "save_tiny_diffusers",
    "tiny_state_dict",
]

# Block layout shared by every Wan 2.1 VAE the converter understands (see module docstring).
_LAYOUT = dict(
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    attn_scales=[],
    temperal_downsample=[False, True, True],
    dropout=0.0,
)

#: ``AutoencoderKLWan`` kwargs of the real Wan 2.1 VAE (``latents_mean/std`` come from the
#: diffusers defaults, identical to the 16 values in the official ``WanVAE``).
REAL_CONFIG = dict(base_dim=96, z_dim=16, **_LAYOUT)

#: ``AutoencoderKLWan`` kwargs of the tiny test VAE: the real layout with base_dim 8.
TINY_CONFIG = dict(base_dim=8, z_dim=16, **_LAYOUT)

TEMPORAL_STRIDE = 4
SPATIAL_STRIDE = 8


# ---------------------------------------------------------------------------------------------
# Original (Wan) key names and the map to diffusers names
# ---------------------------------------------------------------------------------------------

def _residual_block_keys(prefix: str, has_shortcut: bool) -> List[str]:
    # Original ResidualBlock: residual = [RMS_norm, SiLU, conv3, RMS_norm, SiLU, Dropout, conv3]
    keys = [
        f"{prefix}.residual.0.gamma",
        f"{prefix}.residual.2.weight",
        f"{prefix}.residual.2.bias",
        f"{prefix}.residual.3.gamma",
        f"{prefix}.residual.6.weight",
        f"{prefix}.residual.6.bias",
    ]
    if has_shortcut:
        keys += [f"{prefix}.shortcut.weight", f"{prefix}.shortcut.bias"]
    return keys


def _attention_block_keys(prefix: str) -> List[str]:
    return [
        f"{prefix}.norm.gamma",
        f"{prefix}.to_qkv.weight",
        f"{prefix}.to_qkv.bias",
        f"{prefix}.proj.weight",
        f"{prefix}.proj.bias",
    ]


def _conv_keys(prefix: str) -> List[str]:
    return [f"{prefix}.weight", f"{prefix}.bias"]


def original_vae_key_names() -> List[str]:
    """All state-dict keys of the original Wan 2.1 VAE (``WanVAE_``) for the fixed block layout.

    Derived from the structure of the original model: channel multipliers ``dims`` decide where
    a residual block needs a 1x1 ``shortcut`` (in_dim != out_dim), and ``temperal_downsample``
    decides which resample blocks own a ``time_conv``. The names do not depend on ``base_dim``.
    """
    dim_mult = _LAYOUT["dim_mult"]
    num_res = _LAYOUT["num_res_blocks"]
    t_down = _LAYOUT["temperal_downsample"]
    keys: List[str] = []

    # Encoder: conv1, downsamples (res blocks + resample), middle (res, attn, res), head.
    keys += _conv_keys("encoder.conv1")
    mults = [1] + dim_mult
    idx = 0
    for i, (m_in, m_out) in enumerate(zip(mults[:-1], mults[1:])):
        for r in range(num_res):
            keys += _residual_block_keys(f"encoder.downsamples.{idx}", has_shortcut=(r == 0 and m_in != m_out))
            idx += 1
        if i != len(dim_mult) - 1:
            keys += _conv_keys(f"encoder.downsamples.{idx}.resample.1")
            if t_down[i]:
                keys += _conv_keys(f"encoder.downsamples.{idx}.time_conv")
            idx += 1
    keys += _residual_block_keys("encoder.middle.0", False)
    keys += _attention_block_keys("encoder.middle.1")
    keys += _residual_block_keys("encoder.middle.2", False)
    keys += ["encoder.head.0.gamma"] + _conv_keys("encoder.head.2")

    # Latent 1x1 convs.
    keys += _conv_keys("conv1") + _conv_keys("conv2")

    # Decoder: conv1, middle, upsamples, head. Every resample halves the channels it outputs,
    # so blocks after the first take in_dim = previous out_dim // 2 (hence shortcuts).
    t_up = t_down[::-1]
    keys += _conv_keys("decoder.conv1")
    keys += _residual_block_keys("decoder.middle.0", False)
    keys += _attention_block_keys("decoder.middle.1")
    keys += _residual_block_keys("decoder.middle.2", False)
    dmults = [dim_mult[-1]] + dim_mult[::-1]
    idx = 0
    for i, (m_in, m_out) in enumerate(zip(dmults[:-1], dmults[1:])):
        in_mult = m_in / 2 if i in (1, 2, 3) else m_in
        for r in range(num_res + 1):
            keys += _residual_block_keys(f"decoder.upsamples.{idx}", has_shortcut=(r == 0 and in_mult != m_out))
            idx += 1
        if i != len(dim_mult) - 1:
            keys += _conv_keys(f"decoder.upsamples.{idx}.resample.1")
            if t_up[i]:
                keys += _conv_keys(f"decoder.upsamples.{idx}.time_conv")
            idx += 1
    keys += ["decoder.head.0.gamma"] + _conv_keys("decoder.head.2")
    return keys


_KEY_MAP_CACHE: Optional[Dict[str, str]] = None


def original_to_diffusers_key_map() -> Dict[str, str]:
    """``{original_key: diffusers_key}`` obtained by running diffusers' own converter on the names.

    The converter only renames keys (values pass through untouched), so feeding it
    ``{name: name}`` yields the rename table. Raises if the table is not a bijection.
    """
    global _KEY_MAP_CACHE
    if _KEY_MAP_CACHE is None:
        names = original_vae_key_names()
        if len(set(names)) != len(names):
            raise AssertionError("duplicate original VAE key names")
        converted = convert_wan_vae_to_diffusers({name: name for name in names})
        if len(converted) != len(names):
            raise AssertionError(
                f"diffusers VAE converter is not injective: {len(names)} keys -> {len(converted)} keys"
            )
        _KEY_MAP_CACHE = {orig: new for new, orig in converted.items()}
    return dict(_KEY_MAP_CACHE)


# ---------------------------------------------------------------------------------------------
# Model construction helpers
# ---------------------------------------------------------------------------------------------

def _build_empty(config: dict) -> AutoencoderKLWan:
    """``AutoencoderKLWan`` with parameters on the meta device (no random init cost)."""
    with torch.device("meta"):
        return AutoencoderKLWan(**config)


def _finish(model: AutoencoderKLWan, device=None) -> AutoencoderKLWan:
    leftovers = [] if is_meta(device) else meta_leftovers(model)
    if leftovers:
        raise CheckpointError(f"VAE tensors left unfilled after loading: {leftovers[:5]}")
    return model.eval().requires_grad_(False)


def _infer_config_from_original(state: Dict[str, torch.Tensor]) -> dict:
    """Read base_dim / z_dim off tensor shapes of an original-layout state dict."""
    base_dim = int(require_tensor(state, "encoder.conv1.weight", 5).shape[0])  # [base_dim, 3, 3, 3, 3]
    z_dim = int(require_tensor(state, "conv2.weight", 5).shape[0])  # [z_dim, z_dim, 1, 1, 1]
    return dict(_LAYOUT, base_dim=base_dim, z_dim=z_dim)


# ---------------------------------------------------------------------------------------------
# Tiny random weights
# ---------------------------------------------------------------------------------------------

def tiny_state_dict(seed: int = 0, config: Optional[dict] = None) -> Dict[str, torch.Tensor]:
    """Random fp32 weights for ``config`` (default ``TINY_CONFIG``), keyed by diffusers names.

    Values come from a private ``torch.Generator`` walking the keys in sorted order, so they
    depend only on ``seed`` and the shapes (not on module construction order or global RNG).
    Conv weights ~ N(0, 1/fan_in) keep activations O(1) through the deep tiny network; RMS-norm
    gains ~ 1 + N(0, 0.1^2) so the gains are exercised too.
    """
    config = dict(TINY_CONFIG if config is None else config)
    shapes = {k: tuple(v.shape) for k, v in _build_empty(config).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key in sorted(shapes):
        shape = shapes[key]
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if key.endswith("gamma"):
            state[key] = 1.0 + 0.1 * noise
        elif len(shape) == 1:  # biases
            state[key] = 0.02 * noise
        else:
            fan_in = math.prod(shape[1:])
            state[key] = noise / math.sqrt(fan_in)
    return state


def save_tiny_original(pth_path: str, seed: int = 0) -> str:
    """Write tiny random VAE weights as an original-layout ``Wan2.1_VAE.pth`` (plain state dict)."""
    diffusers_state = tiny_state_dict(seed)
    to_diffusers = original_to_diffusers_key_map()
    original_state = {orig: diffusers_state[new].clone() for orig, new in to_diffusers.items()}
    if len(original_state) != len(diffusers_state):
        raise AssertionError("original/diffusers VAE key sets differ")
    os.makedirs(os.path.dirname(os.path.abspath(pth_path)), exist_ok=True)
    torch.save(original_state, pth_path)
    return pth_path


def save_tiny_diffusers(vae_dir: str, seed: int = 0) -> str:
    """Write the same tiny random VAE (same ``seed`` -> same weights) as a diffusers ``vae/`` folder."""
    model = _build_empty(dict(TINY_CONFIG))
    model.load_state_dict(tiny_state_dict(seed), strict=True, assign=True)
    model.save_pretrained(vae_dir, safe_serialization=True)
    return vae_dir


def _diffusers_weight_files(folder: str) -> list:
    """``diffusion_pytorch_model.safetensors`` (or its sharded index, or the ``.bin``) of a diffusers folder."""
    import json
    from pathlib import Path

    folder = Path(folder)
    for single, index in (("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json"),
                          ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json")):
        if (folder / single).exists():
            return [folder / single]
        if (folder / index).exists():
            return [folder / n for n in sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))]
    raise CheckpointError(f"no VAE weights in {folder} (diffusion_pytorch_model.safetensors)")


# ---------------------------------------------------------------------------------------------
# The wrapper
# ---------------------------------------------------------------------------------------------

class WanVAE:
    """Wan 2.1 VAE with the official normalised-latent interface.

    Attributes:
        model: the wrapped ``diffusers.AutoencoderKLWan`` (eval mode, no grad).
        latents_mean, latents_std: ``[z_dim]`` float32 tensors (from the model config).
        dtype, device: where the weights live; inputs are cast to them, outputs are float32.
    """

    def __init__(self, model: AutoencoderKLWan, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        # Cast only when needed: diffusers warns on every dtype `.to()`, even a no-op one.
        if next(model.parameters()).dtype != dtype:
            model = model.to(dtype=dtype)
        self.model = model.to(device=device).eval().requires_grad_(False)
        self.device = torch.device(device)
        self.dtype = dtype
        # AutoencoderKLWan keeps its causal-conv frame cache and the tiling switch on the
        # module: two encodes/decodes at once on one model corrupt each other (wrong frame
        # counts, mixed frames). Calls on one WanVAE therefore run one at a time.
        self._lock = threading.Lock()
        z_dim = model.config.z_dim
        mean = model.config.latents_mean
        std = model.config.latents_std
        if mean is None or std is None or len(mean) != z_dim or len(std) != z_dim:
            raise ValueError(f"VAE config needs latents_mean/latents_std with {z_dim} values each")
        # Kept in float32 like the official WanVAE(dtype=float): the (de)normalisation is done in
        # fp32 regardless of the weight dtype.
        self.latents_mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.latents_std = torch.tensor(std, dtype=torch.float32, device=self.device)
        # The official code multiplies by a precomputed 1/std (and divides by it when decoding);
        # keeping the same arithmetic keeps results bit-identical.
        self._inv_std = 1.0 / self.latents_std

    @property
    def z_dim(self) -> int:
        return int(self.model.config.z_dim)

    # ---- loading ---------------------------------------------------------------------------

    @classmethod
    def from_original(cls, pth_path: str, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.float32) -> "WanVAE":
        """Load an original-layout checkpoint (``Wan2.1_VAE.pth`` or a ``.safetensors`` of it).

        ``base_dim``/``z_dim`` are read off tensor shapes; the config is built locally (no hub).
        Loading is strict: every file key must map to a model parameter with the same shape and
        every parameter must be filled, otherwise a ``CheckpointError`` names the key(s).
        ``device="meta"`` checks the file without reading tensor data.
        """
        state = load_file_state_dict(pth_path, device)
        if not isinstance(state, dict):
            raise TypeError(f"{pth_path}: expected a plain state dict, got {type(state).__name__}")
        config = _infer_config_from_original(state)
        model = _build_empty(config)
        to_diffusers = original_to_diffusers_key_map()
        # diffusers' converter renames key by key, so converting only the known keys is exact.
        renamed = convert_wan_vae_to_diffusers({k: v for k, v in state.items() if k in to_diffusers})
        converted = {new: ConvertedTensor(orig, tuple(state[orig].shape), renamed[new])
                     for orig, new in to_diffusers.items() if orig in state}
        load_state_dict_strict(
            model, converted, dtype, device=device,
            unexpected_source_keys=[k for k in state if k not in to_diffusers],
            missing_source_keys={new: orig for orig, new in to_diffusers.items()},
        )
        return cls(_finish(model, device), device=device, dtype=dtype)

    @classmethod
    def from_pretrained(cls, vae_dir: str, device: torch.device | str = "cpu",
                        dtype: torch.dtype = torch.float32) -> "WanVAE":
        """Load a diffusers ``vae/`` folder (local path only; never touches a hub), strictly:
        built from its ``config.json`` on meta and filled tensor by tensor, a missing, unknown
        or misshapen tensor is a :class:`CheckpointError` naming it (diffusers'
        ``from_pretrained`` only warns about unexpected keys). ``device="meta"``: no data is read."""
        config = AutoencoderKLWan.load_config(str(vae_dir), local_files_only=True)
        with torch.device("meta"):
            model = AutoencoderKLWan.from_config(config)
        converted = {}
        for path in _diffusers_weight_files(vae_dir):
            with open_tensors(path, device=device) as items:
                for key, load, shape in items:
                    if key in converted:
                        raise CheckpointError(f"key {key!r} appears twice (again in {path})")
                    converted[key] = ConvertedTensor(key, shape, load())
        load_state_dict_strict(model, converted, dtype, device=device)
        return cls(_finish(model, device), device=device, dtype=dtype)

    # ---- encode / decode ---------------------------------------------------------------------

    @staticmethod
    def latent_shape(num_frames: int, height: int, width: int) -> tuple:
        """Latent ``(T', H', W')`` for a ``num_frames x height x width`` video (T' = 1 + (T-1)//4)."""
        return (1 + (num_frames - 1) // TEMPORAL_STRIDE, height // SPATIAL_STRIDE, width // SPATIAL_STRIDE)

    def _set_tiling(self, tiled: bool, tile_size: int, tile_stride: int) -> None:
        if tiled:
            self.model.enable_tiling(
                tile_sample_min_height=tile_size,
                tile_sample_min_width=tile_size,
                tile_sample_stride_height=tile_stride,
                tile_sample_stride_width=tile_stride,
            )
        else:
            self.model.disable_tiling()

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tiled: bool = False, tile_size: int = 256,
               tile_stride: int = 192) -> torch.Tensor:
        """Encode pixels to normalised latents (official ``WanVAE.encode`` semantics).

        Args:
            video: ``[B, 3, T, H, W]`` in [-1, 1]; H and W multiples of 8. Frames beyond
                ``1 + 4 * ((T - 1) // 4)`` are ignored, as in the official causal encoder.
            tiled: encode in overlapping spatial tiles of ``tile_size`` pixels, moved by
                ``tile_stride`` (blended seams; approximate, only for memory).
        Returns:
            ``[B, z_dim, 1 + (T - 1) // 4, H / 8, W / 8]`` float32: ``(mu - mean) * (1 / std)``.
        """
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"expected video [B, 3, T, H, W], got {tuple(video.shape)}")
        with self._lock:
            self._set_tiling(tiled, tile_size, tile_stride)
            try:
                x = video.to(device=self.device, dtype=self.dtype)
                posterior_mean = self.model.encode(x).latent_dist.mean  # [B, z, T', H/8, W/8]
            finally:
                self.model.disable_tiling()
        mu = posterior_mean.float()
        shape = (1, self.z_dim, 1, 1, 1)
        return (mu - self.latents_mean.view(shape)) * self._inv_std.view(shape)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tiled: bool = False, tile_size: int = 256,
               tile_stride: int = 192) -> torch.Tensor:
        """Decode normalised latents to pixels (official ``WanVAE.decode`` semantics).

        Args:
            latents: ``[B, z_dim, T', H', W']`` normalised latents (as returned by ``encode``).
            tiled: decode in overlapping spatial tiles of ``tile_size`` output pixels, moved by
                ``tile_stride`` pixels (diffusers' ``enable_tiling``; defaults = diffusers'
                256/192, i.e. 64 px blended overlap). Lowers peak memory for large frames
                (e.g. 720p) but changes the numbers slightly near tile seams; tiling only
                kicks in when the frame is larger than one tile.
        Returns:
            ``[B, 3, 1 + 4 * (T' - 1), 8 * H', 8 * W']`` float32 clamped to [-1, 1].
        """
        if latents.ndim != 5 or latents.shape[1] != self.z_dim:
            raise ValueError(f"expected latents [B, {self.z_dim}, T, H, W], got {tuple(latents.shape)}")
        shape = (1, self.z_dim, 1, 1, 1)
        z = latents.to(device=self.device, dtype=torch.float32)
        z = z / self._inv_std.view(shape) + self.latents_mean.view(shape)
        with self._lock:
            self._set_tiling(tiled, tile_size, tile_stride)
            try:
                video = self.model.decode(z.to(self.dtype)).sample
            finally:
                self.model.disable_tiling()
        return video.float().clamp_(-1.0, 1.0)
