"""Strict, memory-frugal state-dict loading shared by every model.

Tensors are read one at a time (safetensors ``safe_open`` memory-maps the file; ``.pth``
files are opened with ``torch.load(mmap=True)``), renamed, cast straight to the target
dtype/device and assigned into a model built on the ``meta`` device. No second full copy
of the weights ever exists in RAM, which is what lets a 16B-parameter DiT load on a
machine with less RAM than two copies of it.

Strict means: every key in the files is used (or explicitly skipped by the caller),
every parameter of the model is filled, and a shape mismatch names the key, the file
and both shapes.

Two entry points with the same rules: :func:`load_strict` streams tensors from files
through a key renaming (the DiT: 38 GB in shards), :func:`load_state_dict_strict` takes
tensors already converted to the model's layout (encoders and VAE, whose conversions
split or regroup tensors) and reports every problem at once. :func:`load_pretrained_strict`
loads a transformers-format folder (wav2vec2, the diffusers layout's UMT5 and CLIP) through
the same strict check instead of ``from_pretrained``, whose loading report only logs a
warning and fills missing weights with random values.

``device="meta"`` runs every loader without reading tensor data: safetensors headers and
``.pth`` pickles give the keys, shapes and dtypes, and the model comes out on the meta
device. That is how ``multitalk check`` gives the loaders' verdict on a 70 GB set in
seconds, and how the tests prove the loaders on the real full-size layouts.
"""
from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional

import torch


class CheckpointError(ValueError):
    """A checkpoint that does not match the model it is loaded into (missing or unexpected
    key, wrong shape); the message names the keys and both shapes."""


#: The only file keys a strict load skips: tensors the real checkpoints carry that the models
#: here do not use. Any other key the model lacks is an error. Full matches, per component.
ALLOWED_EXTRA_KEYS: dict[str, tuple[str, ...]] = {
    # Wan2.1-I2V-14B-480P-Diffusers/transformer/: 40 zero tensors (5120,), left by the
    # conversion; diffusers skips them itself (WanTransformer3DModel._keys_to_ignore_on_load_unexpected).
    "dit_diffusers": (r"blocks\.\d+\.attn2\.norm_added_q\.weight",),
    # models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth is the whole open-clip model:
    # Wan's I2V uses the visual tower only, without its projection head (hidden states, not
    # the pooled embedding), and never the XLM-RoBERTa text tower or the temperature.
    "clip_original": (r"textual\..+", r"log_scale", r"visual\.head"),
    # chinese-wav2vec2-base is saved from Wav2Vec2ForPreTraining: the contrastive-pretraining
    # heads, which the official Wav2Vec2Model load drops as well.
    "wav2vec2": (r"quantizer\..+", r"project_q\..+", r"project_hid\..+"),
}


def is_allowed_extra(component: str, key: str) -> bool:
    """Whether ``key`` is on ``component``'s allow-list of known unused tensors."""
    import re

    return any(re.fullmatch(p, key) for p in ALLOWED_EXTRA_KEYS.get(component, ()))


#: safetensors dtype names -> torch dtypes (those a checkpoint here can hold).
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


def is_meta(device: "str | torch.device | None") -> bool:
    return device is not None and torch.device(device).type == "meta"


def read_safetensors_header(path: str | os.PathLike) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Key -> (dtype, shape) from a safetensors header, checked against the file.

    The header must parse, every tensor's byte range must match its dtype and shape, the
    ranges must tile the data region, and the file must be exactly as long as the header
    says (a truncated download fails here, naming the file and both sizes).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path}: safetensors header length {n} does not fit in a {size}-byte file")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from e
    out, spans = {}, []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dtype = SAFETENSORS_DTYPES.get(info.get("dtype"))
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')!r}")
        shape = tuple(int(d) for d in info["shape"])
        start, end = (int(x) for x in info["data_offsets"])
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * dtype.itemsize:
            raise CheckpointError(f"{path}: tensor {key!r} of shape {shape} ({info['dtype']}) has a "
                                  f"{end - start}-byte range, expected {numel * dtype.itemsize}")
        out[key] = (dtype, shape)
        spans.append((start, end))
    spans.sort()
    data_end = 0
    for start, end in spans:
        if start != data_end:
            raise CheckpointError(f"{path}: tensor data ranges overlap or leave a gap at byte {data_end}")
        data_end = end
    if 8 + n + data_end != size:
        raise CheckpointError(f"{path}: truncated or padded file: the header describes {8 + n + data_end} bytes, "
                              f"the file has {size}")
    return out


@contextmanager
def _safetensors_meta_items(path: Path):
    header = read_safetensors_header(path)
    yield ((k, (lambda d=d, s=s: torch.empty(s, dtype=d, device="meta")), s) for k, (d, s) in header.items())


@contextmanager
def _torch_meta_items(path: Path):
    sd = _unwrap_state_dict(torch.load(str(path), map_location="meta", weights_only=True))
    yield ((k, (lambda t=v: t), tuple(v.shape)) for k, v in sd.items())


def _unwrap_state_dict(sd):
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    return sd


def load_file_state_dict(path: str | os.PathLike, device: "str | torch.device | None" = None) -> dict[str, torch.Tensor]:
    """A whole checkpoint file as a state dict without copying it: memory-mapped
    (``.safetensors``, or ``torch.save`` zip files), or, for ``device="meta"``, meta tensors
    of the stored dtypes and shapes (no tensor data is read)."""
    path = Path(path)
    if is_meta(device):
        with open_tensors(path, device="meta") as items:
            return {k: load() for k, load, _ in items}
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        read_safetensors_header(path)  # the size checks, with a message naming the file
        return load_file(str(path), device="cpu")
    return _unwrap_state_dict(torch.load(str(path), map_location="cpu", mmap=True, weights_only=True))


@contextmanager
def _safetensors_items(path: Path) -> Iterator[Iterable[tuple[str, Callable[[], torch.Tensor], tuple[int, ...]]]]:
    from safetensors import safe_open

    read_safetensors_header(path)  # size checks first: a truncated file is named as such
    with safe_open(str(path), framework="pt", device="cpu") as f:
        def items():
            for key in f.keys():
                sl = f.get_slice(key)
                yield key, (lambda k=key: f.get_tensor(k)), tuple(sl.get_shape())

        yield items()


@contextmanager
def _torch_items(path: Path):
    sd = _unwrap_state_dict(torch.load(str(path), map_location="cpu", mmap=True, weights_only=True))
    try:
        yield ((k, (lambda t=v: t), tuple(v.shape)) for k, v in sd.items())
    finally:
        del sd


def open_tensors(path: str | os.PathLike, device: "str | torch.device | None" = None):
    """Context manager yielding ``(key, load_fn, shape)`` for every tensor in a file;
    with ``device="meta"`` ``load_fn`` returns meta tensors and no data is read."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return _safetensors_meta_items(path) if is_meta(device) else _safetensors_items(path)
    return _torch_meta_items(path) if is_meta(device) else _torch_items(path)


def read_keys(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key → shape of a checkpoint file, without loading tensor data."""
    with open_tensors(path, device="meta") as items:
        return {k: s for k, _, s in items}


def file_dtype(path: str | os.PathLike) -> Optional[str]:
    """The dtype of the first tensor of a checkpoint file (for reports), read lazily."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            with open(path, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
            for k, v in header.items():
                if k != "__metadata__":
                    return v["dtype"]
            return None
        with open_tensors(path) as items:
            for _, load, _ in items:
                return str(load().dtype).replace("torch.", "")
    except Exception:  # a report must not fail because one file is odd
        return None
    return None


def load_strict(
    model: torch.nn.Module,
    files: Iterable[str | os.PathLike],
    rename: Callable[[str], Optional[str]] = lambda k: k,
    device: str | torch.device = "cpu",
    dtype: Optional[torch.dtype] = None,
    transform: Optional[Callable[[str, torch.Tensor], torch.Tensor]] = None,
    keep_dtype: Callable[[str], bool] = lambda k: False,
    source_name: Optional[Callable[[str], str]] = None,
) -> list[str]:
    """Fill ``model`` (typically on ``meta``) from checkpoint files, strictly.

    Args:
        rename: file key → model key, or ``None`` to skip the key on purpose (e.g. the
            CLIP text tower); skipped keys are returned.
        transform: optional per-tensor conversion after renaming (e.g. splitting a fused qkv
            is done by the caller through ``rename`` returning a list — not supported here;
            use ``transform`` for reshapes).
        keep_dtype: model keys to keep in their file dtype (e.g. fp32 norms).
        source_name: model key → the name the files use (the inverse of ``rename``), so a
            missing parameter is reported under the key the user would look for.
    Returns:
        The file keys that were skipped on purpose.
    """
    expected = dict(model.state_dict(keep_vars=True))
    filled: set[str] = set()
    skipped: list[str] = []
    for path in files:
        with open_tensors(path, device=device) as items:
            for file_key, load, shape in items:
                key = rename(file_key)
                if key is None:
                    skipped.append(file_key)
                    continue
                if key not in expected:
                    raise CheckpointError(f"unexpected key {file_key!r} in {path} (as {key!r}): the model has no such parameter")
                if key in filled:
                    raise CheckpointError(f"key {key!r} appears twice (again in {path})")
                target = expected[key]
                tensor = load()
                if transform is not None:
                    tensor = transform(key, tensor)
                if tuple(tensor.shape) != tuple(target.shape):
                    named = repr(file_key) if file_key == key else f"{file_key!r} (model parameter {key!r})"
                    raise CheckpointError(
                        f"shape mismatch for {named} in {path}: file {tuple(tensor.shape)} vs model {tuple(target.shape)}"
                    )
                want = target.dtype if (dtype is None or keep_dtype(key) or not target.is_floating_point()) else dtype
                _assign(model, key, tensor.to(device=device, dtype=want))
                filled.add(key)
    missing = sorted(set(expected) - filled)
    if missing:
        def named(key: str) -> str:
            file_key = source_name(key) if source_name is not None else key
            return repr(file_key) if file_key == key else f"{file_key!r} (model parameter {key!r})"

        shown = ", ".join(named(k) for k in missing[:8]) + (f" ... ({len(missing)} in all)" if len(missing) > 8 else "")
        raise CheckpointError(f"parameters not found in the checkpoint files: {shown}")
    return skipped


def _assign(model: torch.nn.Module, key: str, tensor: torch.Tensor) -> None:
    module_path, _, name = key.rpartition(".")
    module = model.get_submodule(module_path) if module_path else model
    old = getattr(module, name)
    if isinstance(old, torch.nn.Parameter):
        setattr(module, name, torch.nn.Parameter(tensor, requires_grad=False))
    else:
        module._buffers[name] = tensor


@dataclass
class ConvertedTensor:
    """One checkpoint tensor renamed (and possibly reshaped / split) to a model parameter name."""

    source_key: str  # key in the checkpoint file
    source_shape: tuple[int, ...]  # shape in the checkpoint file
    tensor: torch.Tensor  # in the model's layout


def load_state_dict_strict(
    module: torch.nn.Module,
    converted: Mapping[str, ConvertedTensor],
    dtype: torch.dtype,
    *,
    device: Optional[str | torch.device] = None,
    aliases: Iterable[str] = (),
    unexpected_source_keys: Iterable[str] = (),
    missing_source_keys: Mapping[str, str] | None = None,
) -> None:
    """Check ``converted`` against ``module``'s parameters exactly, then assign them in place.

    ``module`` is expected to live on the meta device: parameters are *assigned* (not copied),
    so tensors that already have ``dtype`` stay memory-mapped and no second full copy of the
    checkpoint is made.

    Args:
        module: the target module (its ``state_dict()`` gives the expected names and shapes).
        converted: model parameter name -> converted checkpoint tensor.
        dtype: dtype the parameters are cast to (floating tensors only).
        device: where the parameters go (``None``: stay where the tensors are).
        aliases: model names filled by weight tying instead of from the checkpoint.
        unexpected_source_keys: checkpoint keys that no conversion rule recognised.
        missing_source_keys: model name -> checkpoint key expected for it (for error messages).

    Raises:
        CheckpointError: listing every missing key, unexpected key and shape mismatch,
            each naming the checkpoint key and, for shapes, both shapes.
    (One pass over the state dict that checks, converts and assigns each tensor and collects every missing/unexpected key for one error message.)
    """
    expected = {name: tuple(t.shape) for name, t in module.state_dict().items()}
    # Non-persistent buffers are not in state_dict; they are rebuilt by the caller.
    for alias in aliases:
        expected.pop(alias, None)
    missing_source_keys = missing_source_keys or {}

    problems: list[str] = []
    for key in sorted(unexpected_source_keys):
        problems.append(f"unexpected key in checkpoint: {key!r}")
    for name in sorted(set(expected) - set(converted)):
        source = missing_source_keys.get(name)
        where = f"{source!r} (model parameter {name!r})" if source else f"for model parameter {name!r}"
        problems.append(f"missing key in checkpoint: {where}, expected shape {expected[name]}")
    for name in sorted(set(converted) - set(expected)):
        item = converted[name]
        problems.append(
            f"unexpected key in checkpoint: {item.source_key!r} (would be model parameter {name!r})"
        )
    for name in sorted(set(converted) & set(expected)):
        item = converted[name]
        got = tuple(item.tensor.shape)
        if got != expected[name]:
            layout = "" if got == item.source_shape else f" (converted to {got})"
            problems.append(
                f"shape mismatch for {item.source_key!r} -> {name!r}: checkpoint has "
                f"{item.source_shape}{layout}, model expects {expected[name]}"
            )
    if problems:
        raise CheckpointError(
            f"checkpoint does not match {type(module).__name__}:\n  " + "\n  ".join(problems)
        )

    state = {}
    for name, item in converted.items():
        tensor = item.tensor
        # Device first: a meta target never touches the data, and a GPU target casts there.
        if device is not None:
            tensor = tensor.to(device)
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        state[name] = tensor
    module.load_state_dict(state, strict=False, assign=True)


def require_tensor(state_dict: Mapping[str, torch.Tensor], key: str, ndim: int) -> torch.Tensor:
    """``state_dict[key]``, which must exist and have ``ndim`` dims (configs are read off shapes)."""
    if key not in state_dict:
        raise CheckpointError(f"missing key in checkpoint: {key!r} (needed to infer the config)")
    tensor = state_dict[key]
    if tensor.ndim != ndim:
        raise CheckpointError(
            f"shape mismatch for {key!r}: checkpoint has {tuple(tensor.shape)}, expected a {ndim}-D tensor"
        )
    return tensor


def transformers_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a transformers-format folder, as ``from_pretrained`` picks them:
    ``model.safetensors`` (or its sharded index) first, else ``pytorch_model.bin`` (or its
    index). ``chinese-wav2vec2-base`` on the hub's main branch has only the ``.bin``."""
    folder = Path(folder)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if (folder / single).exists():
            return [folder / single]
        if (folder / index).exists():
            names = sorted(set(json.loads((folder / index).read_text())["weight_map"].values()))
            missing = [n for n in names if not (folder / n).exists()]
            if missing:
                raise CheckpointError(f"{folder / index} names shards that are not there: {', '.join(missing)}")
            return [folder / n for n in names]
    raise CheckpointError(f"no weights in {folder} (model.safetensors, pytorch_model.bin or a sharded index)")


def load_pretrained_strict(
    model_cls,
    folder: str | os.PathLike,
    dtype: torch.dtype,
    device: "str | torch.device | None" = None,
    *,
    config=None,
    rename: Callable[[str], str] = lambda k: k,
    source_name: Callable[[str], str] = lambda k: k,
    allowed_extra: Optional[str] = None,
    aliases: Iterable[str] = (),
    files: Optional[Iterable[str | os.PathLike]] = None,
) -> torch.nn.Module:
    """A transformers model from a folder, strictly (instead of ``from_pretrained``, whose
    loading report only warns and whose missing weights are random).

    The model is built from ``config`` (default: the folder's ``config.json``) on the meta
    device and every file tensor is renamed with ``rename`` and assigned, then checked with
    :func:`load_state_dict_strict`: a missing parameter (named as the file would name it,
    ``source_name``), an unexpected key not on ``ALLOWED_EXTRA_KEYS[allowed_extra]``, or a
    wrong shape is a :class:`CheckpointError` naming the key. ``aliases``: model names
    filled by weight tying (accepted in the file, never required). Non-persistent buffers
    the constructor made on meta are the caller's to rebuild.
    """
    folder = Path(folder)
    if config is None:
        config = model_cls.config_class.from_pretrained(str(folder))
    with torch.device("meta"):
        model = model_cls(config)
    aliases = tuple(aliases)
    expected = set(model.state_dict())
    converted: dict[str, ConvertedTensor] = {}
    unexpected: list[str] = []
    for path in (list(files) if files is not None else transformers_weight_files(folder)):
        with open_tensors(path, device=device) as items:
            for key, load, shape in items:
                if allowed_extra is not None and is_allowed_extra(allowed_extra, key):
                    continue
                name = rename(key)
                if name in aliases:
                    continue
                if name not in expected:
                    unexpected.append(key)
                    continue
                if name in converted:
                    raise CheckpointError(f"key {key!r} appears twice (as {name!r}, again in {path})")
                converted[name] = ConvertedTensor(key, shape, load())
    load_state_dict_strict(
        model, converted, dtype, device=device, aliases=aliases, unexpected_source_keys=unexpected,
        missing_source_keys={n: source_name(n) for n in expected},
    )
    return model


def meta_leftovers(module: torch.nn.Module) -> list[str]:
    """Parameters and buffers still on the meta device (after a load to a real device)."""
    return [n for n, t in list(module.named_parameters()) + list(module.named_buffers()) if t.is_meta]
