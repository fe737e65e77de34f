"""InfiniteTalk video-to-video on tiny weights (CPU): a 10-chunk dub against a 2-chunk one.

Each case runs in a fresh child process (so its peak RSS is its own) after a warm-up job;
only the generation is timed. The source video (synthetic, ffmpeg's ``testsrc2``) is as long
as the audio, so every chunk decodes its own reference frame.

    .venv/bin/python bench/infinitetalk_cpu.py [--steps 2] [--frames 33] [--motion 9] [--size infinitetalk-128] [--repeats 2]

With ``--repeats N`` the two cases alternate N times: the fastest time and the highest peak
RSS of each case are reported (a shared machine's load moves single runs a lot).

Goals (issue 15): time ratio ≈ 5 (10 chunks / 2), peak RSS ratio ≤ 1.3 (memory flat with length).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fresh_process import run_in_fresh_process, timed_generation  # noqa: E402
from bench.synthetic import speech_wav  # noqa: E402


def source_video(seconds: float, size: int = 256) -> bytes:
    """A synthetic 25 fps H.264 video (moving test pattern) of ``seconds``."""
    import imageio_ffmpeg

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "src.mp4"
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-f", "lavfi", "-i",
                        f"testsrc2=size={size}x{size}:rate=25:duration={seconds:.2f}", "-c:v", "libx264",
                        "-pix_fmt", "yuv420p", str(out)], check=True)
        return out.read_bytes()


def _run(case: dict, models: str, queue) -> None:
    import torch

    torch.set_num_threads(2)
    from multitalk.api import SamplingOptions
    from multitalk.infinitetalk import infinitetalk_request
    from multitalk.pipeline import MultiTalkPipeline

    pipe = MultiTalkPipeline.from_pretrained(models, model="infinitetalk")
    options = dict(size=case["size"], frames=case["frames"], motion_frames=case["motion"])
    warm = (case["frames"] + 4) / 25
    pipe.generate(infinitetalk_request([speech_wav(warm)], video=source_video(warm), mode="clip",
                                       sampling=SamplingOptions(steps=1), **options))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    request = infinitetalk_request([speech_wav(case["seconds"])], video=source_video(case["seconds"]),
                                   prompt="a person talks", sampling=SamplingOptions(steps=case["steps"]), **options)
    queue.put(timed_generation(pipe, request, base_rss))


def measure(case: dict, models: str) -> dict:
    return run_in_fresh_process(_run, case, models)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--frames", type=int, default=33)
    ap.add_argument("--motion", type=int, default=9)
    ap.add_argument("--size", default="infinitetalk-128")
    ap.add_argument("--chunks", type=int, nargs=2, default=[2, 10])
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    from multitalk.checkpoints.tiny import make_tiny_weights

    models = str(make_tiny_weights(tempfile.mkdtemp(prefix="bench-tiny-"), "official"))
    step = args.frames - args.motion

    def case(chunks: int) -> dict:  # audio whose last chunk is chunk ``chunks`` (2 frames short of its end)
        frames = args.frames + (chunks - 1) * step - 2
        return dict(seconds=frames / 25, frames=args.frames, motion=args.motion, steps=args.steps, size=args.size)

    runs = {n: [] for n in args.chunks}
    for _ in range(args.repeats):
        for n in args.chunks:
            runs[n].append(measure(case(n), models))
    short, long = ({**min(runs[n], key=lambda r: r["seconds"]), "all_seconds": [r["seconds"] for r in runs[n]],
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[n])} for n in args.chunks)
    print(json.dumps({"short": short, "long": long}, indent=2))
    print(f"\nchunks {long['chunks']} (frames {long['frames']}) vs {short['chunks']} (frames {short['frames']}), "
          f"{args.frames}-frame chunks, {args.motion} motion frames, {args.size}, {args.steps} steps")
    print(f"time ratio long/short:      {long['seconds'] / short['seconds']:.2f}  "
          f"(goal ~{long['chunks'] / short['chunks']:.0f})")
    print(f"peak RSS ratio long/short:  {long['peak_rss_mb'] / short['peak_rss_mb']:.3f}  (goal <= 1.3)")


if __name__ == "__main__":
    main()
