"""Serving overhead bench: the same tiny job in-process and through Ray Serve over HTTP.

Measured side by side in one run, on the same tiny random weights and inputs:

1. latency of one job in-process (``MultiTalkPipeline.generate``) vs through the served
   application (``POST /runsync``, local store, ``pipeline_graph.build_app``): median of
   ``--repeats`` runs each, after a warm-up. Goal: served/in-process <= 1.10.
2. throughput of ``--jobs`` concurrent jobs vs the same number run one after another
   through the service (ingress ``max_concurrent_jobs`` = ``--jobs``). Goal: >= 1.3 on 2 cores.

    .venv/bin/python bench/serve_overhead.py [--steps 4] [--frames 17] [--size multitalk-128]

Both sides use the same torch thread count per computation (``--threads``, default 1, what
the CPU config's replicas pin themselves to: their CPU share rounded up); the served
replicas get it through ``OMP_NUM_THREADS``. With more threads per replica than cores,
concurrent jobs oversubscribe the CPU (see docs/BENCHMARKS.md).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.synthetic import noise_png, speech_wav  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def in_process(models: str, image: bytes, audio: bytes, args) -> list[float]:
    import torch

    torch.set_num_threads(args.threads)
    from multitalk.api import GenerationRequest, SamplingOptions
    from multitalk.pipeline import MultiTalkPipeline

    pipe = MultiTalkPipeline.from_pretrained(models)
    req = GenerationRequest(image=image, audio=[audio], prompt="a person talks", size=args.size,
                            frames=args.frames, sampling=SamplingOptions(steps=args.steps, seed=1))
    pipe.generate(req)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        result = pipe.generate(req)
        times.append(time.perf_counter() - t0)
    assert result.video[4:8] == b"ftyp"
    del pipe
    return times, result.timings


def served(models: str, image: bytes, audio: bytes, args) -> dict:
    import ray
    import requests
    from ray import serve

    from pipeline_graph import build_app

    store = Path(tempfile.mkdtemp(prefix="bench-serve-store-"))
    (store / "in.wav").write_bytes(audio)
    (store / "in.png").write_bytes(image)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    port = _free_port()
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False,
             namespace="bench-serve")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    app = build_app({
        "models_root": models, "device": "cpu", "dtype": "float32",
        "store": {"local_root": str(store)},
        "ingress": {"max_concurrent_jobs": args.jobs, "max_queued_jobs": 4 * args.jobs,
                    "runsync_timeout_s": 600, "persist_interval_s": 1.0},
    })
    serve.run(app, name="multitalk", route_prefix="/")
    body = {"input": {"action": "generate", "audio_1": "in.wav", "condition_image": "in.png",
                      "prompt": "a person talks", "frames": args.frames, "size": args.size,
                      "sample_steps": args.steps, "seed": 1, "output_format": "s3"}}

    stage_timings: list[dict] = []

    def one() -> float:
        t0 = time.perf_counter()
        r = requests.post(f"{url}/runsync", json=body, timeout=900)
        elapsed = time.perf_counter() - t0
        assert r.status_code == 200 and r.json()["status"] == "COMPLETED", r.text
        stage_timings.append(r.json()["output"].get("timings") or {})
        return elapsed

    try:
        one()  # warm-up: loads every stage, first-call costs
        latencies = [one() for _ in range(args.repeats)]
        served_timings = stage_timings[-1]
        t0 = time.perf_counter()
        for _ in range(args.jobs):
            one()
        sequential = time.perf_counter() - t0
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(args.jobs) as pool:
            concurrent = list(pool.map(lambda _: one(), range(args.jobs)))
        concurrent_wall = time.perf_counter() - t0
    finally:
        serve.shutdown()
        ray.shutdown()
    return {"latencies": latencies, "sequential_s": sequential, "concurrent_s": concurrent_wall,
            "concurrent_job_latencies": concurrent,
            "timings": served_timings}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--size", default="multitalk-128")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--jobs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads in-process and per served replica (OMP_NUM_THREADS)")
    args = ap.parse_args()
    from multitalk.checkpoints.tiny import make_tiny_weights

    models = str(make_tiny_weights(tempfile.mkdtemp(prefix="bench-tiny-"), "official"))
    image, audio = noise_png(), speech_wav((args.frames + 4) / 25)

    local, local_timings = in_process(models, image, audio, args)  # before Ray starts: a plain process
    srv = served(models, image, audio, args)

    local_med = statistics.median(local)
    served_med = statistics.median(srv["latencies"])
    ratio = served_med / local_med
    throughput = srv["sequential_s"] / srv["concurrent_s"]
    print(json.dumps({
        "config": {"steps": args.steps, "frames": args.frames, "size": args.size, "threads": args.threads,
                   "cpus": os.cpu_count(), "repeats": args.repeats, "jobs": args.jobs},
        "in_process_s": [round(t, 3) for t in local],
        "served_s": [round(t, 3) for t in srv["latencies"]],
        "sequential_jobs_s": round(srv["sequential_s"], 3),
        "concurrent_jobs_s": round(srv["concurrent_s"], 3),
        "concurrent_job_latencies_s": [round(t, 3) for t in srv["concurrent_job_latencies"]],
    }, indent=2))
    print("\nstage timings of the last timed job (seconds):  in-process | served")
    for k in sorted(set(local_timings) | set(srv["timings"])):
        a, b = local_timings.get(k), srv["timings"].get(k)
        fa = f"{a:8.3f}" if isinstance(a, (int, float)) else f"{'-':>8}"
        fb = f"{b:8.3f}" if isinstance(b, (int, float)) else f"{'-':>8}"
        print(f"  {k:>16}: {fa} | {fb}")
    print(f"\none job, median of {args.repeats}: in-process {local_med:.3f} s, served (HTTP /runsync) {served_med:.3f} s")
    print(f"served/in-process latency ratio:           {ratio:.3f}  (goal <= 1.10) {'OK' if ratio <= 1.10 else 'MISSED'}")
    print(f"{args.jobs} concurrent vs {args.jobs} sequential (served):  {srv['concurrent_s']:.2f} s vs "
          f"{srv['sequential_s']:.2f} s")
    print(f"throughput ratio concurrent/sequential:    {throughput:.3f}  (goal >= 1.3) "
          f"{'OK' if throughput >= 1.3 else 'MISSED'}")


if __name__ == "__main__":
    main()
