"""CLIP image encoder of Wan 2.1 I2V (the visual tower of open-clip XLM-RoBERTa ViT-H/14).

The network is transformers' ``CLIPVisionModel``; this module adds:

* loading of Wan's ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (Wan key names
  under ``visual.``, fused qkv split, config inferred from shapes, strict; the text tower
  ``textual.*``, ``log_scale`` and the unused projection ``visual.head`` are skipped on purpose),
* loading of the diffusers layout (``image_encoder/`` + ``image_processor/``),
* Wan's ``CLIPModel.visual`` semantics: bicubic resize of a [-1, 1] image to 224x224, CLIP
  mean/std normalisation, and the hidden states after all blocks but the last
  (``use_31_block=True``), without the post-norm,
* tiny random weights in both layouts for tests.

Shapes: the real tower has hidden size D = 1280 and returns 257 tokens (1 class token +
16x16 patches of 14 pixels).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .loading import (
    CheckpointError, ConvertedTensor, is_allowed_extra, load_file_state_dict, load_pretrained_strict,
    load_state_dict_strict, require_tensor,
)

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "INTENTIONALLY_SKIPPED",
    "TINY_CONFIG",
    "ImageEncoder",
    "convert_original_state_dict",
    "infer_config_from_original",
    "preprocess",
    "save_tiny_original",
    "save_tiny_diffusers",
]

# OpenAI CLIP normalisation, which Wan uses for the XLM-RoBERTa ViT-H/14.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Keys of the original file that Wan never uses for I2V: the text tower, the contrastive
# temperature, and the visual projection head (Wan takes hidden states, not the pooled embedding).
INTENTIONALLY_SKIPPED = ("textual.*", "log_scale", "visual.head")


def _is_intentionally_skipped(key: str) -> bool:
    # The shared, commented allow-list of real extras (multitalk.modules.loading.ALLOWED_EXTRA_KEYS).
    return is_allowed_extra("clip_original", key)


# open-clip ViT-H/14 settings that the file's shapes do not reveal.
_LAYER_NORM_EPS = 1e-5  # Wan's LayerNorm default (norm_eps=1e-5)
_HIDDEN_ACT = "gelu"  # Wan's ViT-H config uses activation='gelu' = nn.GELU() (exact erf GELU)
# Head count by hidden size (the fused qkv weight does not encode it): ViT-H/14 and the tiny test tower.
_NUM_HEADS_BY_HIDDEN = {1280: 16, 32: 4}


# --------------------------------------------------------------------------------------
# Wan original key names <-> transformers CLIP vision tower names
# --------------------------------------------------------------------------------------
_ORIGINAL_LAYER_KEY = re.compile(r"^visual\.transformer\.(\d+)\.(.+)$")
_LAYER_RENAMES = {
    "norm1.weight": "layer_norm1.weight",
    "norm1.bias": "layer_norm1.bias",
    "attn.proj.weight": "self_attn.out_proj.weight",
    "attn.proj.bias": "self_attn.out_proj.bias",
    "norm2.weight": "layer_norm2.weight",
    "norm2.bias": "layer_norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.2.weight": "mlp.fc2.weight",
    "mlp.2.bias": "mlp.fc2.bias",
}
_TOP_RENAMES = {
    "visual.patch_embedding.weight": "embeddings.patch_embedding.weight",
    "visual.pre_norm.weight": "pre_layrnorm.weight",
    "visual.pre_norm.bias": "pre_layrnorm.bias",
    "visual.post_norm.weight": "post_layernorm.weight",
    "visual.post_norm.bias": "post_layernorm.bias",
}


def _original_name(hf_name: str) -> str | None:
    """Tower parameter name -> Wan checkpoint key (for error messages)."""
    special = {
        "embeddings.class_embedding": "visual.cls_embedding",
        "embeddings.position_embedding.weight": "visual.pos_embedding",
    }
    if hf_name in special:
        return special[hf_name]
    for original, hf in _TOP_RENAMES.items():
        if hf == hf_name:
            return original
    match = re.match(r"^encoder\.layers\.(\d+)\.(.+)$", hf_name)
    if match:
        prefix = f"visual.transformer.{match.group(1)}."
        fused = re.match(r"^self_attn\.[qkv]_proj\.(weight|bias)$", match.group(2))
        if fused:
            return prefix + f"attn.to_qkv.{fused.group(1)}"
        for original, hf in _LAYER_RENAMES.items():
            if hf == match.group(2):
                return prefix + original
    return None


def infer_config_from_original(state_dict: Mapping[str, torch.Tensor], num_heads: int | None = None):
    """Build a ``CLIPVisionConfig`` from the shapes of Wan's CLIP checkpoint (``visual.*`` keys).

    Shapes used: ``visual.patch_embedding.weight`` [D, 3, p, p], ``visual.pos_embedding``
    [1, 1 + (image/p)^2, D], ``visual.transformer.0.mlp.0.weight`` [mlp, D], the layer count is
    the number of ``visual.transformer.N``; ``visual.head`` [D, proj] gives projection_dim.
    The head count is not stored in the file: pass ``num_heads`` or rely on the known sizes
    (D=1280 -> 16 heads, ViT-H/14; D=32 -> 4, the tiny tower).
    """
    from transformers import CLIPVisionConfig

    hidden, channels, patch, patch_w = require_tensor(state_dict, "visual.patch_embedding.weight", 4).shape
    positions = require_tensor(state_dict, "visual.pos_embedding", 3).shape[1]
    intermediate = require_tensor(state_dict, "visual.transformer.0.mlp.0.weight", 2).shape[0]
    layer_ids = {int(m.group(1)) for k in state_dict if (m := _ORIGINAL_LAYER_KEY.match(k))}
    grid = int(round((positions - 1) ** 0.5))
    if patch != patch_w or grid * grid != positions - 1:
        raise CheckpointError(
            f"'visual.pos_embedding' has {positions} positions and 'visual.patch_embedding.weight' a "
            f"{patch}x{patch_w} kernel: not a square grid plus a class token"
        )
    if num_heads is None:
        if hidden not in _NUM_HEADS_BY_HIDDEN:
            raise CheckpointError(
                f"cannot infer the head count for hidden size {hidden}: pass num_heads explicitly"
            )
        num_heads = _NUM_HEADS_BY_HIDDEN[hidden]
    head = state_dict.get("visual.head")
    projection_dim = int(head.shape[1]) if head is not None and head.ndim == 2 else 512
    return CLIPVisionConfig(
        hidden_size=int(hidden),
        intermediate_size=int(intermediate),
        num_hidden_layers=max(layer_ids) + 1,
        num_attention_heads=int(num_heads),
        num_channels=int(channels),
        image_size=int(grid * patch),
        patch_size=int(patch),
        hidden_act=_HIDDEN_ACT,
        layer_norm_eps=_LAYER_NORM_EPS,
        projection_dim=projection_dim,
    )


def convert_original_state_dict(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, ConvertedTensor], list[str], list[str]]:
    """Convert Wan ``visual.*`` keys to CLIP vision tower names (relative to the tower module).

    The fused ``attn.to_qkv`` [3D, D] is split into q/k/v (Wan views its output as
    [..., 3, heads, head_dim], so rows [0:D] are q, [D:2D] k, [2D:3D] v); the class and
    position embeddings lose their leading singleton dims. Splits and reshapes are views.

    Returns:
        (converted: tower name -> ConvertedTensor, unexpected: keys with no rule,
         skipped: keys skipped on purpose, see ``INTENTIONALLY_SKIPPED``)
    """
    converted: dict[str, ConvertedTensor] = {}
    unexpected: list[str] = []
    skipped: list[str] = []
    for key, tensor in state_dict.items():
        shape = tuple(tensor.shape)
        if _is_intentionally_skipped(key):
            skipped.append(key)
        elif key in _TOP_RENAMES:
            converted[_TOP_RENAMES[key]] = ConvertedTensor(key, shape, tensor)
        elif key == "visual.cls_embedding":  # [1, 1, D] -> [D]
            converted["embeddings.class_embedding"] = ConvertedTensor(key, shape, tensor.reshape(-1))
        elif key == "visual.pos_embedding":  # [1, N, D] -> [N, D]
            flat = tensor.reshape(tensor.shape[-2], tensor.shape[-1]) if tensor.ndim == 3 else tensor
            converted["embeddings.position_embedding.weight"] = ConvertedTensor(key, shape, flat)
        elif match := _ORIGINAL_LAYER_KEY.match(key):
            prefix, name = f"encoder.layers.{match.group(1)}.", match.group(2)
            if name in ("attn.to_qkv.weight", "attn.to_qkv.bias"):
                if shape[0] % 3:
                    raise CheckpointError(
                        f"shape mismatch for {key!r}: checkpoint has {shape}, first dim must be 3 * hidden"
                    )
                kind = name.rsplit(".", 1)[1]
                for part, projection in zip(tensor.chunk(3, dim=0), ("q_proj", "k_proj", "v_proj")):
                    converted[f"{prefix}self_attn.{projection}.{kind}"] = ConvertedTensor(key, shape, part)
            elif name in _LAYER_RENAMES:
                converted[prefix + _LAYER_RENAMES[name]] = ConvertedTensor(key, shape, tensor)
            else:
                unexpected.append(key)
        else:
            unexpected.append(key)
    return converted, unexpected, skipped


def _vision_tower(model: nn.Module) -> nn.Module:
    """The module holding ``embeddings`` / ``pre_layrnorm`` / ``encoder`` / ``post_layernorm``.

    ``CLIPVisionModelWithProjection`` (and ``CLIPVisionModel`` before transformers 5) nest it
    as ``.vision_model``; transformers 5's ``CLIPVisionModel`` is the tower itself.
    """
    return model.vision_model if hasattr(model, "vision_model") else model


def _build_from_original(
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype,
    num_heads: int | None = None,
    with_projection: bool = False,
    device: str | torch.device | None = None,
) -> tuple[nn.Module, list[str]]:
    """Build a CLIPVisionModel (or ...WithProjection, then ``visual.head`` fills the projection)
    from an original state dict, strictly. Returns (model on ``device``, default where the
    tensors are, skipped keys)."""
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    config = infer_config_from_original(state_dict, num_heads)
    converted, unexpected, skipped = convert_original_state_dict(state_dict)
    model_cls = CLIPVisionModelWithProjection if with_projection else CLIPVisionModel
    with torch.device("meta"):
        model = model_cls(config)
    tower = _vision_tower(model)
    load_state_dict_strict(
        tower,
        converted,
        dtype,
        device=device,
        unexpected_source_keys=unexpected,
        missing_source_keys={n: o for n in tower.state_dict() if (o := _original_name(n))},
    )
    if with_projection:
        # visual.head is [D, proj] and used as x @ head; a Linear stores the transpose.
        head = state_dict["visual.head"]
        model.visual_projection.weight = nn.Parameter(head.t().to(dtype), requires_grad=False)
        skipped = [k for k in skipped if k != "visual.head"]
    # Non-persistent buffer (not in the file): rebuild it off the meta device.
    embeddings = tower.embeddings
    embeddings.position_ids = torch.arange(embeddings.num_positions).expand((1, -1))
    model.config.dtype = dtype
    return model, skipped


def _load_vision_folder(model_cls, config, folder, dtype: torch.dtype, device) -> nn.Module:
    """``model_cls`` from a transformers folder through the strict loader. Files saved with
    the tower nested as ``vision_model.`` load into transformers 5's ``CLIPVisionModel``
    (the tower itself) with that prefix dropped."""
    with torch.device("meta"):
        names = set(model_cls(config).state_dict())
    nested = any(n.startswith("vision_model.") for n in names)

    def rename(key: str) -> str:
        return key if nested or not key.startswith("vision_model.") else key[len("vision_model."):]

    model = load_pretrained_strict(model_cls, folder, dtype, device, config=config, rename=rename,
                                   source_name=lambda n: n if nested else "vision_model." + n)
    embeddings = _vision_tower(model).embeddings  # the non-persistent buffer, rebuilt off meta
    embeddings.position_ids = torch.arange(embeddings.num_positions, device=device).expand((1, -1))
    model.config.dtype = dtype
    return model.to(device)


# --------------------------------------------------------------------------------------
# Preprocessing (Wan's CLIPModel.visual)
# --------------------------------------------------------------------------------------
def preprocess(
    image: torch.Tensor,
    image_size: int = 224,
    mean: tuple[float, ...] = CLIP_MEAN,
    std: tuple[float, ...] = CLIP_STD,
) -> torch.Tensor:
    """[-1, 1] image(s) -> CLIP pixel values, as Wan's ``CLIPModel.visual`` does.

    Bicubic resize to ``image_size`` x ``image_size`` (no antialiasing, aspect ratio not kept,
    no clamping of bicubic overshoot), map to [0, 1], normalise with ``mean``/``std``.

    Args:
        image: [B, 3, H, W] in [-1, 1] (float).
    Returns:
        [B, 3, image_size, image_size] float32.
    """
    pixels = F.interpolate(
        image.float(), size=(image_size, image_size), mode="bicubic", align_corners=False
    )
    pixels = pixels * 0.5 + 0.5
    mean_t = torch.tensor(mean, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=pixels.dtype, device=pixels.device).view(1, -1, 1, 1)
    return (pixels - mean_t) / std_t


# --------------------------------------------------------------------------------------
# The encoder
# --------------------------------------------------------------------------------------
class ImageEncoder:
    """CLIP vision tower returning Wan's I2V image tokens (penultimate block, no post-norm).

    Args:
        model: a ``CLIPVisionModel`` or ``CLIPVisionModelWithProjection`` (projection unused).
        mean, std: per-channel normalisation (CLIP's by default).
        skipped_keys: checkpoint keys that were deliberately not loaded (for inspection).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        mean: tuple[float, ...] = CLIP_MEAN,
        std: tuple[float, ...] = CLIP_STD,
        skipped_keys: list[str] | None = None,
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tower = _vision_tower(self.model)
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.skipped_keys = list(skipped_keys or [])

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_original(
        cls,
        pth_path: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        num_heads: int | None = None,
    ) -> "ImageEncoder":
        """Load Wan's ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``.

        Only the visual tower is loaded; ``textual.*``, ``log_scale`` and ``visual.head`` are
        skipped on purpose (listed in ``skipped_keys``). Every other key must map to a
        parameter and every parameter be filled, else :class:`CheckpointError`.
        The file is memory-mapped; tensors already in ``dtype`` are used without a copy.
        """
        state_dict = load_file_state_dict(pth_path, device)  # meta: no tensor data is read
        model, skipped = _build_from_original(state_dict, dtype, num_heads, device=device)
        del state_dict
        model.to(device)
        return cls(model, skipped_keys=skipped)

    @classmethod
    def from_pretrained(
        cls,
        image_encoder_dir: str | os.PathLike,
        image_processor_dir: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "ImageEncoder":
        """Load a transformers CLIP vision folder (``CLIPVisionModel`` or ``...WithProjection``,
        as named in its config's ``architectures``), strictly: a missing, unknown or misshapen
        tensor is a :class:`CheckpointError` naming it (``device="meta"``: no data is read).
        The optional image processor folder supplies mean/std; resizing always follows Wan
        (bicubic to the model's image size)."""
        from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

        image_encoder_dir = Path(image_encoder_dir)
        config = json.loads((image_encoder_dir / "config.json").read_text())
        architectures = config.get("architectures") or []
        model_cls = (
            CLIPVisionModelWithProjection
            if "CLIPVisionModelWithProjection" in architectures
            else CLIPVisionModel
        )
        model = _load_vision_folder(model_cls, CLIPVisionConfig.from_pretrained(os.fspath(image_encoder_dir)),
                                    image_encoder_dir, dtype, device)
        mean, std = CLIP_MEAN, CLIP_STD
        if image_processor_dir is not None:
            processor_file = Path(image_processor_dir) / "preprocessor_config.json"
            if processor_file.exists():
                processor = json.loads(processor_file.read_text())
                mean = tuple(processor.get("image_mean", mean))
                std = tuple(processor.get("image_std", std))
        return cls(model, mean=mean, std=std)

    @classmethod
    def from_diffusers(
        cls,
        root: str | os.PathLike,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> "ImageEncoder":
        """Load ``root/image_encoder`` + ``root/image_processor`` (the diffusers Wan I2V layout)."""
        root = Path(root)
        processor_dir = root / "image_processor"
        return cls.from_pretrained(
            root / "image_encoder", processor_dir if processor_dir.is_dir() else None, device, dtype
        )

    # ---------------------------------------------------------------- properties
    @property
    def device(self) -> torch.device:
        return self.tower.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.embeddings.patch_embedding.weight.dtype

    @property
    def image_size(self) -> int:
        return int(self.model.config.image_size)

    @property
    def dim(self) -> int:
        """Hidden size of the returned tokens (1280 for ViT-H/14)."""
        return int(self.model.config.hidden_size)

    @property
    def num_tokens(self) -> int:
        """Tokens per image: class token + patches (257 for 224 / 14)."""
        return (self.image_size // int(self.model.config.patch_size)) ** 2 + 1

    def to(self, device: str | torch.device) -> "ImageEncoder":
        self.model.to(device)
        return self

    # ---------------------------------------------------------------- encoding
    @torch.inference_mode()
    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """Image tokens for the DiT's image cross-attention.

        Args:
            image: [B, 3, H, W] in [-1, 1] (or [B, 3, T, H, W]: frames are encoded one by one,
                stacked along the batch dim as Wan does). Any device/dtype.
        Returns:
            [B(*T), num_tokens, D] in the model's dtype on its device (257 x 1280 for ViT-H/14):
            hidden states after all transformer blocks but the last, without the post-norm.
        """
        if image.ndim == 5:
            image = image.transpose(1, 2).flatten(0, 1)
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"expected an image of shape [B, 3, H, W], got {tuple(image.shape)}")
        pixels = preprocess(image.to(self.device), self.image_size, self.mean, self.std)
        tower = self.tower
        hidden = tower.embeddings(pixels.to(self.dtype))
        hidden = tower.pre_layrnorm(hidden)
        # The last block's output is not used (Wan's use_31_block=True), so it is not computed.
        for layer in tower.encoder.layers[:-1]:
            hidden = layer(hidden, None)
        return hidden

    def __repr__(self) -> str:
        cfg = self.model.config
        return (
            f"ImageEncoder(hidden={cfg.hidden_size}, layers={cfg.num_hidden_layers}, "
            f"heads={cfg.num_attention_heads}, image={cfg.image_size}/{cfg.patch_size}, "
            f"device={self.device}, dtype={self.dtype})"
        )


# --------------------------------------------------------------------------------------
# Tiny random weights for tests
# --------------------------------------------------------------------------------------
TINY_CONFIG = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "image_size": 224,
    "patch_size": 14,  # 16x16 patches + class token = 257 tokens, as the real tower
    "projection_dim": 16,
}
# Small stand-in for the XLM-RoBERTa text tower, only so the tiny file has ``textual.*`` keys.
_TINY_TEXT_VOCAB, _TINY_TEXT_DIM, _TINY_TEXT_POSITIONS = 10, 8, 6


def _tiny_original_state_dict(seed: int) -> dict[str, torch.Tensor]:
    """Random fp32 weights with Wan's CLIP key names, generated in a fixed order from ``seed``."""
    cfg = TINY_CONFIG
    generator = torch.Generator().manual_seed(seed)
    d, mlp, p = cfg["hidden_size"], cfg["intermediate_size"], cfg["patch_size"]
    positions = (cfg["image_size"] // p) ** 2 + 1

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    state = {
        "visual.cls_embedding": randn(1, 1, d, std=d**-0.5),
        "visual.pos_embedding": randn(1, positions, d, std=d**-0.5),
        "visual.patch_embedding.weight": randn(d, 3, p, p, std=(3 * p * p) ** -0.5),
        "visual.pre_norm.weight": 1.0 + randn(d, std=0.1),
        "visual.pre_norm.bias": randn(d, std=0.1),
    }
    for i in range(cfg["num_hidden_layers"]):
        prefix = f"visual.transformer.{i}."
        state[prefix + "norm1.weight"] = 1.0 + randn(d, std=0.1)
        state[prefix + "norm1.bias"] = randn(d, std=0.1)
        state[prefix + "attn.to_qkv.weight"] = randn(3 * d, d, std=d**-0.5)
        state[prefix + "attn.to_qkv.bias"] = randn(3 * d, std=0.1)
        state[prefix + "attn.proj.weight"] = randn(d, d, std=d**-0.5)
        state[prefix + "attn.proj.bias"] = randn(d, std=0.1)
        state[prefix + "norm2.weight"] = 1.0 + randn(d, std=0.1)
        state[prefix + "norm2.bias"] = randn(d, std=0.1)
        state[prefix + "mlp.0.weight"] = randn(mlp, d, std=d**-0.5)
        state[prefix + "mlp.0.bias"] = randn(mlp, std=0.1)
        state[prefix + "mlp.2.weight"] = randn(d, mlp, std=mlp**-0.5)
        state[prefix + "mlp.2.bias"] = randn(d, std=0.1)
    state["visual.post_norm.weight"] = 1.0 + randn(d, std=0.1)
    state["visual.post_norm.bias"] = randn(d, std=0.1)
    state["visual.head"] = randn(d, cfg["projection_dim"], std=d**-0.5)
    # A few text-tower keys and the temperature, as the real file has them (ignored on load).
    t = _TINY_TEXT_DIM
    state["textual.token_embedding.weight"] = randn(_TINY_TEXT_VOCAB, t, std=1.0)
    state["textual.type_embedding.weight"] = randn(1, t, std=1.0)
    state["textual.pos_embedding.weight"] = randn(_TINY_TEXT_POSITIONS, t, std=1.0)
    state["textual.norm.weight"] = torch.ones(t)
    state["textual.norm.bias"] = torch.zeros(t)
    state["textual.blocks.0.attn.q.weight"] = randn(t, t, std=t**-0.5)
    state["textual.head.0.weight"] = randn(t, t, std=t**-0.5)
    state["log_scale"] = torch.tensor(float(torch.log(torch.tensor(1 / 0.07))))
    return state


def save_tiny_original(pth_path: str | os.PathLike, seed: int = 0) -> None:
    """Write tiny random CLIP weights in Wan's original layout (``torch.save``)."""
    Path(pth_path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(_tiny_original_state_dict(seed), os.fspath(pth_path))


def save_tiny_diffusers(
    image_encoder_dir: str | os.PathLike, image_processor_dir: str | os.PathLike, seed: int = 0
) -> None:
    """Write the same weights as :func:`save_tiny_original` (same seed) as a
    ``CLIPVisionModelWithProjection`` folder (as in the diffusers Wan I2V layout; its
    ``visual_projection`` is ``visual.head`` transposed) and a CLIP ``preprocessor_config.json``."""
    model, _ = _build_from_original(_tiny_original_state_dict(seed), torch.float32, with_projection=True)
    model.save_pretrained(os.fspath(image_encoder_dir))
    size = TINY_CONFIG["image_size"]
    # Written as JSON directly: CLIPImageProcessor would need PIL/torchvision just to be built.
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": size},
        "resample": 3,  # PIL bicubic
        "do_center_crop": True,
        "crop_size": {"height": size, "width": size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "do_convert_rgb": True,
    }
    Path(image_processor_dir).mkdir(parents=True, exist_ok=True)
    (Path(image_processor_dir) / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
