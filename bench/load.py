"""Bounded load test of the served CPU application (tiny random weights) on loopback.

Starts a local Ray + Serve with ``pipeline_graph.build_app`` (the real stages and driver on
tiny weights, local store), then submits ``--jobs`` tiny jobs from ``--concurrency`` client
threads (``POST /v1/jobs``, one ``Idempotency-Key`` per submission). 429/503 answers carry
``Retry-After``: they are counted as *rejected* (not lost) and the client submits again
after that delay (capped by ``--max-retry-sleep``). Then every accepted job is followed to
the end. Prints (and with ``--json`` writes) the counts

    submitted / completed / failed / lost / duplicated / rejected (429/503 answers)

and the RSS of every Ray worker process of the app (the ingress and the stage replicas),
sampled with psutil at the start (after a warm-up job) and during the run: the peak
growth ratio per process and overall. Goals: 0 lost, 0 duplicated, RSS growth <= 1.2x.

    .venv/bin/python bench/load.py [--jobs 200] [--concurrency 20] [--size multitalk-32]

*lost*: accepted (202) but never reached a final state, or its record is missing from
the store. *duplicated*: one submission that produced two jobs (two ids for one
Idempotency-Key), or more job records in the store than accepted submissions.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

try:
    import psutil
except ImportError:  # Ray ships a copy
    import ray

    sys.path.insert(0, str(Path(ray.__file__).parent / "thirdparty_files"))
    import psutil


def _speech(seconds: float) -> bytes:
    import soundfile as sf

    t = np.arange(int(seconds * 16000)) / 16000
    signal = 0.2 * np.sin(2 * np.pi * 180 * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 4 * t))
    buf = io.BytesIO()
    sf.write(buf, signal.astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def _image() -> bytes:
    from PIL import Image

    img = Image.fromarray((np.random.default_rng(1).random((96, 128, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_processes(app_name: str) -> dict[str, psutil.Process]:
    """The Ray worker processes of the app's replicas (ingress + stages), by deployment.

    Found among the children of *this* Ray session's raylet (other Ray instances on the
    machine are ignored) by their process title ``ray::ServeReplica:<app>:<deployment>``."""
    import ray._private.worker as worker

    raylet = worker._global_node.all_processes["raylet"][0].process.pid
    out = {}
    for proc in psutil.Process(raylet).children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        marker = f"ServeReplica:{app_name}:"
        if marker in title:
            name = title.split(marker, 1)[1].split()[0].split(".")[0]
            out[name] = proc
    return out


class RssSampler(threading.Thread):
    def __init__(self, procs: dict[str, psutil.Process], interval: float = 0.5):
        super().__init__(daemon=True)
        self.procs, self.interval = procs, interval
        self.start_rss = {n: p.memory_info().rss for n, p in procs.items()}
        self.start_cpu = {n: sum(p.cpu_times()[:2]) for n, p in procs.items()}
        self.cpu_s: dict[str, float] = {}
        self.peak = dict(self.start_rss)
        self.stop_event = threading.Event()

    def run(self):
        while not self.stop_event.wait(self.interval):
            self._sample_cpu()
            for n, p in self.procs.items():
                try:
                    self.peak[n] = max(self.peak[n], p.memory_info().rss)
                except psutil.NoSuchProcess:
                    self.peak[n] = -1  # replica died: reported, not hidden

    def _sample_cpu(self) -> None:
        for n, p in self.procs.items():
            try:
                self.cpu_s[n] = sum(p.cpu_times()[:2]) - self.start_cpu[n]
            except psutil.NoSuchProcess:
                pass

    def report(self) -> dict:
        self._sample_cpu()
        per = {n: {"start_mb": round(self.start_rss[n] / 2**20, 1), "peak_mb": round(self.peak[n] / 2**20, 1),
                   "growth": round(self.peak[n] / self.start_rss[n], 3), "cpu_s": round(self.cpu_s.get(n, 0.0), 1)}
               for n in self.procs}
        return {"per_process": per, "max_growth": max((v["growth"] for v in per.values()), default=None)}


def run_load(url: str, args, store_dir: Path) -> dict:
    import requests

    body = {"image": "in.png", "audio": ["in.wav"], "prompt": "a person talks", "frames": args.frames,
            "size": args.size, "sampling": {"steps": args.steps}}
    lock = threading.Lock()
    ids_by_key: dict[str, set] = {}
    rejected = {"429": 0, "503": 0}
    errors: list[str] = []
    session_local = threading.local()

    def session():
        if not hasattr(session_local, "s"):
            session_local.s = requests.Session()
        return session_local.s

    def submit(i: int) -> None:
        key = f"load-{args.run_id}-{i}"
        while True:
            try:
                r = session().post(f"{url}/v1/jobs", json={**body, "prompt": f"a person talks {i}"},
                                   headers={"Idempotency-Key": key}, timeout=120)
            except requests.RequestException as e:  # retry with the same key: no duplicate
                with lock:
                    errors.append(f"{type(e).__name__}")
                time.sleep(1.0)
                continue
            if r.status_code in (429, 503):
                retry_after = float(r.headers.get("Retry-After", "1"))
                with lock:
                    rejected[str(r.status_code)] += 1
                time.sleep(min(retry_after, args.max_retry_sleep))
                continue
            if r.status_code != 202:
                with lock:
                    errors.append(f"{r.status_code} {r.text[:200]}")
                return
            with lock:
                ids_by_key.setdefault(key, set()).add(r.json()["id"])
            return

    t0 = time.monotonic()
    with cf.ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(submit, range(args.jobs)))
    submit_s = time.monotonic() - t0

    ids = sorted({j for s in ids_by_key.values() for j in s})
    final: dict[str, str] = {}
    deadline = time.monotonic() + args.finish_timeout
    while len(final) < len(ids) and time.monotonic() < deadline:
        for j in ids:
            if j in final:
                continue
            r = requests.get(f"{url}/v1/jobs/{j}", timeout=30)
            if r.status_code == 200 and r.json()["state"] in ("COMPLETED", "FAILED", "CANCELLED"):
                final[j] = r.json()["state"]
        time.sleep(0.5)
    total_s = time.monotonic() - t0

    records = [p.stem for p in (store_dir / "jobs").glob("*.json")]
    gen_records = [r for r in records if json.loads((store_dir / "jobs" / f"{r}.json").read_text())
                   .get("action") == "generate"]
    lost = [j for j in ids if j not in final or not (store_dir / "jobs" / f"{j}.json").is_file()]
    dup_keys = [k for k, s in ids_by_key.items() if len(s) > 1]
    extra_records = max(0, len(gen_records) - 1 - len(ids))  # minus the warm-up job
    return {
        "submissions": args.jobs,
        "submitted": len(ids),
        "completed": sum(1 for s in final.values() if s == "COMPLETED"),
        "failed": sum(1 for s in final.values() if s != "COMPLETED"),
        "lost": len(lost),
        "duplicated": len(dup_keys) + extra_records,
        "rejected_429": rejected["429"],
        "rejected_503": rejected["503"],
        "client_errors": errors[:10],
        "submit_phase_s": round(submit_s, 1),
        "total_s": round(total_s, 1),
        "jobs_per_s": round(len(final) / total_s, 3) if total_s else None,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200, help="submissions")
    ap.add_argument("--concurrency", type=int, default=20, help="client threads")
    ap.add_argument("--size", default="multitalk-32")
    ap.add_argument("--frames", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--max-concurrent-jobs", type=int, default=2)
    ap.add_argument("--max-queued-jobs", type=int, default=8)
    ap.add_argument("--retry-after", type=int, default=1, help="ingress retry_after_s")
    ap.add_argument("--max-retry-sleep", type=float, default=2.0)
    ap.add_argument("--finish-timeout", type=float, default=600.0)
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    args.run_id = f"{os.getpid()}-{int(time.time())}"

    import ray
    import requests
    from ray import serve

    from multitalk.checkpoints.tiny import make_tiny_weights
    from pipeline_graph import build_app

    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    models = str(make_tiny_weights(work / "weights", "official"))
    store = work / "store"
    store.mkdir()
    (store / "in.wav").write_bytes(_speech((args.frames + 8) / 25))
    (store / "in.png").write_bytes(_image())
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    port = _free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, namespace="bench-load")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    app_name = "multitalk"
    serve.run(build_app({
        "models_root": models, "device": "cpu", "dtype": "float32", "store": {"local_root": str(store)},
        "ingress": {"max_concurrent_jobs": args.max_concurrent_jobs, "max_queued_jobs": args.max_queued_jobs,
                    "retry_after_s": args.retry_after, "persist_interval_s": 1.0, "runsync_timeout_s": 600},
    }), name=app_name, route_prefix="/")
    try:
        t0 = time.monotonic()
        warm = requests.post(f"{url}/runsync", timeout=600, json={"input": {
            "action": "generate", "audio_1": "in.wav", "condition_image": "in.png", "frames": args.frames,
            "size": args.size, "sample_steps": args.steps}}).json()
        assert warm["status"] == "COMPLETED", warm
        warm_s = time.monotonic() - t0
        procs = app_processes(app_name)
        sampler = RssSampler(procs)
        sampler.start()
        result = run_load(url, args, store)
        sampler.stop_event.set()
        sampler.join()
        rss = sampler.report()
    finally:
        serve.shutdown()
        ray.shutdown()
    out = {"config": {k: v for k, v in vars(args).items() if k != "json"}, "cpus": os.cpu_count(),
           "warmup_job_s": round(warm_s, 1), **result, "rss": rss}
    out["goals"] = {"lost == 0": result["lost"] == 0, "duplicated == 0": result["duplicated"] == 0,
                    "rss growth <= 1.2": rss["max_growth"] is not None and rss["max_growth"] <= 1.2}
    print(json.dumps(out, indent=2))
    print(f"submitted {result['submitted']} / completed {result['completed']} / failed {result['failed']} / "
          f"lost {result['lost']} / duplicated {result['duplicated']} / rejected 429 {result['rejected_429']} "
          f"503 {result['rejected_503']} / peak RSS growth {rss['max_growth']}x over {len(rss['per_process'])} "
          f"processes")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
