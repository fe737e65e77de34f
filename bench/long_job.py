"""A long served streaming job at the real 480p frame size: what the ingress and the object
store hold, and what the ingress spends per frame, for N and 4N chunks, side by side for
two trees (this one and the commit before issue 21).

    .venv/bin/python bench/long_job.py [--chunks 2] [--before /work/ext-21/before] [--after .]

Each case is a fresh local Ray + Serve (``pipeline_graph.build_app`` of that tree: the
ingress and the stage deployments, a local store), with the tree first on the path. The
stages are the real ones on tiny weights except the DiT's and the VAE's math
(``bench/long_job_stand_ins.py``: the same shapes at a fraction of the CPU), so the chunks
carry real 480p frames (the ``multitalk-480`` bucket of a 16:9 image: 448x896; 81 frames
per chunk, 25 motion frames, colour correction on): 97.5 MB of uint8 or 390 MB of float32
frames per chunk. After a two-chunk warm-up job, the measured job runs while the bench
samples every 0.2 s:

* the ingress replica's RSS (its process, found by its Ray process title) and, separately,
  its ffmpeg children's;
* the object store's use (``memory_summary``: plasma bytes, and bytes spilled to disk);
* the ingress's CPU seconds (its own and its children's: the x264 runs) over the job;
* x264 passes: ffmpeg is wrapped (``IMAGEIO_FFMPEG_EXE``) so that every libx264 run also
  writes ``-progress``; frames encoded by all runs / frames of the video.

Prints one JSON line per case and the ratios: 4N/N peaks (goal: within 1.2x) and before/after
ingress CPU per frame (goal: at least 3x less).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
MOTION, FRAMES = 25, 81


def audio_seconds(chunks: int) -> float:
    """Speech for exactly ``chunks`` (at least 2) chunks of the streaming plan (81 frames, 25
    carried over): the plan ends with the first chunk reaching the audio's end."""
    if chunks < 2:
        raise ValueError("a streaming job has at least 2 chunks")
    return (FRAMES + (FRAMES - MOTION) * (chunks - 1) - 10) / 25


# --------------------------------------------------------------------------- one case (a subprocess)
class Sampler:
    """Samples the ingress process, its children and the object store until stopped."""

    def __init__(self, pid: int):
        import psutil

        self.process = psutil.Process(pid)
        self.peak_rss = self.peak_children_rss = 0
        self.peak_plasma = 0
        self.spilled = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def cpu(self) -> float:
        t = self.process.cpu_times()
        live = 0.0
        for child in self.process.children(recursive=True):
            try:
                c = child.cpu_times()
                live += c.user + c.system
            except Exception:  # noqa: BLE001 - it ended meanwhile (then counted in children_*)
                pass
        return t.user + t.system + t.children_user + t.children_system + live

    @staticmethod
    def object_store() -> tuple[int, int]:
        import ray
        from ray._private.internal_api import memory_summary

        text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
        used = re.search(r"Plasma memory usage (\d+) MiB", text)
        spilled = re.search(r"Spilled (\d+) MiB", text)
        return (int(used.group(1)) if used else 0), (int(spilled.group(1)) if spilled else 0)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
                children = sum(c.memory_info().rss for c in self.process.children(recursive=True))
                self.peak_children_rss = max(self.peak_children_rss, children)
                used, spilled = self.object_store()
                self.peak_plasma, self.spilled = max(self.peak_plasma, used), spilled
            except Exception:  # noqa: BLE001 - a child vanished between listing and reading
                pass
            self._stop.wait(0.2)

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def ingress_pid() -> int:
    """The ingress replica of the Ray this process started (its processes descend from this one)."""
    import psutil

    for p in psutil.Process().children(recursive=True):
        try:
            if any("MultiTalkIngress" in part for part in p.cmdline()):
                return p.pid
        except psutil.Error:
            continue
    raise RuntimeError("no ingress replica process found")


def run_job(url: str, body: dict, timeout: float = 3600) -> dict:
    import requests

    answer = requests.post(f"{url}/v1/jobs", json=body, timeout=60).json()
    if "id" not in answer:
        raise RuntimeError(f"job refused: {answer}")
    job_id = answer["id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = requests.get(f"{url}/v1/jobs/{job_id}", timeout=60).json()
        if status["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
            return status
        time.sleep(1.0)
    raise TimeoutError(f"job {job_id} did not finish")


def x264_frames(folder: str) -> list[int]:
    """Frames each libx264 run encoded (the last ``frame=`` of its ``-progress`` file)."""
    counts = []
    for path in glob.glob(os.path.join(folder, "x264-*.txt")):
        found = re.findall(r"^frame=(\d+)", Path(path).read_text(), flags=re.MULTILINE)
        counts.append(int(found[-1]) if found else 0)
    return counts


def case(tree: str, chunks: int, work: str) -> dict:
    """One tree, one job length, in this (fresh) process."""
    import ray
    from ray import serve

    sys.path[:0] = [tree, str(HERE)]
    import deployments

    assert deployments.__file__.startswith(tree), (deployments.__file__, tree)
    from bench.synthetic import noise_png, speech_wav  # noqa: E402  (this tree's copy)
    from multitalk.checkpoints.tiny import ensure_tiny_weights
    from pipeline_graph import build_app

    store = Path(work) / "store"
    store.mkdir(parents=True, exist_ok=True)
    (store / "face.png").write_bytes(noise_png(480, 832))
    (store / "speech.wav").write_bytes(speech_wav(audio_seconds(chunks)))
    (store / "warmup.wav").write_bytes(speech_wav(audio_seconds(2)))
    models = ensure_tiny_weights(os.path.join(work, "..", "tiny-cache"))
    progress = Path(work) / "x264"
    progress.mkdir(exist_ok=True)
    ray.init(num_cpus=4, object_store_memory=3 << 30, include_dashboard=False, log_to_driver=False)
    port = 8000 + (os.getpid() % 1000)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    names = {"audio": None, "text": None, "image": "ImageStage", "diffusion": "DiffusionStage",
             "decode": "DecodeStage"}
    app = build_app({
        "models_root": str(models), "device": "cpu", "dtype": "float32",
        "stage_classes": {k: f"long_job_stand_ins:{v}" for k, v in names.items() if v},
        "store": {"local_root": str(store)},
        "ingress": {"persist_interval_s": 1.0, "limits": {"max_audio_seconds": 900}},
    })
    serve.run(app, name="multitalk", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    body = {"image": "face.png", "audio": ["warmup.wav"], "prompt": "a person talks", "mode": "streaming",
            "frames": FRAMES, "motion_frames": MOTION, "size": "multitalk-480", "color_correction": 1.0,
            "sampling": {"steps": 2, "text_scale": 1.0, "audio_scale": 2.0}}
    try:
        warm = run_job(url, body)
        assert warm["state"] == "COMPLETED", warm
        for old in glob.glob(str(progress / "*.txt")):
            os.unlink(old)
        time.sleep(2.0)
        pid = ingress_pid()
        sampler = Sampler(pid)
        rss_before = sampler.process.memory_info().rss
        plasma_before, _ = sampler.object_store()
        cpu_before = sampler.cpu()
        sampler.start()
        t0 = time.monotonic()
        status = run_job(url, {**body, "audio": ["speech.wav"]})
        seconds = time.monotonic() - t0
        time.sleep(1.0)  # the last ffmpeg children reaped
        cpu = sampler.cpu() - cpu_before
        sampler.stop()
        assert status["state"] == "COMPLETED", status
        frames = status["result"]["frames"]
        encoded = x264_frames(str(progress))
        return dict(
            tree=tree, chunks=status["result"]["chunks"], frames=frames,
            size=f"{status['result']['width']}x{status['result']['height']}", seconds=round(seconds, 1),
            ingress_rss_before_mb=round(rss_before / 2**20), ingress_peak_rss_mb=round(sampler.peak_rss / 2**20),
            ingress_growth_mb=round((sampler.peak_rss - rss_before) / 2**20),
            ffmpeg_peak_rss_mb=round(sampler.peak_children_rss / 2**20),
            plasma_before_mb=plasma_before, plasma_peak_mb=sampler.peak_plasma,
            plasma_held_mb=sampler.peak_plasma - plasma_before, spilled_mb=sampler.spilled,
            ingress_cpu_s=round(cpu, 1), ingress_cpu_ms_per_frame=round(1000 * cpu / frames, 1),
            x264_runs=len(encoded), x264_passes_per_frame=round(sum(encoded) / frames, 3),
            timings=status["timings"],
        )
    finally:
        serve.shutdown()
        ray.shutdown()


# --------------------------------------------------------------------------- the comparison
def wrapper(folder: str) -> str:
    """An ffmpeg that also writes ``-progress`` for every libx264 run."""
    import imageio_ffmpeg

    real = imageio_ffmpeg.get_ffmpeg_exe()
    script = os.path.join(folder, "ffmpeg")
    with open(script, "w") as handle:
        handle.write("#!/bin/sh\n"
                     f"case \"$*\" in *libx264*) exec '{real}' -progress \"$X264_PROGRESS/x264-$$.txt\" \"$@\" ;; esac\n"
                     f"exec '{real}' \"$@\"\n")
    os.chmod(script, 0o755)
    return script


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=2, help="N >= 2: the short job's chunks (the long one has 4N)")
    ap.add_argument("--before", default="/work/ext-21/before", help="checkout of the commit before issue 21")
    ap.add_argument("--after", default=str(HERE.parent))
    ap.add_argument("--trees", default="before,after", help="which of the two to run")
    ap.add_argument("--case", nargs=3, metavar=("TREE", "CHUNKS", "WORK"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print("RESULT " + json.dumps(case(args.case[0], int(args.case[1]), args.case[2])), flush=True)
        return
    root = tempfile.mkdtemp(prefix="long-job-")
    results = {}
    for name, tree in (("before", args.before), ("after", args.after)):
        if name not in args.trees.split(","):
            continue
        for chunks in (args.chunks, 4 * args.chunks):
            work = os.path.join(root, f"{name}-{chunks}")
            os.makedirs(work)
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(tree), str(HERE)]),
                   "RAY_raylet_start_wait_time_s": "300",  # a loaded machine starts a raylet slowly
                   "IMAGEIO_FFMPEG_EXE": wrapper(work), "X264_PROGRESS": os.path.join(work, "x264")}
            for attempt in range(3):  # a loaded machine may still time Ray's start-up out
                # Run from the tree: Ray's workers put the driver's directory first on their path.
                done = subprocess.run([sys.executable, os.path.abspath(__file__), "--case", os.path.abspath(tree),
                                       str(chunks), work], env=env, capture_output=True, text=True, cwd=tree)
                line = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
                if line or "timed out during startup" not in done.stderr:
                    break
            if not line:
                sys.exit(f"{name} {chunks} chunks failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
            results[(name, chunks)] = json.loads(line[0][7:])
            print(json.dumps({"case": f"{name} {chunks}", **results[(name, chunks)]}), flush=True)
    n, n4 = args.chunks, 4 * args.chunks
    if len(results) < 4:
        return
    print("\nratios (4N / N; before / after):")
    for name in ("before", "after"):
        a, b = results[(name, n)], results[(name, n4)]
        print(f"  {name}: ingress peak RSS {b['ingress_peak_rss_mb'] / a['ingress_peak_rss_mb']:.2f}x, "
              f"object store held {b['plasma_held_mb'] / max(1, a['plasma_held_mb']):.2f}x "
              f"(spilled {a['spilled_mb']} / {b['spilled_mb']} MiB)")
    for chunks in (n, n4):
        a, b = results[("before", chunks)], results[("after", chunks)]
        print(f"  {chunks} chunks: ingress CPU per frame {a['ingress_cpu_ms_per_frame']} -> "
              f"{b['ingress_cpu_ms_per_frame']} ms ({a['ingress_cpu_ms_per_frame'] / b['ingress_cpu_ms_per_frame']:.1f}x less), "
              f"x264 passes per frame {a['x264_passes_per_frame']} -> {b['x264_passes_per_frame']}")


if __name__ == "__main__":
    main()
