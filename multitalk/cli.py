"""The model library's command line (``python -m multitalk.cli``).

    multitalk make-tiny-weights DIR [--layout official|diffusers]
    multitalk check DIR                      # JSON report: which components are where, and whether they load
    multitalk check DIR --plan [--gpu-memory 80GB] [--quantize int8] [--low-vram]   # memory per stage
    multitalk explore DIR                    # what a models volume holds
    multitalk generate --models DIR --image IMG --audio WAV [--audio2 WAV ...--audio4 WAV] --prompt TEXT --out OUT.mp4
    multitalk generate --models DIR --image IMG --text TEXT --voice af_heart --out OUT.mp4
    multitalk generate --models DIR --image IMG --script "(s1) Hi! (s2) Hello." --voice af_heart --voice2 am_adam ...
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

    root = make_tiny_weights(args.dir, args.layout, args.seed, speech=args.speech)
    print(json.dumps({"root": str(root), "kind": find_checkpoints(root).kind, "layout": args.layout}))
    return 0


def cmd_check(args) -> int:
    """Discovery, then (unless ``--no-verify``) every loader's verdict on the meta device:
    a set that would not load is ``incomplete`` and the broken key is named."""
    from .checkpoints.discovery import find_checkpoints

    ckpt = find_checkpoints(args.dir)
    if not args.no_verify:
        from .checkpoints.verify import verify_checkpoints

        verify_checkpoints(ckpt)
    report = ckpt.report()
    for comp in report["components"].values():
        if comp["loadable"] is False:
            print(f"error: {comp['name']} ({comp['path']}) would not load: {comp['error']}", file=sys.stderr)
    if not args.plan:
        print(json.dumps(report, indent=2))
        return 0 if report["kind"] != "incomplete" else 1
    if report["kind"] == "incomplete":
        print(json.dumps(report, indent=2))
        print("error: no memory plan for an incomplete set", file=sys.stderr)
        return 1
    from .checkpoints.memory_plan import PlanOptions, format_plan, memory_plan, parse_bytes
    from .precision import parse_stage_dtypes

    options = PlanOptions(gpu_memory=parse_bytes(args.gpu_memory) if args.gpu_memory else None,
                          quantize=args.quantize, low_vram=args.low_vram, batch_guidance=args.batch_guidance,
                          dtypes=parse_stage_dtypes(args.stage_dtype), trace=not args.weights_only)
    print(f"{report['root']}: {report['kind']} ({report['base_layout']} layout), every component loads"
          + ("" if args.no_verify else " (checked on the meta device)"))
    print(format_plan(memory_plan(ckpt, options)))
    return 0


def cmd_explore(args) -> int:
    from .checkpoints.discovery import explore

    print(json.dumps(explore(args.dir, args.depth), indent=2))
    return 0


def cmd_generate(args) -> int:
    from tqdm import tqdm

    from .api import GenerationRequest, InputError, SamplingOptions
    from .pipeline import MultiTalkPipeline

    audio, speech = _audio_or_speech(args)
    model, modal = _model_defaults(args)
    if not (args.image or args.video):
        print("error: give --image (image-to-video) or --video (video-to-video, InfiniteTalk)", file=sys.stderr)
        return 2
    sampling = SamplingOptions(steps=args.steps, seed=args.seed, text_scale=args.text_scale,
                               audio_scale=args.audio_scale, shift=args.shift, use_apg=args.apg,
                               teacache_thresh=args.teacache)
    request = GenerationRequest(
        image=Path(args.image).read_bytes() if args.image else None, audio=audio, prompt=args.prompt,
        audio_type=args.audio_type, bbox=_bbox(args.bbox), speaker_order=args.speaker_order, frames=args.frames,
        sampling=sampling, scene_cuts=args.scene_cuts,
        color_correction=args.color_correction, video=Path(args.video).read_bytes() if args.video else None,
        speech=speech, **modal,
    )
    from .checkpoints.discovery import MissingCheckpointError
    from .precision import PrecisionError

    try:
        pipe = MultiTalkPipeline.from_pretrained(
            args.models, device=args.device or _default_device(), dtype=args.dtype,
            stage_dtypes=args.stage_dtype, allow_fp32_dit=args.allow_fp32_dit,
            attention_backend=args.attention_backend, tiled_vae=args.tiled_vae, batch_guidance=args.batch_guidance,
            quantize=args.quantize, low_vram=args.low_vram, compile=args.compile,
            loras=[_lora_spec(x) for x in args.lora], model=model, allow_no_lip_sync=args.allow_no_lip_sync,
        )
    except (PrecisionError, MissingCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
    if args.speech_out and result.speech_wav is not None:
        Path(args.speech_out).write_bytes(result.speech_wav)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(json.dumps({"out": args.out, "frames": result.num_frames, "fps": result.fps, "width": result.width,
                      "height": result.height, "chunks": result.chunks, "lip_sync": result.lip_sync,
                      "timings": result.timings}))
    return 0


def _audio_or_speech(args, read: bool = True):
    """``--audio [--audio2 [--audio3 [--audio4]]]`` → audio bytes (``read=False``: the paths), or
    ``--text``/``--script`` with voices → a SpeechRequest."""
    from .api import SpeechRequest

    if args.audio and (args.text or args.script):
        raise SystemExit("error: give --audio or --text/--script, not both")
    if args.audio:
        extra = [args.audio2, args.audio3, args.audio4]
        if any(later and not earlier for earlier, later in zip(extra, extra[1:])):
            raise SystemExit("error: give --audio2 before --audio3, and --audio3 before --audio4")
        paths = [args.audio] + [a for a in extra if a]
        return ([Path(a).read_bytes() for a in paths] if read else paths), None
    if not (args.text or args.script):
        raise SystemExit("error: give --audio WAV, --text TEXT --voice NAME, or --script '(s1) ... (s2) ...'")
    if not args.voice:
        raise SystemExit("error: --text/--script need --voice (and --voice2 for a second speaker)")
    voices = [args.voice] + ([args.voice2] if args.voice2 else [])
    if args.script:
        return [], SpeechRequest(voices=voices, script=args.script, speed=args.speed)
    texts = [args.text] + ([args.text2] if args.text2 else [])
    return [], SpeechRequest(voices=voices, texts=texts, speed=args.speed)


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

    options = json.loads(args.options) if args.options else {}
    audio, speech = _audio_or_speech(args, read=False)
    if speech is not None:
        options["speech"] = {k: v for k, v in vars(speech).items() if v is not None}
    if not (args.image or args.video):
        raise SystemExit("error: give --image (image-to-video) or --video (video-to-video, an InfiniteTalk server)")
    status = submit(args.url, args.image, audio or None, prompt=args.prompt, wait=args.wait,
                    out=args.out, options=options or None, video=args.video)
    print(json.dumps(status, indent=2, default=str))
    return 0 if status.get("state", status.get("status")) not in ("FAILED", "CANCELLED") else 1


def _default_device() -> str:
    """``cuda`` when this machine has a GPU, else ``cpu``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _lora_spec(text: str) -> dict:
    """``PATH[:SCALE]`` → ``{"path": PATH, "scale": SCALE}`` (scale 1 by default)."""
    path, sep, scale = text.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "scale": float(scale)}
        except ValueError:
            pass
    return {"path": text, "scale": 1.0}


def _speech_arguments(s: argparse.ArgumentParser) -> None:
    """Text to speech instead of audio (generate and submit)."""
    s.add_argument("--text", help="text for speaker 1 to say, instead of --audio (needs Kokoro-82M/)")
    s.add_argument("--text2", help="text for speaker 2 (with --voice2)")
    s.add_argument("--script", help="two-speaker dialogue '(s1) ... (s2) ...', instead of --audio")
    s.add_argument("--voice", help="Kokoro voice of speaker 1, e.g. af_heart")
    s.add_argument("--voice2", help="Kokoro voice of speaker 2, e.g. am_adam")
    s.add_argument("--speed", type=float, default=1.0, help="speaking rate of the synthesised speech")


def _add_make_tiny_weights(sub) -> None:
    s = sub.add_parser("make-tiny-weights", help="write a tiny random-weight checkpoint set (official layouts)")
    s.add_argument("dir")
    s.add_argument("--layout", choices=["official", "diffusers"], default="official")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-speech", dest="speech", action="store_false",
                   help="leave out the text-to-speech folder Kokoro-82M/ (about 230 MB)")
    s.set_defaults(fn=cmd_make_tiny)


def _add_check(sub) -> None:
    s = sub.add_parser("check", help="report which model components are present under a models root, "
                                     "whether they load, and (--plan) the memory each stage takes")
    s.add_argument("dir")
    s.add_argument("--no-verify", action="store_true",
                   help="only look for the files (skip running the loaders on the meta device)")
    s.add_argument("--plan", action="store_true",
                   help="print per stage the GPU and host memory at load and at the peak of a 480p and a 720p "
                        "81-frame two-speaker clip, and which option sets fit which card")
    s.add_argument("--gpu-memory", metavar="SIZE", help="the card to fit: 24GB, 40GB, 80GB, 141GB (binary GB)")
    s.add_argument("--quantize", choices=["int8", "fp8"], help="plan with int8/fp8 DiT blocks")
    s.add_argument("--low-vram", nargs="?", const=True, default=False, choices=["prefetch"], metavar="prefetch",
                   help="plan with the DiT blocks streamed from host RAM")
    s.add_argument("--batch-guidance", action="store_true", help="plan with the guidance passes batched")
    s.add_argument("--weights-only", action="store_true",
                   help="plan the weights only (instant; the activation estimates trace every stage: about a minute)")
    s.add_argument("--stage-dtype", action="append", default=[], metavar="STAGE=DTYPE",
                   help="plan with another dtype for a stage (dit, text, clip, vae, audio)")
    s.set_defaults(fn=cmd_check)


def _add_explore(sub) -> None:
    s = sub.add_parser("explore", help="list what a models volume holds")
    s.add_argument("dir")
    s.add_argument("--depth", type=int, default=3)
    s.set_defaults(fn=cmd_explore)


def _more_speakers(s) -> None:
    s.add_argument("--audio2", help="speaker 2's audio")
    s.add_argument("--audio3", help="speaker 3's audio (beyond the two speakers the model was trained on)")
    s.add_argument("--audio4", help="speaker 4's audio (likewise)")


def _add_generate(sub) -> None:
    s = sub.add_parser("generate", help="generate one video in this process")
    s.add_argument("--models", required=True)
    s.add_argument("--image", help="condition image (image-to-video)")
    s.add_argument("--video", help="source video to dub (video-to-video; InfiniteTalk)")
    s.add_argument("--model", choices=["multitalk", "infinitetalk"],
                   help="default: infinitetalk with --video, else multitalk")
    s.add_argument("--audio", help="speaker 1's audio (or --text/--script)")
    _more_speakers(s)
    _speech_arguments(s)
    s.add_argument("--speech-out", help="with --text/--script: also write the synthesised speech (WAV) here")
    s.add_argument("--audio-type", choices=["add", "para"], default="add")
    s.add_argument("--bbox", nargs="+", metavar="R0,C0,R1,C1",
                   help="per speaker, source pixels, rows first (default: from the faces in the image)")
    s.add_argument("--speaker-order", nargs="+", type=int, metavar="FACE",
                   help="without --bbox: which detected face (1 = leftmost) each speaker is, e.g. 2 1")
    s.add_argument("--scene-cuts", action="store_true",
                   help="with --video: split the source at its shot cuts, each chunk's reference from its own shot "
                        "(official --scene_seg)")
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
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda if this machine has a GPU)")
    s.add_argument("--dtype", default=None,
                   help="every stage's dtype (fp32, bf16, fp16); default: each stage's own, as the official runs "
                        "it on CUDA (DiT and UMT5 bf16, CLIP fp16, VAE and wav2vec2 fp32), fp32 on CPU")
    s.add_argument("--stage-dtype", action="append", default=[], metavar="STAGE=DTYPE",
                   help="one stage's dtype, over --dtype (repeatable): dit, text, clip, vae, audio; "
                        "e.g. --stage-dtype dit=bf16 --stage-dtype audio=fp32")
    s.add_argument("--allow-fp32-dit", action="store_true",
                   help="let the 14B DiT run in fp32 on a GPU (75.5 GB of weights; refused otherwise)")
    s.add_argument("--allow-no-lip-sync", action="store_true",
                   help="run a models folder without the MultiTalk adapter as plain WAN 2.1 I2V (refused otherwise)")
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


def _add_submit(sub) -> None:
    s = sub.add_parser("submit", help="submit a job to a running server")
    s.add_argument("--url", default="http://127.0.0.1:8000")
    s.add_argument("--image", help="condition image: a local file (uploaded) or a reference")
    s.add_argument("--video", help="source video to dub (an InfiniteTalk server): a local file or a reference")
    s.add_argument("--audio", help="speaker 1's audio: a local file (uploaded) or a reference (or --text/--script)")
    _more_speakers(s)
    _speech_arguments(s)
    s.add_argument("--prompt", default="")
    s.add_argument("--options", help="JSON object of extra job options (frames, steps, size, bbox ...)")
    s.add_argument("--wait", action="store_true")
    s.add_argument("--out")
    s.set_defaults(fn=cmd_submit)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="multitalk", description="MultiTalk Serve: audio-driven talking video")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = sub  # where the serving layer adds its own commands (deployments/cli.py)

    _add_make_tiny_weights(sub)
    _add_check(sub)
    _add_explore(sub)
    _add_generate(sub)
    _add_submit(sub)
    return p


def main(argv: list[str] | None = None, parser: argparse.ArgumentParser | None = None) -> int:
    args = (parser or build_parser()).parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
