"""End-to-end clip bench: every stage with random weights, per-stage time and peak memory.

    # GPU, the real sizes (wav2vec2-base, CLIP ViT-H/14, UMT5-XXL, Wan VAE, 14B DiT + adapter),
    # bf16, one 81-frame two-speaker clip at 480p, 2 sampling steps timed (x20 for 40 steps):
    python bench/pipeline_gpu.py --scale real --device cuda --size multitalk-480 --steps 2
    # CPU, the tiny sizes (same code path):
    python bench/pipeline_gpu.py --scale tiny --size multitalk-128 --frames 17 --steps 2

The models are built on the meta device and filled with random numbers directly on the
target device (no checkpoint files: 60 GB of random weights on disk would only measure the
disk). Runs without Ray, through the same driver as the service (`LocalStages`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.synthetic import noise_png, speech_wav  # noqa: E402


def _randomize(module: torch.nn.Module, device: str, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    # Cast on meta, then allocate: fp32 copies of the DiT (76 GB) and UMT5 (23 GB) would not fit.
    module = module.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() > 1:
                p.normal_(0, p[0].numel() ** -0.5, generator=gen)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02, generator=gen)
        for name, b in module.named_buffers():
            # to_empty leaves buffers uninitialised. The only ones in these models are CLIP's
            # position ids (an arange the embedding lookup indexes with); garbage there would
            # be an out-of-range index on the GPU.
            if name.endswith("position_ids"):
                b.copy_(torch.arange(b.shape[-1], device=b.device).expand_as(b))
            elif b.is_floating_point():
                b.zero_()
            else:
                raise ValueError(f"no initial value known for buffer {name} ({b.dtype})")
    return module.to(dtype).eval().requires_grad_(False)


def _configs(scale: str) -> dict:
    """Model configs: ``real`` (wav2vec2-base, CLIP ViT-H/14, UMT5-XXL, Wan VAE, 14B DiT) or
    ``mini`` (the tiny test widths, built the same way: the real path checked on a CPU)."""
    from multitalk.checkpoints.tiny import tiny_dit_config
    from multitalk.modules import audio_encoder, image_encoder, text_encoder, vae

    if scale == "mini":
        return dict(w2v=dict(audio_encoder.TINY_CONFIG), clip=dict(image_encoder.TINY_CONFIG, hidden_act="gelu"),
                    t5=dict(text_encoder.TINY_CONFIG, feed_forward_proj="gated-gelu"),
                    vae=dict(vae.TINY_CONFIG), dit=tiny_dit_config())
    return dict(
        w2v={},  # base: 12 layers x 768
        clip=dict(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16, intermediate_size=5120,
                  image_size=224, patch_size=14, hidden_act="gelu", layer_norm_eps=1e-5),
        t5=dict(d_model=4096, num_layers=24, num_heads=64, d_kv=64, d_ff=10240, vocab_size=256384,
                feed_forward_proj="gated-gelu", relative_attention_num_buckets=32),
        vae=dict(vae.REAL_CONFIG), dit={},
    )


def random_stages(device: str, dtype: torch.dtype, batch_guidance: bool, scale: str = "real"):
    """All stages built on ``meta`` and filled with random numbers on ``device``."""
    from diffusers import AutoencoderKLWan
    from transformers import (
        CLIPVisionConfig, CLIPVisionModel, UMT5Config, UMT5EncoderModel, Wav2Vec2Config,
        Wav2Vec2FeatureExtractor, Wav2Vec2Model,
    )

    from multitalk.generation.local import LocalStages
    from multitalk.modules import audio_encoder, text_encoder, vae
    from multitalk.modules.audio_encoder import AudioEncoder
    from multitalk.modules.image_encoder import ImageEncoder
    from multitalk.modules.text_encoder import TextEncoder
    from multitalk.modules.transformer_multitalk import MultiTalkTransformer3DModel
    from multitalk.stages import AudioStage, DecodeStage, DiffusionStage, ImageStage, TextStage

    cfg = _configs(scale)
    with torch.device("meta"):
        w2v = Wav2Vec2Model(Wav2Vec2Config(**cfg["w2v"]))
        clip = CLIPVisionModel(CLIPVisionConfig(**cfg["clip"]))
        t5 = UMT5EncoderModel(UMT5Config(**cfg["t5"]))
        autoencoder = AutoencoderKLWan(**{k: v for k, v in cfg["vae"].items() if k != "dropout"})
        dit = MultiTalkTransformer3DModel(**cfg["dit"])
    tok_dir = tempfile.mkdtemp(prefix="bench-tok-")
    text_encoder._save_tiny_tokenizer(tok_dir)  # any T5 tokenizer does: ids stay below the vocab size
    from transformers import AutoTokenizer

    the_vae = vae.WanVAE(_randomize(autoencoder, device, torch.float32), device=device)
    return LocalStages(
        AudioStage(AudioEncoder(_randomize(w2v, device, dtype),
                                Wav2Vec2FeatureExtractor(**audio_encoder.TINY_PREPROCESSOR_CONFIG), device, dtype)),
        ImageStage(ImageEncoder(_randomize(clip, device, dtype)), the_vae, device, dtype),
        TextStage(TextEncoder(_randomize(t5, device, dtype), AutoTokenizer.from_pretrained(tok_dir))),
        DiffusionStage(_randomize(dit, device, dtype), device, dtype, batch_guidance=batch_guidance),
        DecodeStage(the_vae),
    )


def tiny_stages(device: str, dtype: torch.dtype, batch_guidance: bool):
    from multitalk.checkpoints.tiny import make_tiny_weights
    from multitalk.pipeline import MultiTalkPipeline

    root = make_tiny_weights(tempfile.mkdtemp(prefix="bench-tiny-"), "official")
    stages = MultiTalkPipeline.from_pretrained(str(root), device=device, dtype=str(dtype).replace("torch.", "")).stages
    stages.diffusion.batch_guidance = batch_guidance
    return stages


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", choices=["real", "mini", "tiny"], default="tiny",
                    help="real: the real model sizes, random weights; mini: the same path at the tiny widths "
                         "(a CPU check of it); tiny: tiny checkpoints loaded from files")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="bfloat16 (CUDA default) or float32 (CPU default)")
    ap.add_argument("--size", default="multitalk-480")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--speakers", type=int, default=2)
    ap.add_argument("--batch-guidance", action="store_true")
    ap.add_argument("--compile", action="store_true", help="regional torch.compile of the DiT block")
    ap.add_argument("--attention-backend", help="diffusers attention backend for the DiT (e.g. _native_cudnn)")
    ap.add_argument("--json", help="also write the report to this file")
    args = ap.parse_args()
    from multitalk.api import GenerationRequest, SamplingOptions
    from multitalk.driver import generate

    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    t0 = time.perf_counter()
    if args.scale == "tiny":
        stages = tiny_stages(args.device, dtype, args.batch_guidance)
    else:
        stages = random_stages(args.device, dtype, args.batch_guidance, args.scale)
    dit = stages.diffusion.model
    if args.attention_backend:
        dit.set_attention_backend(args.attention_backend)
    if args.compile:  # as DiffusionStage.from_pretrained(compile=True); the first step pays the compile
        dit.compile_repeated_blocks(fullgraph=True)
    build_s = time.perf_counter() - t0
    seconds = (args.frames + 8) / 25
    request = GenerationRequest(
        image=noise_png(720, 1280), audio=[speech_wav(seconds / 2 if args.speakers == 2 else seconds, seed=i)
                                           for i in range(args.speakers)],
        prompt="two people talk in a car", size=args.size, frames=args.frames,
        audio_type="add", sampling=SamplingOptions(steps=args.steps),
        # A noise picture has no faces to find the speakers by: their boxes, the official
        # default's left and right halves.
        bbox=[[36, 32 + 640 * k, 684, 608 + 640 * k] for k in range(args.speakers)] if args.speakers == 2 else None,
    )
    import asyncio

    if args.compile:  # a one-step clip first: the compile (tens of seconds) stays out of the timings
        warm = dataclasses.replace(request, sampling=SamplingOptions(steps=1))
        asyncio.run(generate(warm, stages))
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    result = asyncio.run(generate(request, stages))
    peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
    t = result.timings
    per_step = t["diffusion"] / args.steps
    report = {"scale": args.scale, "device": args.device,
              "card": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
              "dtype": str(dtype), "size": args.size, "steps": args.steps,
              "levers": {"batch_guidance": args.batch_guidance, "compile": args.compile,
                         "attention_backend": args.attention_backend},
              "video": f"{result.width}x{result.height}x{result.num_frames}", "build_s": round(build_s, 1),
              "timings_s": t, "diffusion_s_per_step": round(per_step, 3),
              "estimated_clip_s_at_40_steps": round(t["total"] - t["diffusion"] + 40 * per_step, 1),
              "peak_gpu_gib": peak}
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))

if __name__ == "__main__":
    main()
