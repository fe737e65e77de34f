"""DiT step bench: seconds per guided sampling step, achieved TFLOP/s, MFU, peak memory,
for the plain path and each speed lever, with a quality guard per lever.

    # on a GPU (real 14B size, random bf16 weights, two speakers, 81 frames):
    python bench/dit_gpu.py --model 14b --size 480 --device cuda --peak-tflops 989
    python bench/dit_gpu.py --model 14b --size 720 --device cuda --levers batched,sdpa_cudnn,compile
    # on a CPU (tiny model, same code path):
    python bench/dit_gpu.py --model tiny --size 128 --frames 17

Runs without Ray. A step is the three guidance passes (cond, no text, no text/no audio).
Every lever's output is compared with the plain path on the same inputs: relative L2
error of the guided velocity (``quality``); a lever that changes the video shows up there.
Levers: ``batched`` (the 3 passes as one batch), ``teacache`` (official threshold 0.2,
measured over ``--steps`` steps), ``compile`` (torch.compile of each block, regional),
``sdpa_math`` / ``sdpa_cudnn`` / ``flash`` / ``sage`` (diffusers attention backends),
``int8`` / ``fp8`` (weight-only DiT blocks via torchao), ``fp8_dynamic`` (fp8 weights and
activations, CUDA 8.9+): lossy, watch the quality column. ``low_vram`` streams the blocks
from pinned CPU memory (``DiffusionStage(low_vram=True)``): its peak memory is the figure
to compare with a 24 GB card; ``low_vram_prefetch`` overlaps each block's copy with the
previous block's compute (``low_vram="prefetch"``).
``two_pass`` is the guidance of a distillation LoRA (text scale 1: two passes per step; its
quality column compares different guidance, so it is not a quality figure; a LoRA also runs
8 steps instead of 40). Levers combine with ``+`` (``batched+sdpa_cudnn+compile``); ``batched`` and ``teacache``
exclude each other (TeaCache decides per guidance pass).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel  # noqa: E402
from multitalk.utils.sampler import (  # noqa: E402
    COND, DROP_AUDIO, DROP_TEXT, UNCOND, Guidance, GuidanceConfig, TeaCache, flow_timesteps,
)

SIZES = {  # (height, width) of the video; the official 480/720 buckets for a 16:9 two-person image
    "128": (96, 176), "256": (176, 352), "480": (448, 896), "720": (704, 1280),
}
MODELS = {
    "14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, text_dim=4096),
    "1layer": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=1, text_dim=4096),
    "tiny": dict(dim=64, ffn_dim=128, num_heads=4, num_layers=2, text_dim=32, image_dim=32, audio_blocks=2,
                 audio_channels=32, intermediate_dim=32, output_dim=32, context_tokens=8),
}
LEVERS = {"batched", "teacache", "two_pass", "compile", "int8", "fp8", "fp8_dynamic", "low_vram", "low_vram_prefetch",
          "sdpa_math", "sdpa_cudnn", "flash", "sage", "flash3"}
BACKENDS = {"sdpa_math": "_native_math", "sdpa_cudnn": "_native_cudnn", "flash": "flash", "sage": "sage",
            "flash3": "_flash_3"}


def dit_flops(cfg: dict, tokens: int, frames_lat: int, ctx_tokens: int = 257 + 512) -> float:
    """Matmul FLOPs of one DiT forward (2 per multiply-add)."""
    d, f, layers = cfg["dim"], cfg["ffn_dim"], cfg["num_layers"]
    audio_tok = cfg.get("context_tokens", 32) * 2
    per_layer = (
        2 * tokens * d * d * 4  # self-attn q k v o
        + 4 * tokens * tokens * d  # QK^T and PV
        + 2 * tokens * d * d * 2 + 2 * ctx_tokens * d * d * 4  # cross-attn q o; k v (text, image)
        + 4 * tokens * ctx_tokens * d
        + 2 * tokens * d * d * 2 + 2 * frames_lat * audio_tok * cfg.get("output_dim", 768) * 2 * d  # audio q proj, kv
        + 4 * tokens * audio_tok * d
        + 2 * tokens * d * f * 2  # FFN
    )
    return layers * per_layer


def build(model_name: str, device: str, dtype: torch.dtype) -> MultiTalkTransformer3DModel:
    cfg = MODELS[model_name]
    with torch.device("meta"):
        model = MultiTalkTransformer3DModel(**cfg)
    # Cast on meta, then allocate: an fp32 copy of the 14B model (76 GB) would not fit an H100.
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1 and "modulation" not in name:
                p.normal_(0, p[0].numel() ** -0.5, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
    return model.to(dtype).eval().requires_grad_(False)


def inputs(model, size: str, frames: int, device: str, dtype: torch.dtype, people: int = 2):
    cfg = model.config
    h, w = SIZES[size]
    t_lat, lh, lw = 1 + (frames - 1) // 4, h // 8, w // 8
    g = torch.Generator(device=device).manual_seed(1)
    r = lambda *s: torch.randn(*s, generator=g, device=device)  # noqa: E731
    masks = torch.zeros(3, lh, lw, device=device)
    masks[0, :, : lw // 2] = 1
    masks[1, :, lw // 2 :] = 1
    return dict(
        x=r(16, t_lat, lh, lw), y=r(20, t_lat, lh, lw).to(dtype), clip_fea=r(1, 257, cfg.image_dim).to(dtype),
        context=r(120, cfg.text_dim).to(dtype), context_null=r(60, cfg.text_dim).to(dtype),
        audio=r(people, frames, 5, cfg.audio_blocks, cfg.audio_channels).to(dtype), masks=masks,
    ), (t_lat * (lh // 2) * (lw // 2), t_lat)


def step_fn(model, inp, lever: str, steps: int, two_pass: bool = False):
    """Returns a callable running one guided step at timestep t (or a TeaCache-driven sequence).
    ``two_pass``: the distillation-LoRA guidance (text scale 1: cond and no-audio passes)."""
    silent = torch.zeros_like(inp["audio"])[-1:]
    branch_in = {COND: (inp["context"], inp["audio"]), DROP_TEXT: (inp["context_null"], inp["audio"]),
                 UNCOND: (inp["context_null"], silent), DROP_AUDIO: (inp["context"], silent)}
    guidance = Guidance(GuidanceConfig(text_scale=1.0, audio_scale=2.0) if two_pass else GuidanceConfig())
    cache = TeaCache(0.2, steps, "multitalk-480") if lever == "teacache" else None

    def one(t: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        if lever == "batched":
            outs = model.forward_branches(latent, t, [branch_in[b][0] for b in guidance.branches], inp["clip_fea"],
                                          inp["y"], [branch_in[b][1] for b in guidance.branches], inp["masks"])
            preds = dict(zip(guidance.branches, outs))
        else:
            preds = {b: model(latent, t, branch_in[b][0], inp["clip_fea"], inp["y"], branch_in[b][1], inp["masks"],
                              teacache=cache, branch=b) for b in guidance.branches}
        return guidance(preds)

    return one, cache


def run_lever(model, inp, lever: str, steps: int, device: str,
              two_pass: bool = False) -> tuple[float, torch.Tensor, int]:
    timesteps = flow_timesteps(steps, 7.0).to(device)
    fn, cache = step_fn(model, inp, lever, steps, two_pass)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    with torch.no_grad():
        fn(timesteps[0:1], inp["x"])  # warm-up (compile, kernels, allocator)
        if cache is not None:
            cache.__init__(cache.threshold, steps, cache.size)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        outs = []
        for i in range(steps):
            if cache is not None:
                cache.step = i
            outs.append(fn(timesteps[i : i + 1], inp["x"]))
        sync()
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else 0
    return (time.perf_counter() - t0) / steps, torch.stack(outs).float(), peak


QUANT = ("int8", "fp8", "fp8_dynamic")


def lever_model(plain: torch.nn.Module, device: str, quantize=None, low_vram: "bool | str" = False):
    """A copy of the (CPU-resident) plain model set up as ``DiffusionStage.from_pretrained``
    does for these levers: quantised on the CPU, then moved (or, low-VRAM, streamed block by
    block) to ``device``. Same weights as the plain path, so the quality column compares like
    with like."""
    model = copy.deepcopy(plain)
    if quantize:
        from multitalk.modules.quantize import quantize_dit_blocks

        # The stage quantises on the CPU before moving (no full-precision copy on the GPU);
        # here the plain model is off the GPU, so quantising there is safe and takes seconds
        # instead of minutes for 17B weights. Same numbers either way.
        quantize_dit_blocks(model.to(device), quantize)
    if low_vram:
        from multitalk.modules.offload import BlockStreamer

        model._block_streamer = BlockStreamer(model, device, prefetch=low_vram == "prefetch")
    else:
        model.to(device)
    return model


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), default="tiny")
    ap.add_argument("--size", choices=list(SIZES), default="128")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--steps", type=int, default=3, help="guided steps timed per lever")
    ap.add_argument("--levers", default="batched,sdpa_math,teacache", help="comma list; plain always runs")
    ap.add_argument("--peak-tflops", type=float, default=None, help="card's dense bf16 peak, for MFU (H100 SXM: 989)")
    ap.add_argument("--json", help="also write the table as JSON to this file")
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, None: None}[args.dtype]
    dtype = dtype or (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    model = build(args.model, args.device, dtype)
    inp, (tokens, t_lat) = inputs(model, args.size, args.frames, args.device, dtype)
    flops_step = 3 * dit_flops(dict(model.config), tokens, t_lat)
    rows = []
    run_lever(model, inp, "plain", 1, args.device)  # process warm-up: first-call costs stay out of the table
    base_t, base_out, base_peak = run_lever(model, inp, "plain", args.steps, args.device)
    rows.append(("plain", base_t, 0.0, base_peak))
    for lever in [x for x in args.levers.split(",") if x]:
        parts = lever.split("+")  # a combination, e.g. batched+sdpa_cudnn+compile
        unknown = [p for p in parts if p not in LEVERS]
        if unknown:
            raise SystemExit(f"unknown lever(s) {unknown}; known: {sorted(LEVERS)}")
        if "batched" in parts and "teacache" in parts:
            raise SystemExit("batched and teacache exclude each other (TeaCache decides per guidance pass)")
        mode = "batched" if "batched" in parts else "teacache" if "teacache" in parts else "plain"
        plain_model = model
        try:
            quant = [p for p in parts if p in QUANT]
            streaming = "low_vram" in parts or "low_vram_prefetch" in parts
            if quant or streaming:
                # Levers with their own copy of the model: the plain one leaves the GPU meanwhile,
                # so that the peak memory column is the lever's alone.
                model = None
                plain_model.to("cpu")
                if args.device.startswith("cuda"):
                    torch.cuda.empty_cache()
                model = lever_model(plain_model, args.device, quant[0] if quant else None,
                                    "prefetch" if "low_vram_prefetch" in parts else streaming)
            for p in parts:
                if p in BACKENDS:
                    model.set_attention_backend(BACKENDS[p])
            if "compile" in parts:  # regional: one graph for all blocks, as DiffusionStage(compile=True)
                model.compile_repeated_blocks(fullgraph=True)
            t, out, peak = run_lever(model, inp, mode, args.steps, args.device, "two_pass" in parts)
            err = ((out - base_out).norm() / base_out.norm()).item()
            rows.append((lever, t, err, peak))
        except Exception as e:  # a lever unavailable on this machine (kernel not installed ...)
            rows.append((lever, float("nan"), float("nan"), 0))
            print(f"{lever}: unavailable ({type(e).__name__}: {str(e)[:160]})", file=sys.stderr)
        finally:
            if model is not plain_model:
                del model
                plain_model.to(args.device)
            model = plain_model
            model.set_attention_backend(None)
            for block in model.blocks:  # undo nn.Module.compile
                block._compiled_call_impl = None
            torch._dynamo.reset()
    header = dict(model=args.model, size=args.size, frames=args.frames, tokens=tokens, device=args.device,
                  card=torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                  dtype=str(dtype), tflop_per_step=flops_step / 1e12, steps=args.steps)
    print(json.dumps(header))
    print(f"{'lever':>28} {'s/step':>10} {'x plain':>8} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9} {'quality (rel err)':>18}")
    table = []
    for name, t, err, peak in rows:
        flops = flops_step * (2 / 3 if "two_pass" in name.split("+") else 1)  # two passes instead of three
        tflops = flops / t / 1e12 if t == t else float("nan")
        mfu = tflops / args.peak_tflops if args.peak_tflops else None
        mem = f"{peak / 2**30:9.2f}" if args.device.startswith("cuda") else f"{'n/a':>9}"
        print(f"{name:>28} {t:10.4f} {t / base_t:8.2f} {tflops:9.3f} {f'{mfu:.1%}' if mfu else 'n/a':>7} {mem} "
              f"{err:18.2e}")
        table.append(dict(lever=name, s_per_step=t, x_plain=t / base_t, tflops=tflops, mfu=mfu,
                          peak_gib=peak / 2**30, rel_err=err))
    if args.json:
        Path(args.json).write_text(json.dumps(dict(header, rows=table), indent=1))


if __name__ == "__main__":
    main()
