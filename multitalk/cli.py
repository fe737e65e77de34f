"""The model library's command line (``python -m multitalk.cli``).

    multitalk make-tiny-weights DIR [--layout official|diffusers]
    multitalk check DIR                      # JSON report: which components are where
    multitalk explore DIR                    # what a models volume holds
    multitalk generate --models DIR --image IMG --audio WAV [--audio2 WAV] --prompt TEXT --out OUT.mp4
    multitalk generate --models DIR --video SRC.mp4 --audio WAV --out OUT.mp4   # InfiniteTalk dubbing
    multitalk submit --url URL --image IMG --audio WAV [--wait] [--out OUT.mp4]

The installed ``multitalk`` command is this parser plus the serving layer's ``serve`` and
``demo`` (``deployments/cli.py``): the library itself imports nothing from ``deployments``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _bbox(values: list[str] | None) -> list[list[float]] | None:
    """``--bbox r0,c0,r1,c1 [r0,c0,r1,c1]`` → per-speaker boxes."""
    if not values:
        return None
    return [[float(v) for v in box.split(",")] for box in values]


def cmd_make_tiny(args) -> int:
    from .checkpoints.discovery import find_checkpoints
    from .checkpoints.tiny import make_tiny_weights

    root = make_tiny_weights(args.dir, args.layout, args.seed)
    print(json.dumps({"root": str(root), "kind": find_checkpoints(root).kind, "layout": args.layout}))
    return 0


def cmd_check(args) -> int:
    from .checkpoints.discovery import find_checkpoints

    report = find_checkpoints(args.dir).report()
    print(json.dumps(report, indent=2))
    return 0 if report["kind"] != "incomplete" else 1


def cmd_explore(args) -> int:
    from .checkpoints.discovery import explore

    print(json.dumps(explore(args.dir, args.depth), indent=2))
    return 0


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from .api import GenerationRequest, InputError, SamplingOptions
    from .pipeline import MultiTalkPipeline

    audio = [Path(args.audio).read_bytes()] + ([Path(args.audio2).read_bytes()] if args.audio2 else [])
    model, modal = _model_defaults(args)
    if not (args.image or args.video):
        print("error: give --image (image-to-video) or --video (video-to-video, InfiniteTalk)", file=sys.stderr)
        return 2
    sampling = SamplingOptions(steps=args.steps, seed=args.seed, text_scale=args.text_scale,
                               audio_scale=args.audio_scale, shift=args.shift, use_apg=args.apg,
                               teacache_thresh=args.teacache)
    request = GenerationRequest(
        image=Path(args.image).read_bytes() if args.image else None, audio=audio, prompt=args.prompt,
        audio_type=args.audio_type, bbox=_bbox(args.bbox), frames=args.frames, sampling=sampling,
        color_correction=args.color_correction, video=Path(args.video).read_bytes() if args.video else None,
        **modal,
    )
    pipe = MultiTalkPipeline.from_pretrained(
        args.models, device=args.device, dtype=args.dtype, attention_backend=args.attention_backend,
        tiled_vae=args.tiled_vae, batch_guidance=args.batch_guidance, quantize=args.quantize, low_vram=args.low_vram,
        compile=args.compile, loras=[_lora_spec(x) for x in args.lora], model=model,
    )
    bar = tqdm(total=1, desc="prepare", unit="step")

    def progress(p):
        if p.stage == "diffusion":
            bar.total = p.total_steps
            bar.set_description(f"diffusion chunk {p.chunk}/{p.total_chunks}")
            bar.n = p.step
            bar.refresh()
        else:
            bar.set_description(p.stage)

    try:
        result = pipe.generate(request, progress)
    except InputError as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 2
    bar.close()
    Path(args.out).write_bytes(result.video)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(json.dumps({"out": args.out, "frames": result.num_frames, "fps": result.fps, "width": result.width,
                      "height": result.height, "chunks": result.chunks, "lip_sync": result.lip_sync,
                      "timings": result.timings}))
    return 0


def _model_defaults(args) -> tuple[str, dict]:
    """The model (``--video`` implies InfiniteTalk) and its defaults for the options left unset."""
    model = args.model or ("infinitetalk" if args.video else "multitalk")
    if model == "infinitetalk":
        from .infinitetalk import DEFAULTS

        defaults = {k: DEFAULTS[k] for k in ("mode", "motion_frames", "size")}
    else:
        defaults = {"mode": "clip", "motion_frames": 25, "size": "multitalk-480"}
    chosen = {"mode": args.mode, "motion_frames": args.motion_frames, "size": args.size}
    return model, {k: defaults[k] if v is None else v for k, v in chosen.items()}


def cmd_submit(args) -> int:
    from .client import submit

    status = submit(args.url, args.image, args.audio, audio2=args.audio2, prompt=args.prompt, wait=args.wait,
                    out=args.out, options=json.loads(args.options) if args.options else None)
    print(json.dumps(status, indent=2, default=str))
    return 0 if status.get("state", status.get("status")) not in ("FAILED", "CANCELLED") else 1


def _lora_spec(text: str) -> dict:
    """``PATH[:SCALE]`` → ``{"path": PATH, "scale": SCALE}`` (scale 1 by default)."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "scale": float(scale)}
        except ValueError:
            pass
    return {"path": text, "scale": 1.0}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multitalk", description="MultiTalk Serve: audio-driven talking video")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = sub  # where the serving layer adds its own commands (deployments/cli.py)

    s = sub.add_parser("make-tiny-weights", help="write a tiny random-weight checkpoint set (official layouts)")
    s.add_argument("dir")
    s.add_argument("--layout", choices=["official", "diffusers"], default="official")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_make_tiny)

    s = sub.add_parser("check", help="report which model components are present under a models root")
    s.add_argument("dir")
    s.set_defaults(fn=cmd_check)

    s = sub.add_parser("explore", help="list what a models volume holds")
    s.add_argument("dir")
    s.add_argument("--depth", type=int, default=3)
    s.set_defaults(fn=cmd_explore)

    s = sub.add_parser("generate", help="generate one video in this process")
    s.add_argument("--models", required=True)
    s.add_argument("--image", help="condition image (image-to-video)")
    s.add_argument("--video", help="source video to dub (video-to-video; InfiniteTalk)")
    s.add_argument("--model", choices=["multitalk", "infinitetalk"],
                   help="default: infinitetalk with --video, else multitalk")
    s.add_argument("--audio", required=True)
    s.add_argument("--audio2")
    s.add_argument("--audio-type", choices=["add", "para"], default="add")
    s.add_argument("--bbox", nargs="+", metavar="R0,C0,R1,C1", help="per speaker, source pixels, rows first")
    s.add_argument("--prompt", default="")
    s.add_argument("--mode", choices=["clip", "streaming"], help="default: clip (MultiTalk), streaming (InfiniteTalk)")
    s.add_argument("--frames", type=int, default=81)
    s.add_argument("--motion-frames", type=int, help="streaming: frames carried over (default 25 MultiTalk, 9 InfiniteTalk)")
    s.add_argument("--size", help="multitalk-480 (default), multitalk-720, or multitalk-N (e.g. 128 on CPU); "
                                  "InfiniteTalk: infinitetalk-480 (default), infinitetalk-720, infinitetalk-N")
    s.add_argument("--steps", type=int, default=40)
    s.add_argument("--seed", type=int, default=42)
    s.add_argument("--shift", type=float)
    s.add_argument("--text-scale", type=float, default=5.0)
    s.add_argument("--audio-scale", type=float, default=4.0)
    s.add_argument("--apg", action="store_true")
    s.add_argument("--teacache", type=float, default=0.0, help="TeaCache threshold (0 = off; official 0.2-0.5)")
    s.add_argument("--color-correction", type=float, default=1.0)
    s.add_argument("--device", default="cpu")
    s.add_argument("--dtype", default="float32")
    s.add_argument("--attention-backend", help="diffusers attention backend: flash, _flash_3, sage, _native_cudnn ...")
    s.add_argument("--batch-guidance", action="store_true", help="run the 3 guidance passes as one batch (lossless)")
    s.add_argument("--quantize", choices=["int8", "fp8", "fp8_dynamic"],
                   help="DiT blocks via torchao: int8/fp8 weight-only, fp8_dynamic weights+activations (lossy)")
    s.add_argument("--low-vram", nargs="?", const=True, default=False, choices=["prefetch"], metavar="prefetch",
                   help="stream DiT blocks from CPU memory (24 GB cards); 'prefetch': overlap each copy "
                        "with the previous block's compute")
    s.add_argument("--tiled-vae", action="store_true", help="tiled VAE decode (less memory)")
    s.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="merge a LoRA into the DiT (repeatable; official --lora_dir/--lora_scale). Distillation "
                        "LoRAs want --steps 8 --text-scale 1 --audio-scale 2")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the DiT block (regional; the first step pays the compile time)")
    s.add_argument("--out", required=True)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("submit", help="submit a job to a running server")
    s.add_argument("--url", default="http://127.0.0.1:8000")
    s.add_argument("--image", required=True)
    s.add_argument("--audio", required=True)
    s.add_argument("--audio2")
    s.add_argument("--prompt", default="")
    s.add_argument("--options", help="JSON object of extra job options (frames, steps, size, bbox ...)")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--out")
    s.set_defaults(fn=cmd_submit)

    return p


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
