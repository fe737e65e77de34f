"""Time to the first playable chunk vs time to the whole video, for a 5-chunk streaming job.

    .venv/bin/python bench/first_chunk.py [--chunks 5 --frames 17 --motion 5 --steps 4 --size multitalk-128]

In-process on tiny weights (CPU). The job runs with ``on_chunk`` (the driver's per-chunk
fMP4 segments, :mod:`multitalk.utils.segments`): for each segment the bench records when
it was handed over and checks that init + the segments so far decode (imageio-ffmpeg) to
the frames so far. The same job then runs without ``on_chunk``, to show what the second
(zerolatency) encode costs, and the two files' sizes are compared.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.synthetic import noise_png, speech_wav  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=5)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--motion", type=int, default=5)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--size", default="multitalk-128")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from multitalk.api import GenerationRequest, SamplingOptions
    from multitalk.checkpoints.tiny import make_tiny_weights
    from multitalk.pipeline import MultiTalkPipeline
    from multitalk.utils.video import probe_mp4

    models = make_tiny_weights(tempfile.mkdtemp(prefix="bench-tiny-"), "official")
    pipe = MultiTalkPipeline.from_pretrained(str(models))
    pipe.generate(GenerationRequest(image=noise_png(), audio=[speech_wav(1.0)], size=args.size, frames=17,
                                    sampling=SamplingOptions(steps=1)))  # warm-up
    video_frames = args.frames + (args.frames - args.motion) * (args.chunks - 1)
    request = GenerationRequest(
        image=noise_png(), audio=[speech_wav(video_frames / 25 + 2.0)], prompt="a person talks", size=args.size,
        mode="streaming", frames=args.frames, motion_frames=args.motion, max_frames=video_frames,
        color_correction=1.0, sampling=SamplingOptions(steps=args.steps),
    )
    handed: list[dict] = []
    received: list = []
    started = 0.0

    async def on_chunk(segment) -> None:
        at = time.perf_counter() - started
        received.append(segment)
        so_far = segment.init + b"".join(s.data for s in received)
        decoded = (await asyncio.to_thread(probe_mp4, so_far))["num_frames"]
        decoded_at = time.perf_counter() - started
        handed.append(dict(chunk=segment.index, handed_s=round(at, 3), decoded_s=round(decoded_at, 3),
                           frames_so_far=segment.frames_so_far, decoded_frames=decoded))

    started = time.perf_counter()
    result = asyncio.run(pipe.agenerate(request, on_chunk=on_chunk))
    total = time.perf_counter() - started
    t0 = time.perf_counter()
    plain = pipe.generate(request)
    total_plain = time.perf_counter() - t0
    fmp4_bytes = len(received[0].init) + sum(len(s.data) for s in received)
    report = dict(
        chunks=result.chunks, frames=result.num_frames, size=f"{result.width}x{result.height}", steps=args.steps,
        first_playable_s=handed[0]["handed_s"], first_decoded_s=handed[0]["decoded_s"], whole_video_s=round(total, 3),
        first_over_whole=round(handed[0]["handed_s"] / total, 3), whole_without_segments_s=round(total_plain, 3),
        segments=handed, mp4_bytes=len(result.video), fmp4_bytes=fmp4_bytes,
        fmp4_over_mp4=round(fmp4_bytes / len(result.video), 3), same_mp4_as_without=result.video == plain.video,
        timings=result.timings,
    )
    print(json.dumps(report, indent=1))
    print(f"\nfirst playable chunk after {report['first_playable_s']:.2f} s; whole video after {total:.2f} s "
          f"({100 * report['first_over_whole']:.0f} %); without segments {total_plain:.2f} s")


if __name__ == "__main__":
    main()
