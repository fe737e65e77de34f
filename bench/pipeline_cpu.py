"""CPU pipeline bench on tiny weights.

Prints (1) the per-stage time breakdown of one tiny clip and (2) the time and peak-RSS
ratios of a 3-chunk streaming video to a 1-chunk clip, measured side by side in this run
(each case in a fresh child process so its peak RSS is its own).

    .venv/bin/python bench/pipeline_cpu.py [--steps 4] [--frames 17] [--size multitalk-128]

Goals (issue 3): streaming time ≈ 3× the single chunk, peak memory ≤ 1.3×.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.fresh_process import run_in_fresh_process, timed_generation  # noqa: E402
from bench.synthetic import noise_png, speech_wav  # noqa: E402


def _run(case: dict, models: str, queue) -> None:
    import torch

    torch.set_num_threads(2)
    from multitalk.api import GenerationRequest, SamplingOptions
    from multitalk.pipeline import MultiTalkPipeline

    pipe = MultiTalkPipeline.from_pretrained(models)
    # Warm-up (first-call costs of torch, ffmpeg, the thread pool) so both cases time steady state.
    pipe.generate(GenerationRequest(image=noise_png(), audio=[speech_wav(2.0)], size=case["size"], frames=17,
                                    sampling=SamplingOptions(steps=1)))
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    req = GenerationRequest(
        image=noise_png(), audio=[speech_wav(case["seconds"])], prompt="a person talks", size=case["size"],
        frames=case["frames"], mode=case["mode"], motion_frames=5, color_correction=1.0,
        sampling=SamplingOptions(steps=case["steps"]),
    )
    queue.put(timed_generation(pipe, req, base_rss))


def measure(case: dict, models: str) -> dict:
    return run_in_fresh_process(_run, case, models)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", default="multitalk-128")
    args = ap.parse_args()
    from multitalk.checkpoints.tiny import make_tiny_weights

    models = str(make_tiny_weights(tempfile.mkdtemp(prefix="bench-tiny-"), "official"))
    f = args.frames
    motion = 5
    # Audio long enough for exactly 1 chunk (clip) and 3 chunks (streaming: ends at 2*(f-motion) + f).
    three_chunk_frames = 2 * (f - motion) + f - 2
    single = dict(mode="clip", frames=f, seconds=(f + 4) / 25, steps=args.steps, size=args.size)
    stream = dict(mode="streaming", frames=f, seconds=three_chunk_frames / 25, steps=args.steps, size=args.size)
    a = measure(single, models)
    b = measure(stream, models)
    print(json.dumps({"single_chunk": a, "streaming": b}, indent=2))
    print(f"\nstage breakdown, one {f}-frame clip at {args.size}, {args.steps} steps (seconds):")
    for k, v in a["timings"].items():
        print(f"  {k:>16}: {v:8.3f}")
    print(f"\nstreaming chunks: {b['chunks']} (frames {b['frames']}) vs clip chunks: {a['chunks']}")
    print(f"time ratio streaming/single:      {b['seconds'] / a['seconds']:.2f}  (goal ~{b['chunks']})")
    print(f"peak RSS ratio streaming/single:  {b['peak_rss_mb'] / a['peak_rss_mb']:.3f}  (goal <= 1.3)")


if __name__ == "__main__":
    main()
