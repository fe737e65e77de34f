"""What each stage takes on the GPU and in host RAM, at load and at the peak of a clip.

    plan = memory_plan(find_checkpoints("/models"), PlanOptions(gpu_memory=parse_bytes("80GB")))
    print(format_plan(plan))          # also: multitalk check /models --plan --gpu-memory 80GB

Weights are exact: parameter counts from the checkpoint headers (no tensor data is read)
times the bytes of each stage's dtype (:mod:`multitalk.precision`; int8/fp8 DiT blocks
at one byte per linear weight). Activations are an ESTIMATE: every stage's own code runs
once at full size under ``FakeTensorMode`` (shapes only, no memory, seconds on a CPU) and
the peak of the bytes held by live tensors is recorded. That counts every intermediate our
code creates, with the CPU's choice of attention kernel (flash-style, memory linear in the
tokens, like the GPU's flash/SDPA kernels); it leaves out kernel workspaces, cuBLAS/cuDNN
buffers and allocator fragmentation, so a 5 % margin is kept, plus a CUDA context per
process. The DiT is traced through its first two blocks (each block frees its intermediates;
only the token stream crosses blocks).

The clip: 81 frames, two speakers, the largest-area bucket of each size (``multitalk-480``
1088x384, ``multitalk-720`` 1920x512), a 512-token prompt.
"""
from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from ..modules.loading import is_allowed_extra, transformers_weight_files
from .discovery import CheckpointSet

GiB = 1 << 30
CUDA_CONTEXT_BYTES = int(0.6 * GiB)  # CUDA context + cuBLAS workspace per process (typical CUDA 12)
FIT_MARGIN = 0.95  # of the card: allocator fragmentation and kernel workspaces
FRAMES = 81
SPEAKERS = 2
TEXT_TOKENS = 512
RESOLUTIONS = {"480p": (1088, 384), "720p": (1920, 512)}  # largest-area bucket of multitalk-480 / -720
STAGES = ("audio", "image", "text", "diffusion", "decode")
CARDS = {"24GB": 24 * GiB, "40GB": 40 * GiB, "80GB": 80 * GiB, "141GB": 141 * GiB}


def parse_bytes(text: str) -> int:
    """``"80GB"``, ``"80GiB"``, ``"81920MB"``, ``"24"`` -> bytes. Card sizes are binary:
    an "80GB" card has 80 GiB, so GB and GiB both mean 2**30 here (MB = 2**20)."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = (m.group(2) if m else "").lower()
    scale = {"": GiB, "g": GiB, "gb": GiB, "gib": GiB, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
             "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}.get(unit)
    if m is None or scale is None:
        raise ValueError(f"not a memory size: {text!r} (e.g. 24GB, 80GB, 141GB)")
    return int(float(m.group(1)) * scale)


# ------------------------------------------------------------------------ weights from headers
@dataclass
class TensorStats:
    """What the loaders will hold of one component, from its files' headers."""

    params: int = 0
    largest_file_bytes: int = 0  # the biggest single tensor as stored (host RAM while it streams)
    blocks_params: int = 0  # DiT: parameters inside blocks.N (what low-VRAM streaming moves)
    block_linear_params: int = 0  # DiT: 2-D weights inside blocks.N (what int8/fp8 quantise)
    block_ids: set = field(default_factory=set)

    def add(self, key: str, shape: tuple, file_dtype_bytes: int) -> None:
        n = math.prod(shape)
        self.params += n
        self.largest_file_bytes = max(self.largest_file_bytes, n * file_dtype_bytes)
        block = re.match(r"blocks\.(\d+)\.", key)
        if block:
            self.block_ids.add(int(block.group(1)))
            self.blocks_params += n
            if key.endswith(".weight") and len(shape) == 2:
                self.block_linear_params += n


def _file_stats(files, skip: Callable[[str], bool] = lambda k: False, stats: Optional[TensorStats] = None) -> TensorStats:
    from ..modules.loading import open_tensors

    stats = stats or TensorStats()
    for path in files:
        with open_tensors(path, device="meta") as items:
            for key, load, shape in items:
                if not skip(key):
                    stats.add(key, shape, load().element_size())
    return stats


def component_stats(ckpt: CheckpointSet) -> dict[str, TensorStats]:
    """Per model (``dit``, ``text``, ``clip``, ``vae``, ``audio``) the parameters the loaders
    keep: the CLIP text tower, the wav2vec2 pretraining heads and the diffusers shards'
    ``norm_added_q`` zeros are skipped, as the loaders skip them."""
    from .dit import dit_files

    comps = ckpt.components
    adapter = comps["audio_adapter"].path if comps["audio_adapter"].found else None
    out = {"dit": _file_stats(dit_files(ckpt.path("dit"), ckpt.layout("dit"), adapter),
                              lambda k: is_allowed_extra("dit_diffusers", k))}
    text = ckpt.path("text_encoder")
    out["text"] = _file_stats([text] if ckpt.layout("text_encoder") == "official" else transformers_weight_files(text))
    clip = ckpt.path("image_encoder")
    out["clip"] = (_file_stats([clip], lambda k: is_allowed_extra("clip_original", k))
                   if ckpt.layout("image_encoder") == "official" else _file_stats(transformers_weight_files(clip)))
    vae = Path(ckpt.path("vae"))
    out["vae"] = _file_stats([vae] if vae.is_file() else sorted(vae.glob("diffusion_pytorch_model*.safetensors")))
    out["audio"] = _file_stats(transformers_weight_files(ckpt.path("audio_encoder")),
                               lambda k: is_allowed_extra("wav2vec2", k))
    return out


# ----------------------------------------------------------------------- activation tracing
class _LiveBytes:
    """Peak bytes of tensor storages created while active (a ``TorchDispatchMode``);
    storages that existed before (weights, inputs made outside) are not counted."""

    def __init__(self, existing=()):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self
        self.sizes: dict = {}
        self.known = {weakref.ref(t.untyped_storage()) for t in existing}
        self.current = self.peak = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                from torch.utils._pytree import tree_flatten

                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        tracker._track(t)
                return out

        self.mode = _Mode()

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        probe = weakref.ref(storage)
        if probe in self.known or probe in self.sizes:
            return
        self.sizes[weakref.ref(storage, self._gone)] = n = storage.nbytes()
        self.current += n
        self.peak = max(self.peak, self.current)

    def _gone(self, ref) -> None:
        self.current -= self.sizes.pop(ref, 0)


def _trace_peak(build: Callable[[], tuple[torch.nn.Module, Callable[[], object]]]) -> int:
    """Peak activation bytes of ``run()``; ``build()`` turns meta models into fake ones and
    returns (the module whose weights are not counted, run)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        module, run = build()
        tracker = _LiveBytes(list(module.parameters()) + list(module.buffers()))
        with tracker.mode, torch.no_grad():
            run()
    return tracker.peak


def _fake(obj, *modules):
    """Inside FakeTensorMode: the meta-device ``modules`` get fake CPU parameters (shapes
    only, no memory), and ``obj``'s own meta tensors and meta device become CPU ones, so a
    stage object loaded with ``device="meta"`` runs its real code on fake tensors."""
    memo: dict[int, torch.Tensor] = {}  # tied weights stay tied
    for module in modules:
        for sub in module.modules():
            for table in (sub._parameters, sub._buffers):
                for name, t in table.items():
                    if t is not None and t.is_meta:
                        if id(t) not in memo:
                            fake = torch.empty_like(t, device="cpu")
                            memo[id(t)] = torch.nn.Parameter(fake, requires_grad=False) if table is sub._parameters else fake
                        table[name] = memo[id(t)]
    for name, value in list(vars(obj).items()):
        if isinstance(value, torch.Tensor) and value.is_meta:
            setattr(obj, name, torch.zeros(value.shape, dtype=value.dtype))
        elif isinstance(value, torch.device) and value.type == "meta":
            setattr(obj, name, torch.device("cpu"))
    return obj


def _audio_peak(ckpt: CheckpointSet, dtype: torch.dtype, frames: int = FRAMES) -> int:
    import numpy as np

    from ..modules.audio_encoder import SAMPLE_RATE, VIDEO_FPS
    from ..stages import AudioStage

    enc = AudioStage.from_pretrained(ckpt, "meta", dtype).encoder
    speech = np.zeros(int(frames / VIDEO_FPS * SAMPLE_RATE), dtype=np.float32)  # one speaker at a time

    def build():
        _fake(enc, enc.model)
        return enc.model, lambda: enc.encode(speech)

    return _trace_peak(build)


def _image_peak(ckpt: CheckpointSet, dtypes: dict, hw: tuple[int, int], frames: int = FRAMES) -> int:
    from ..stages import ImageStage

    stage = ImageStage.from_pretrained(ckpt, "meta", dtypes["clip"], vae_dtype=dtypes["vae"])

    def build():
        _fake(stage.clip, stage.clip.model)
        _fake(stage.vae, stage.vae.model)
        _fake(stage)
        both = torch.nn.ModuleList([stage.clip.model, stage.vae.model])
        return both, lambda: stage.encode(torch.zeros(3, 1, *hw), frames)

    return _trace_peak(build)


def _text_peak(ckpt: CheckpointSet, dtype: torch.dtype) -> int:
    from ..stages import TextStage

    model = TextStage.from_pretrained(ckpt, "meta", dtype).encoder.model

    def build():
        _fake(model, model)
        model.set_input_embeddings(model.shared)
        ids = torch.ones(1, TEXT_TOKENS, dtype=torch.long)
        return model, lambda: model(input_ids=ids, attention_mask=torch.ones_like(ids))

    return _trace_peak(build)


def _dit_inputs(model, hw: tuple[int, int], dtype: torch.dtype, frames: int) -> dict:
    cfg = model.config
    lat_t, h, w = 1 + (frames - 1) // 4, hw[0] // 8, hw[1] // 8
    return dict(
        x=torch.zeros(16, lat_t, h, w), t=torch.tensor([811.0]),
        context=torch.zeros(TEXT_TOKENS, cfg.text_dim, dtype=dtype),
        clip_fea=torch.zeros(1, 257, cfg.image_dim, dtype=dtype),
        y=torch.zeros(20, lat_t, h, w, dtype=dtype),
        audio=torch.zeros(SPEAKERS, frames, 5, cfg.audio_blocks, cfg.audio_channels, dtype=dtype),
        ref_target_masks=torch.ones(3, h, w),
    )


def _dit_peak(ckpt: CheckpointSet, dtype: torch.dtype, hw: tuple[int, int], batch_guidance: bool,
              frames: int = FRAMES) -> int:
    from .dit import load_dit

    comps = ckpt.components
    adapter = comps["audio_adapter"].path if comps["audio_adapter"].found else None
    model = load_dit(ckpt.path("dit"), ckpt.layout("dit"), adapter, device="meta", dtype=dtype)
    model.blocks = model.blocks[:2]  # the per-block peak; see the module docstring

    def build():
        _fake(model, model)
        inp = _dit_inputs(model, hw, dtype, frames)
        if not batch_guidance:
            return model, lambda: model(**inp)
        silent = torch.zeros_like(inp["audio"][:1])
        return model, lambda: model.forward_branches(
            inp["x"], inp["t"], [inp["context"]] * 3, inp["clip_fea"], inp["y"],
            [inp["audio"], inp["audio"], silent], inp["ref_target_masks"])

    return _trace_peak(build)


def _decode_peak(ckpt: CheckpointSet, dtype: torch.dtype, hw: tuple[int, int], frames: int = FRAMES) -> int:
    from ..stages import DecodeStage

    stage = DecodeStage.from_pretrained(ckpt, "meta", dtype)

    def build():
        _fake(stage.vae, stage.vae.model)
        lat_t = 1 + (frames - 1) // 4
        return stage.vae.model, lambda: stage.decode(torch.zeros(16, lat_t, hw[0] // 8, hw[1] // 8))

    return _trace_peak(build)


# ---------------------------------------------------------------------------------- the plan
@dataclass
class PlanOptions:
    """``dtypes``: per component (default: the official's on CUDA). ``quantize``: ``int8`` /
    ``fp8`` DiT blocks; ``low_vram``: DiT blocks streamed from host RAM (``"prefetch"`` holds
    two on the GPU); ``batch_guidance``: the three guidance passes as one batch."""

    gpu_memory: Optional[int] = None
    quantize: Optional[str] = None
    low_vram: "bool | str" = False
    batch_guidance: bool = False
    dtypes: dict = field(default_factory=dict)
    trace: bool = True  # False: weights only (activations counted as 0; instant)
    frames: int = FRAMES
    resolutions: dict = field(default_factory=lambda: dict(RESOLUTIONS))  # name -> (height, width)


@dataclass
class StageMemory:
    stage: str
    models: str
    dtype: str
    gpu_load: int  # weights on the GPU once loaded
    host_load: int  # host RAM (anonymous) at the peak of loading
    gpu_peak: dict  # resolution -> weights + estimated activation peak
    host_peak: dict  # resolution -> host RAM while running


@dataclass
class MemoryPlan:
    root: str
    options: PlanOptions
    stages: list[StageMemory]
    weights: dict[str, int]  # component -> parameters
    fits: list[dict]  # option sets x placements x resolutions


def _short(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(dtype, str(dtype))


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def dit_gpu_weight_bytes(stats: TensorStats, dtype: torch.dtype, quantize: Optional[str], low_vram) -> int:
    """GPU bytes of the DiT's weights under the levers (int8/fp8: one byte per block linear
    weight, scales not counted; low-VRAM: everything outside the blocks, plus one block on
    the GPU at a time, two with prefetch)."""
    b = _dtype_bytes(dtype)
    blocks = stats.blocks_params * b - (stats.block_linear_params * (b - 1) if quantize else 0)
    outside = (stats.params - stats.blocks_params) * b
    if low_vram:
        resident = 2 if low_vram == "prefetch" else 1
        return outside + resident * blocks // max(len(stats.block_ids), 1)
    return outside + blocks


def _stage_rows(stats: dict[str, TensorStats], dtypes: dict, opts: PlanOptions,
                acts: dict[str, dict[str, int]]) -> list[StageMemory]:
    def w(c):
        return stats[c].params * _dtype_bytes(dtypes[c])

    dit_gpu = dit_gpu_weight_bytes(stats["dit"], dtypes["dit"], opts.quantize, opts.low_vram)
    dit_host = 0
    if opts.low_vram or opts.quantize:  # loaded on the CPU first (and kept there with low_vram)
        dit_host = stats["dit"].params * _dtype_bytes(dtypes["dit"])
    rows = [
        ("audio", "wav2vec2", ["audio"], w("audio"), 0),
        ("image", "CLIP ViT-H/14 + VAE", ["clip", "vae"], w("clip") + w("vae"), 0),
        ("text", "UMT5-XXL", ["text"], w("text"), 0),
        ("diffusion", "DiT + adapter" + (f" ({opts.quantize})" if opts.quantize else "")
         + (" low-VRAM" if opts.low_vram else ""), ["dit"], dit_gpu, dit_host),
        ("decode", "VAE", ["vae"], w("vae"), 0),
    ]
    out = []
    for stage, models, comps, gpu, host_resident in rows:
        streaming = max(stats[c].largest_file_bytes for c in comps)
        out.append(StageMemory(
            stage, models, "/".join(str(dtypes[c]).replace("torch.", "") for c in comps), gpu,
            host_resident + streaming,
            {res: gpu + a[stage] for res, a in acts.items()},
            {res: (host_resident if opts.low_vram else 0) for res in acts},
        ))
    return out


def memory_plan(ckpt: CheckpointSet, options: Optional[PlanOptions] = None) -> MemoryPlan:
    """Per-stage memory of the models under ``ckpt`` with ``options``, and which option sets
    fit which card (``fits``)."""
    from ..precision import stage_dtypes

    opts = options or PlanOptions()
    dtypes = stage_dtypes("cuda", None, opts.dtypes)
    stats = component_stats(ckpt)
    dit_peaks: dict = {}

    def dit_peak(dtype: torch.dtype, batched: bool, res: str) -> int:
        if not opts.trace:
            return 0
        if (dtype, batched, res) not in dit_peaks:
            dit_peaks[dtype, batched, res] = _dit_peak(ckpt, dtype, opts.resolutions[res], batched, opts.frames)
        return dit_peaks[dtype, batched, res]

    trace = (lambda f, *a: f(*a)) if opts.trace else (lambda f, *a: 0)
    audio, text = trace(_audio_peak, ckpt, dtypes["audio"], opts.frames), trace(_text_peak, ckpt, dtypes["text"])
    acts = {}
    for res, hw in opts.resolutions.items():
        acts[res] = {"audio": audio, "image": trace(_image_peak, ckpt, dtypes, hw, opts.frames), "text": text,
                     "decode": trace(_decode_peak, ckpt, dtypes["vae"], hw, opts.frames),
                     "diffusion": dit_peak(dtypes["dit"], opts.batch_guidance, res)}
    stages = _stage_rows(stats, dtypes, opts, acts)
    fit_rows = []
    for name, lever in _OPTION_SETS:
        dt = dict(dtypes, dit=lever.get("dit_dtype", dtypes["dit"]))
        name = name.replace("bf16", _short(dtypes["dit"]))  # the DiT dtype asked for (bf16 by default)
        o = PlanOptions(quantize=lever.get("quantize"), low_vram=lever.get("low_vram", False),
                        batch_guidance=lever.get("batch_guidance", False))
        for res in opts.resolutions:
            a = dict(acts[res], diffusion=dit_peak(dt["dit"], o.batch_guidance, res))
            fit_rows.append(_placements(name, res, _stage_rows(stats, dt, o, {res: a}), a))
    return MemoryPlan(str(ckpt.root), opts, stages, {c: s.params for c, s in stats.items()}, fit_rows)


_OPTION_SETS = (
    ("bf16", dict()),
    ("bf16 + batch_guidance", dict(batch_guidance=True)),
    ("int8", dict(quantize="int8")),
    ("fp8", dict(quantize="fp8")),
    ("low_vram", dict(low_vram=True)),
    ("low_vram + int8", dict(low_vram=True, quantize="int8")),
    ("fp32 DiT (--allow-fp32-dit)", dict(dit_dtype=torch.float32)),
)

_OTHERS = ("audio", "image", "text", "decode")


def _placements(option: str, res: str, rows: list[StageMemory], acts: dict[str, int]) -> dict:
    """GPU peak of one option set in the placements: everything on one GPU (``multitalk
    generate``: all weights resident, the stages run one at a time), the Diffusion replica
    alone on its GPU, and the four other replicas sharing one GPU (the serve config)."""
    by = {r.stage: r for r in rows}
    return {
        "option": option, "resolution": res,
        "one_gpu": sum(r.gpu_load for r in rows) + max(acts.values()) + CUDA_CONTEXT_BYTES,
        "dit_alone": by["diffusion"].gpu_peak[res] + CUDA_CONTEXT_BYTES,
        "encoders_decoder": (sum(by[s].gpu_load for s in _OTHERS) + max(acts[s] for s in _OTHERS)
                             + len(_OTHERS) * CUDA_CONTEXT_BYTES),
        "host": max(r.host_load for r in rows),
    }


def fits(bytes_needed: int, card: int) -> bool:
    return bytes_needed <= FIT_MARGIN * card


def _g(n: int) -> str:
    return f"{n / GiB:6.1f}"


def format_plan(plan: MemoryPlan) -> str:
    """The plan as text tables (GiB)."""
    o = plan.options
    res = list(o.resolutions)
    sizes = ", ".join(f"{r} = {h}x{w}" for r, (h, w) in o.resolutions.items())
    acts = ("activations an estimate: see multitalk.checkpoints.memory_plan" if o.trace
            else "activations NOT counted: weights only")
    lines = [f"memory plan for {plan.root} (GiB = 2^30 bytes; weights exact from the headers, {acts})",
             f"clip: {o.frames} frames, {SPEAKERS} speakers, a {TEXT_TOKENS}-token prompt; {sizes} (the largest-area "
             f"buckets); options: quantize={o.quantize or 'none'}, low_vram={o.low_vram or False}, "
             f"batch_guidance={o.batch_guidance}",
             "parameters: " + ", ".join(f"{c} {n / 1e9:.3f}B" for c, n in plan.weights.items()),
             "",
             f"{'stage':10} {'models':32} {'dtype':17} {'GPU load':>8} {'host load':>9} "
             + " ".join(f"{'GPU ' + r:>8}" for r in res) + f" {'host run':>8}"]
    for s in plan.stages:
        lines.append(f"{s.stage:10} {s.models:32} {s.dtype:17} {_g(s.gpu_load):>8} {_g(s.host_load):>9} "
                     + " ".join(f"{_g(s.gpu_peak[r]):>8}" for r in res) + f" {_g(max(s.host_peak.values())):>8}")
    lines += ["",
              "GPU load: the stage's weights; host load: host RAM while loading (at most one tensor streaming, plus "
              "the DiT itself when it is loaded on the CPU first for low_vram/quantize; the files are memory-mapped, "
              "so RSS also shows up to about one shard of page cache, reclaimable and not counted here); "
              f"GPU {'/'.join(res)}: weights + activation peak; a CUDA context "
              f"({CUDA_CONTEXT_BYTES / GiB:.1f} GiB) per process comes on top.",
              ""]
    cards = {"given": o.gpu_memory} if o.gpu_memory else CARDS
    head = f"{'option set':28} {'res':5} {'one GPU':>8} {'DiT alone':>9} {'encoders':>8} {'host':>6}  "
    head += "  ".join(f"{'fits ' + (n if n != 'given' else _g(c).strip() + 'GiB'):>12}" for n, c in cards.items())
    lines += ["which option sets fit (one GPU: all five stages in one process, as multitalk generate; DiT alone: "
              "the Diffusion replica on its own GPU, as the serve config; encoders: audio+image+text+decode "
              f"replicas sharing one GPU; fits: <= {FIT_MARGIN:.0%} of the card; host: host RAM at load)", head]
    for r in plan.fits:
        marks = ["/".join(("yes" if fits(r[k], card) else "no") for k in ("one_gpu", "dit_alone", "encoders_decoder"))
                 for card in cards.values()]
        lines.append(f"{r['option']:28} {r['resolution']:5} {_g(r['one_gpu']):>8} {_g(r['dit_alone']):>9} "
                     f"{_g(r['encoders_decoder']):>8} {_g(r['host']):>6}  " + "  ".join(f"{m:>12}" for m in marks))
    lines.append("fits columns: one GPU / DiT alone / encoders")
    return "\n".join(lines)
