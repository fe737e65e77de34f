"""The real full-size checkpoint layouts: regenerate their manifests, or write a tree of
placeholder files that carries exactly those keys, shapes and dtypes.

    # Regenerate tests/data/real_layouts/*.json. The official model definitions are imported
    # from checkouts OUTSIDE this repository (nothing of them is committed):
    python bench/real_layouts.py manifests --multitalk-repo /work/ext/MultiTalk [--wan-repo /work/ext/wan21]

    # A models root that mimics the real one (file names, keys, shapes, dtypes, file sizes;
    # the data is zeros and costs no disk: safetensors data regions are sparse, .pth tensors
    # have one-element storage):
    python bench/real_layouts.py tree /tmp/real-models --layout official   # or diffusers
    python -m multitalk.cli check /tmp/real-models --plan

What each manifest is derived from:

* ``dit_base`` / ``multitalk_adapter``: the official MultiTalk ``WanModel``
  (``wan/modules/multitalk_model.py``) built on the meta device with the config.json of
  ``Wan2.1-I2V-14B-480P`` (dim 5120, 40 layers, 40 heads, ffn 13824, in_dim 36) and the
  adapter defaults; keys split by :func:`multitalk.checkpoints.dit.is_adapter_key`.
* ``umt5_xxl``: Wan's ``umt5_xxl(encoder_only=True)`` (``wan/modules/t5.py``).
* ``clip``: Wan's ``clip_xlm_roberta_vit_h_14()`` (``wan/modules/clip.py``): the whole
  open-clip model, text tower included, as the ``.pth`` holds it.
* ``vae``: Wan's ``WanVAE_`` at the ``_video_vae`` config (``wan/modules/vae.py``).
* ``wav2vec2``: transformers' ``Wav2Vec2ForPreTraining`` at the wav2vec2-base config that
  ``chinese-wav2vec2-base/config.json`` carries, with the positional conv's weight norm under
  the ``weight_g``/``weight_v`` names the file (saved by transformers 4.x) uses.
* ``diffusers_transformer``: diffusers' own ``convert_wan_transformer_to_diffusers`` of the
  1303 base keys, plus the 40 zero ``blocks.N.attn2.norm_added_q.weight`` the published
  shards carry (REFERENCE.md); cross-checked against ``WanTransformer3DModel`` at the I2V-14B
  config on meta.
* ``diffusers_text_encoder`` / ``diffusers_image_encoder`` / ``diffusers_vae``: the
  transformers/diffusers classes of the diffusers layout at the real configs (these are the
  components this project builds itself from those libraries); the stored dtypes of these
  three are not published in REFERENCE.md and are recorded as assumptions.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MANIFEST_DIR = REPO / "tests" / "data" / "real_layouts"

# ``Wan2.1-I2V-14B-480P/config.json`` (the official WanModel config; text_dim 4096 and the
# audio adapter values are the class defaults).
WAN_I2V_14B_CONFIG = {
    "_class_name": "WanModel", "_diffusers_version": "0.30.0", "model_type": "i2v", "dim": 5120, "eps": 1e-06,
    "ffn_dim": 13824, "freq_dim": 256, "in_dim": 36, "num_heads": 40, "num_layers": 40, "out_dim": 16,
    "text_len": 512,
}

# ``chinese-wav2vec2-base/config.json``: the wav2vec2-base architecture (fairseq base config)
# saved from ``Wav2Vec2ForPreTraining``.
WAV2VEC2_BASE_CONFIG = {
    "architectures": ["Wav2Vec2ForPreTraining"], "model_type": "wav2vec2", "hidden_size": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
    "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2], "conv_stride": [5, 2, 2, 2, 2, 2, 2],
    "conv_bias": False, "feat_extract_norm": "group", "feat_extract_activation": "gelu",
    "do_stable_layer_norm": False, "num_conv_pos_embeddings": 128, "num_conv_pos_embedding_groups": 16,
    "codevector_dim": 256, "proj_codevector_dim": 256, "num_codevectors_per_group": 320,
    "num_codevector_groups": 2, "layer_norm_eps": 1e-5, "vocab_size": 32, "apply_spec_augment": True,
    "mask_time_prob": 0.05,
}

WAV2VEC2_PREPROCESSOR_CONFIG = {
    "do_normalize": True, "feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1,
    "padding_side": "right", "padding_value": 0.0, "return_attention_mask": False, "sampling_rate": 16000,
}

# UMT5-XXL in transformers terms (what Wan's umt5_xxl is; see multitalk.modules.text_encoder).
UMT5_XXL_HF_CONFIG = {
    "architectures": ["UMT5EncoderModel"], "model_type": "umt5", "vocab_size": 256384, "d_model": 4096,
    "d_kv": 64, "d_ff": 10240, "num_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "feed_forward_proj": "gated-gelu", "layer_norm_epsilon": 1e-6,
    "dropout_rate": 0.1, "is_encoder_decoder": False, "tie_word_embeddings": False, "use_cache": False,
}

# The open-clip XLM-RoBERTa ViT-H/14 visual tower as a transformers CLIP vision model.
CLIP_VIT_H_HF_CONFIG = {
    "architectures": ["CLIPVisionModelWithProjection"], "model_type": "clip_vision_model", "hidden_size": 1280,
    "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16, "image_size": 224,
    "patch_size": 14, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5, "num_channels": 3,
}

DIFFUSERS_I2V_14B_TRANSFORMER_CONFIG = {
    "_class_name": "WanTransformer3DModel", "_diffusers_version": "0.33.0.dev0", "added_kv_proj_dim": 5120,
    "attention_head_dim": 128, "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 13824, "freq_dim": 256,
    "image_dim": 1280, "in_channels": 36, "num_attention_heads": 40, "num_layers": 40, "out_channels": 16,
    "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 1024, "text_dim": 4096,
}

# How each component is stored in the real set: file name(s) and dtype.
COMPONENTS = {
    "dit_base": dict(dtype="float32", files="Wan2.1-I2V-14B-480P/diffusion_pytorch_model-0000{1..7}-of-00007.safetensors",
                     shards=7, dtype_source="REFERENCE.md: fp32 in the 7 shards (65.6 GB)"),
    "multitalk_adapter": dict(dtype="float32", files="MeiGen-MultiTalk/multitalk.safetensors", shards=1,
                              dtype_source="REFERENCE.md: fp32 (9.95 GB)"),
    "umt5_xxl": dict(dtype="bfloat16", files="Wan2.1-I2V-14B-480P/models_t5_umt5-xxl-enc-bf16.pth", shards=1,
                     dtype_source="REFERENCE.md: bf16 (11.4 GB)"),
    "clip": dict(dtype="float32", files="Wan2.1-I2V-14B-480P/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth",
                 shards=1, dtype_source="REFERENCE.md: fp32 (4.77 GB)"),
    "vae": dict(dtype="float32", files="Wan2.1-I2V-14B-480P/Wan2.1_VAE.pth", shards=1,
                dtype_source="REFERENCE.md: fp32 (0.51 GB)"),
    "wav2vec2": dict(dtype="float32", files="chinese-wav2vec2-base/pytorch_model.bin (+ model.safetensors)", shards=1,
                     dtype_source="assumed fp32 (95.0 M parameters, the hub's ~380 MB files)"),
    "diffusers_transformer": dict(dtype="float32",
                                  files="Wan2.1-I2V-14B-480P-Diffusers/transformer/diffusion_pytorch_model-000NN-of-00014.safetensors",
                                  shards=14, dtype_source="assumed fp32 (diffusers' conversion of the fp32 shards)"),
    "diffusers_text_encoder": dict(dtype="float32", files="Wan2.1-I2V-14B-480P-Diffusers/text_encoder/model-0000N-of-00005.safetensors",
                                   shards=5, dtype_source="assumed fp32"),
    "diffusers_image_encoder": dict(dtype="float32", files="Wan2.1-I2V-14B-480P-Diffusers/image_encoder/model.safetensors",
                                    shards=1, dtype_source="assumed fp32"),
    "diffusers_vae": dict(dtype="float32", files="Wan2.1-I2V-14B-480P-Diffusers/vae/diffusion_pytorch_model.safetensors",
                          shards=1, dtype_source="assumed fp32"),
}

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SAFETENSORS_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


# ----------------------------------------------------------------------------------- manifests
def load_manifest(name: str, directory: Path = MANIFEST_DIR) -> dict:
    """One component's manifest: ``tensors`` is key -> shape (list), ``dtype`` the stored dtype."""
    return json.loads((directory / f"{name}.json").read_text())


def _manifest(name: str, tensors: dict, derived_from: str, config: dict | None = None) -> dict:
    info = COMPONENTS[name]
    params = sum(math.prod(s) for s in tensors.values())
    return {
        "component": name,
        "files": info["files"],
        "shards": info["shards"],
        "dtype": info["dtype"],
        "dtype_source": info["dtype_source"],
        "derived_from": derived_from,
        "config": config or {},
        "num_tensors": len(tensors),
        "num_params": params,
        "bytes": params * DTYPE_BYTES[info["dtype"]],
        "tensors": {k: list(v) for k, v in tensors.items()},
    }


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for the official code's runtime-only imports (xfuser, xformers, flash
    attention, torchvision, ...) that building the models on meta never calls."""

    def __init__(self, prefixes):
        self.prefixes = tuple(prefixes)

    def find_spec(self, fullname, path, target=None):
        if fullname.split(".")[0] in self.prefixes:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = lambda attr: _Anything()
        return module

    def exec_module(self, module):
        pass


class _Anything:
    def __call__(self, *a, **k):
        return _Anything()

    def __getattr__(self, attr):
        return _Anything()


def _import_official(repo: Path, module: str):
    """``wan.modules.<module>`` from ``repo`` without running ``wan/__init__.py`` (which
    imports the whole generation stack)."""
    repo = Path(repo).resolve()
    for pkg, sub in (("wan", "wan"), ("wan.modules", "wan/modules"), ("wan.utils", "wan/utils")):
        if pkg not in sys.modules or Path(sys.modules[pkg].__path__[0]).resolve() != repo / sub:
            mod = types.ModuleType(pkg)
            mod.__path__ = [str(repo / sub)]
            sys.modules[pkg] = mod
    for name in [m for m in sys.modules if m.startswith("wan.modules.") or m.startswith("wan.utils.")]:
        del sys.modules[name]
    import torch

    # Wan's t5.py evaluates torch.cuda.current_device() as a default argument at import.
    current_device, torch.cuda.current_device = torch.cuda.current_device, lambda: 0
    try:
        return importlib.import_module(f"wan.modules.{module}")
    finally:
        torch.cuda.current_device = current_device


def _shapes(module) -> dict:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def official_manifests(multitalk_repo: Path, wan_repo: Path) -> dict[str, dict]:
    # The real libraries first, so their optional-dependency probes never see the stubs.
    import diffusers.models  # noqa: F401
    from diffusers import AutoencoderKLWan, WanTransformer3DModel  # noqa: F401
    import transformers  # noqa: F401

    stubs = _StubFinder(["xfuser", "xformers", "flash_attn", "flash_attn_interface", "sageattention",
                         "torchvision", "easydict", "imageio", "soundfile", "decord", "dashscope",
                         "optimum", "loguru", "cv2", "skimage", "librosa", "pyloudnorm"])
    sys.meta_path.insert(0, stubs)
    try:
        return _official_manifests(multitalk_repo, wan_repo)
    finally:
        sys.meta_path.remove(stubs)
        for name in [m for m in sys.modules if m.split(".")[0] in stubs.prefixes]:
            if isinstance(sys.modules[name].__spec__.loader, _StubFinder):
                del sys.modules[name]


def _official_manifests(multitalk_repo: Path, wan_repo: Path) -> dict[str, dict]:
    import torch

    from multitalk.checkpoints.dit import is_adapter_key

    out = {}
    mt = _import_official(multitalk_repo, "multitalk_model")
    cfg = {k: v for k, v in WAN_I2V_14B_CONFIG.items() if not k.startswith("_")}
    with torch.device("meta"):
        dit = mt.WanModel(weight_init=False, **cfg)
    shapes = _shapes(dit)
    base = {k: v for k, v in shapes.items() if not is_adapter_key(k)}
    adapter = {k: v for k, v in shapes.items() if is_adapter_key(k)}
    src = f"MeiGen-AI/MultiTalk wan/modules/multitalk_model.py WanModel(**{cfg}) on meta"
    out["dit_base"] = _manifest("dit_base", base, src, WAN_I2V_14B_CONFIG)
    out["multitalk_adapter"] = _manifest("multitalk_adapter", adapter, src)

    t5 = _import_official(wan_repo, "t5")
    model = t5.umt5_xxl(encoder_only=True, return_tokenizer=False, dtype=torch.bfloat16, device="meta")
    out["umt5_xxl"] = _manifest("umt5_xxl", _shapes(model), "Wan-Video/Wan2.1 wan/modules/t5.py umt5_xxl(encoder_only=True) on meta")

    clip = _import_official(wan_repo, "clip")
    model = clip.clip_xlm_roberta_vit_h_14(pretrained=False, return_transforms=False, return_tokenizer=False,
                                           dtype=torch.float32, device="meta")
    out["clip"] = _manifest("clip", _shapes(model),
                            "Wan-Video/Wan2.1 wan/modules/clip.py clip_xlm_roberta_vit_h_14() (XLMRobertaCLIP) on meta")

    vae = _import_official(wan_repo, "vae")
    with torch.device("meta"):
        model = vae.WanVAE_(dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                            temperal_downsample=[False, True, True], dropout=0.0)
    out["vae"] = _manifest("vae", _shapes(model), "Wan-Video/Wan2.1 wan/modules/vae.py WanVAE_ at the _video_vae config on meta")
    return out


def library_manifests(base_keys: dict) -> dict[str, dict]:
    """The components of the diffusers layout and wav2vec2, from transformers/diffusers at the real configs."""
    import torch
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection, UMT5Config, UMT5EncoderModel
    from transformers import Wav2Vec2Config, Wav2Vec2ForPreTraining

    from multitalk.modules.vae import REAL_CONFIG

    out = {}
    with torch.device("meta"):
        w2v = Wav2Vec2ForPreTraining(Wav2Vec2Config(**WAV2VEC2_BASE_CONFIG))
    shapes = {k.replace("parametrizations.weight.original0", "weight_g").replace("parametrizations.weight.original1", "weight_v"): v
              for k, v in _shapes(w2v).items()}
    out["wav2vec2"] = _manifest("wav2vec2", shapes, "transformers Wav2Vec2ForPreTraining(wav2vec2-base config) on meta, "
                                "weight norm as weight_g/weight_v", WAV2VEC2_BASE_CONFIG)

    converted = convert_wan_transformer_to_diffusers({k: k for k in base_keys})
    shapes = {new: tuple(base_keys[old]) for new, old in converted.items()}
    with torch.device("meta"):
        ref = WanTransformer3DModel.from_config(DIFFUSERS_I2V_14B_TRANSFORMER_CONFIG)
    ref_shapes = _shapes(ref)
    if ref_shapes != shapes:
        diff = set(ref_shapes).symmetric_difference(shapes) or {k for k in shapes if shapes[k] != ref_shapes[k]}
        raise AssertionError(f"diffusers conversion of the base keys != WanTransformer3DModel's own keys: {sorted(diff)[:5]}")
    dim = DIFFUSERS_I2V_14B_TRANSFORMER_CONFIG["num_attention_heads"] * DIFFUSERS_I2V_14B_TRANSFORMER_CONFIG["attention_head_dim"]
    for i in range(DIFFUSERS_I2V_14B_TRANSFORMER_CONFIG["num_layers"]):
        shapes[f"blocks.{i}.attn2.norm_added_q.weight"] = (dim,)
    out["diffusers_transformer"] = _manifest(
        "diffusers_transformer", dict(sorted(shapes.items())),
        "diffusers convert_wan_transformer_to_diffusers(dit_base keys) == WanTransformer3DModel(I2V-14B config) on meta, "
        "+ 40 blocks.N.attn2.norm_added_q.weight (REFERENCE.md)", DIFFUSERS_I2V_14B_TRANSFORMER_CONFIG)

    with torch.device("meta"):
        t5 = UMT5EncoderModel(UMT5Config(**UMT5_XXL_HF_CONFIG))
    shapes = {k: v for k, v in _shapes(t5).items() if k != "encoder.embed_tokens.weight"}  # tied: not saved
    out["diffusers_text_encoder"] = _manifest("diffusers_text_encoder", shapes,
                                              "transformers UMT5EncoderModel(UMT5-XXL) on meta, tied embed_tokens not saved",
                                              UMT5_XXL_HF_CONFIG)
    with torch.device("meta"):
        clip = CLIPVisionModelWithProjection(CLIPVisionConfig(**CLIP_VIT_H_HF_CONFIG))
    out["diffusers_image_encoder"] = _manifest("diffusers_image_encoder", _shapes(clip),
                                               "transformers CLIPVisionModelWithProjection(ViT-H/14) on meta", CLIP_VIT_H_HF_CONFIG)
    with torch.device("meta"):
        vae = AutoencoderKLWan(**REAL_CONFIG)
    out["diffusers_vae"] = _manifest("diffusers_vae", _shapes(vae), "diffusers AutoencoderKLWan(base_dim 96) on meta",
                                     {k: v for k, v in dict(vae.config).items() if not k.startswith("_")})
    return out


def write_manifests(multitalk_repo: Path, wan_repo: Path, out_dir: Path = MANIFEST_DIR) -> dict[str, dict]:
    manifests = official_manifests(multitalk_repo, wan_repo)
    manifests.update(library_manifests(manifests["dit_base"]["tensors"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, m in manifests.items():
        text = json.dumps(m, indent=None, separators=(",", ":"))
        # One tensor per line keeps diffs readable.
        text = text.replace('],"', '],\n"')
        (out_dir / f"{name}.json").write_text(text + "\n")
    return manifests


# ----------------------------------------------------------------------- placeholder files
def write_safetensors_placeholder(path: Path, tensors: dict, dtype: str) -> int:
    """A valid safetensors file with these keys/shapes/dtype whose data region is a hole
    (sparse: the file has its real size, zero bytes are stored). Returns the file size."""
    header, offset = {}, 0
    for key, shape in tensors.items():
        n = math.prod(shape) * DTYPE_BYTES[dtype]
        header[key] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        f.truncate(8 + len(blob) + offset)
    return 8 + len(blob) + offset


def write_pth_placeholder(path: Path, tensors: dict, dtype: str) -> None:
    """A ``torch.save`` state dict with these keys/shapes/dtype; every tensor is a stride-0
    view of a one-element storage, so the file is a few hundred KB."""
    import torch

    dt = getattr(torch, dtype)
    state = {k: torch.zeros(1, dtype=dt).expand(*shape) if shape else torch.zeros((), dtype=dt)
             for k, shape in tensors.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, str(path))


def split_shards(tensors: dict, shards: int, dtype: str) -> list[dict]:
    """Keys in manifest order, cut into ``shards`` pieces of about equal bytes (the real shard
    boundaries are not published; only the count and the total are)."""
    sizes = {k: math.prod(s) * DTYPE_BYTES[dtype] for k, s in tensors.items()}
    target = sum(sizes.values()) / shards
    parts, current, acc = [], {}, 0
    for k, s in tensors.items():
        current[k] = s
        acc += sizes[k]
        if acc >= target * (len(parts) + 1) and len(parts) < shards - 1:
            parts.append(current)
            current = {}
    parts.append(current)
    return parts


def write_sharded(folder: Path, prefix: str, tensors: dict, shards: int, dtype: str) -> dict:
    """``prefix-0000N-of-0000M.safetensors`` + ``prefix.safetensors.index.json``; returns the weight map."""
    weight_map, total = {}, 0
    for i, part in enumerate(split_shards(tensors, shards, dtype)):
        name = f"{prefix}-{i + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors_placeholder(folder / name, part, dtype)
        weight_map.update({k: name for k in part})
        total += sum(math.prod(s) for s in part.values()) * DTYPE_BYTES[dtype]
    (folder / f"{prefix}.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return weight_map


def write_tree(root: Path, layout: str = "official", multitalk: str = "linked", wav2vec: str = "bin",
               manifests: dict | None = None) -> Path:
    """A models root with the real file names and the real keys/shapes/dtypes.

    Args:
        layout: ``official`` (``Wan2.1-I2V-14B-480P/``) or ``diffusers``
            (``Wan2.1-I2V-14B-480P-Diffusers/``).
        multitalk: ``linked``: ``MeiGen-MultiTalk/`` plus, as the official README instructs,
            its index json and ``multitalk.safetensors`` linked into the Wan folder (the
            original index moved aside); ``separate``: only the ``MeiGen-MultiTalk/`` folder.
        wav2vec: ``bin`` (only ``pytorch_model.bin``, the hub's main branch), ``safetensors``
            or ``both``.
    """
    from multitalk.checkpoints.tiny import MULTITALK_DIR, WAN_DIFFUSERS_DIR, WAN_DIR, WAV2VEC_DIR

    m = manifests or {name: load_manifest(name) for name in COMPONENTS}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    mt = root / MULTITALK_DIR
    adapter = m["multitalk_adapter"]
    write_safetensors_placeholder(mt / "multitalk.safetensors", adapter["tensors"], adapter["dtype"])
    if layout == "official":
        wan = root / WAN_DIR
        base = m["dit_base"]
        weight_map = write_sharded(wan, "diffusion_pytorch_model", base["tensors"], base["shards"], base["dtype"])
        (wan / "config.json").write_text(json.dumps(WAN_I2V_14B_CONFIG, indent=2))
        for name, file in (("umt5_xxl", "models_t5_umt5-xxl-enc-bf16.pth"),
                           ("clip", "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"),
                           ("vae", "Wan2.1_VAE.pth")):
            write_pth_placeholder(wan / file, m[name]["tensors"], m[name]["dtype"])
        _write_umt5_tokenizer(wan / "google" / "umt5-xxl")
        full_map = dict(weight_map, **{k: "multitalk.safetensors" for k in adapter["tensors"]})
        (mt / "diffusion_pytorch_model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": 0}, "weight_map": full_map}, indent=1))
        if multitalk == "linked":  # the official README's set-up
            index = wan / "diffusion_pytorch_model.safetensors.index.json"
            index.rename(wan / "diffusion_pytorch_model.safetensors.index.json_old")
            os.symlink(os.path.relpath(mt / "diffusion_pytorch_model.safetensors.index.json", wan), index)
            os.symlink(os.path.relpath(mt / "multitalk.safetensors", wan), wan / "multitalk.safetensors")
    elif layout == "diffusers":
        d = root / WAN_DIFFUSERS_DIR
        t = m["diffusers_transformer"]
        write_sharded(d / "transformer", "diffusion_pytorch_model", t["tensors"], t["shards"], t["dtype"])
        (d / "transformer" / "config.json").write_text(json.dumps(DIFFUSERS_I2V_14B_TRANSFORMER_CONFIG, indent=2))
        te = m["diffusers_text_encoder"]
        write_sharded(d / "text_encoder", "model", te["tensors"], te["shards"], te["dtype"])
        (d / "text_encoder" / "config.json").write_text(json.dumps(UMT5_XXL_HF_CONFIG, indent=2))
        ie = m["diffusers_image_encoder"]
        write_safetensors_placeholder(d / "image_encoder" / "model.safetensors", ie["tensors"], ie["dtype"])
        (d / "image_encoder" / "config.json").write_text(json.dumps(CLIP_VIT_H_HF_CONFIG, indent=2))
        v = m["diffusers_vae"]
        write_safetensors_placeholder(d / "vae" / "diffusion_pytorch_model.safetensors", v["tensors"], v["dtype"])
        (d / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKLWan", **v["config"]}, indent=2))
        _write_umt5_tokenizer(d / "tokenizer")
        (d / "image_processor").mkdir(parents=True, exist_ok=True)
        (d / "scheduler").mkdir(parents=True, exist_ok=True)
        (d / "model_index.json").write_text(json.dumps({
            "_class_name": "WanImageToVideoPipeline", "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"], "text_encoder": ["transformers", "UMT5EncoderModel"],
            "tokenizer": ["transformers", "T5TokenizerFast"], "image_encoder": ["transformers", "CLIPVisionModel"],
            "image_processor": ["transformers", "CLIPImageProcessor"],
            "scheduler": ["diffusers", "UniPCMultistepScheduler"]}, indent=2))
    else:
        raise ValueError(f"layout must be official or diffusers, got {layout!r}")
    write_wav2vec2_folder(root / WAV2VEC_DIR, m["wav2vec2"], wav2vec)
    return root


def write_wav2vec2_folder(folder: Path, manifest: dict, files: str = "bin") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(WAV2VEC2_BASE_CONFIG, indent=2))
    (folder / "preprocessor_config.json").write_text(json.dumps(WAV2VEC2_PREPROCESSOR_CONFIG, indent=2))
    if files in ("bin", "both"):
        write_pth_placeholder(folder / "pytorch_model.bin", manifest["tensors"], manifest["dtype"])
    if files in ("safetensors", "both"):
        write_safetensors_placeholder(folder / "model.safetensors", manifest["tensors"], manifest["dtype"])


def _write_umt5_tokenizer(folder: Path) -> None:
    """A loadable T5-style tokenizer folder (the project's tiny one: the real 4 MB
    sentencepiece model is not needed to check the weights)."""
    from multitalk.modules.text_encoder import _save_tiny_tokenizer

    _save_tiny_tokenizer(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("manifests", help="regenerate tests/data/real_layouts from the official definitions")
    s.add_argument("--multitalk-repo", required=True, type=Path, help="a checkout of MeiGen-AI/MultiTalk (outside this repo)")
    s.add_argument("--wan-repo", type=Path, help="a checkout of Wan-Video/Wan2.1 (default: the MultiTalk checkout's wan/)")
    s.add_argument("--out", type=Path, default=MANIFEST_DIR)
    s = sub.add_parser("tree", help="write a placeholder models root with the real layout")
    s.add_argument("root", type=Path)
    s.add_argument("--layout", choices=["official", "diffusers"], default="official")
    s.add_argument("--multitalk", choices=["linked", "separate"], default="linked")
    s.add_argument("--wav2vec", choices=["bin", "safetensors", "both"], default="both")
    args = ap.parse_args()
    if args.cmd == "manifests":
        ms = write_manifests(args.multitalk_repo, args.wan_repo or args.multitalk_repo, args.out)
        for name, m in ms.items():
            print(f"{name:26s} {m['num_tensors']:5d} tensors {m['num_params'] / 1e9:8.3f} B params "
                  f"{m['bytes'] / 1e9:7.2f} GB {m['dtype']}")
    else:
        print(write_tree(args.root, args.layout, args.multitalk, args.wav2vec))


if __name__ == "__main__":
    main()
