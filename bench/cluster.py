"""The cluster drills and their figures, on Ray's multi-node harness (one machine).

Deploys serve_config.yaml + the CPU overlay (``tests/cluster_harness.py``) on several real
raylets with cluster.yaml's node types scaled down, with Ray's DEFAULT health checks (as in
production; ``--fast-health-checks`` for a quick look) and the production lease (60 s):

``autoscale``: the real autoscaler (``fake_multinode``) and weights from ``s3://`` (a moto
server over HTTP, mirrored per node by boto3's transfer manager). A burst of jobs: Diffusion
replicas and GPU nodes over time, the time to scale up (scale decision, node, replica) and
down (replicas back to min_replicas, the idle node removed), and the cold start of the new
Diffusion replica on the new node (scale decision -> node -> replica process -> weights
mirrored -> loaded -> first sampling call), with the estimate for the 14B set. The mirror
is deleted before the burst: on one machine the nodes share a disk, and the new node must
start from an empty one.

``kill``: static nodes (``Cluster.add_node``), three drills, each a burst with jobs in
flight when the node dies (SIGKILL of the whole node, ``remove_node(allow_graceful=False)``):
the GPU node of the Diffusion replica; the node of an ingress replica (its running jobs
taken over by the other); the node of a sequence-parallel Diffusion replica (two ranks in a
STRICT_PACK placement group). Per drill: submitted / completed / failed / lost /
duplicated (completed twice), takeovers, stage retries spent, and when the node was
declared dead, the replacement replica ran, and the last job finished.

    .venv/bin/python bench/cluster.py autoscale [--jobs 8] [--steps 60]
    .venv/bin/python bench/cluster.py kill [--jobs 6] [--steps 30]
    .venv/bin/python bench/cluster.py all [--json out.json]

Takes 10-30 minutes on a 2-core machine (each deploy starts ~10 model replicas).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import cluster_harness as ch  # noqa: E402

FIXTURES = REPO.parent / "shared" / "fixtures" / "multi1"
BODY = {"image": "multi1.png", "audio": ["1.wav"], "prompt": "two people talking", "frames": 17,
        "size": "multitalk-128"}
# The 14B set (docs/DEPLOY.md): what a new GPU node mirrors, and what the Diffusion replica loads.
SET_14B_BYTES = 85e9
DIT_14B_BYTES = 37.8e9


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- logs
_PLAIN = re.compile(r"^\w+ (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) (.*)$")


def _stamp(text: str) -> float:
    base, ms = text.split(",")
    return time.mktime(time.strptime(base, "%Y-%m-%d %H:%M:%S")) + int(ms) / 1000


def log_lines(path: Path) -> list[tuple[float, str]]:
    """``(unix time, message)`` of a Serve log (JSON or plain lines)."""
    out = []
    if not path.is_file():
        return out
    for line in path.read_text(errors="replace").splitlines():
        try:
            j = json.loads(line)
            out.append((_stamp(j["asctime"]), j.get("message", "")))
            continue
        except (ValueError, KeyError, TypeError):
            pass
        m = _PLAIN.match(line)
        if m:
            out.append((_stamp(m.group(1)), m.group(2)))
    return out


def serve_logs(cluster: ch.LocalCluster) -> Path:
    return Path(cluster.tmp_root, "ray", "session_latest", "logs", "serve")


def first(lines: list[tuple[float, str]], needle: str, after: float = 0.0) -> Optional[float]:
    return next((t for t, m in lines if needle in m and t >= after), None)


# --------------------------------------------------------------------------- common
def prepare(work: Path) -> tuple[Path, str]:
    from multitalk.checkpoints.tiny import ensure_tiny_weights

    store = work / "store"
    store.mkdir(parents=True, exist_ok=True)
    for name in ("1.wav", "multi1.png"):
        shutil.copy(FIXTURES / name, store / name)
    cache = work / "cache"
    ensure_tiny_weights(str(cache))
    return store, str(cache)


class Sampler:
    """Every second: Diffusion replicas running / starting, live worker nodes, jobs done."""

    def __init__(self, cluster: ch.LocalCluster, jobs: ch.Jobs, ids: list[str]):
        self.cluster, self.jobs, self.ids = cluster, jobs, ids
        self.rows: list[tuple[float, int, int, int, int, str]] = []
        self._stop = threading.Event()
        self.t0 = time.time()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        try:
            reps = [r for r in self.cluster.replicas() if r["deployment"] == "Diffusion"]
            running = sum(r["state"] == "RUNNING" for r in reps)
            starting = sum(r["state"] in ("STARTING", "PENDING_MIGRATION") for r in reps)
            workers = [n for n in self.cluster.nodes() if not n["head"]]
            types = "+".join(sorted(_node_type(n["resources"]) for n in workers))
            done = sum(1 for j in self.ids if (self.jobs.record(j) or {}).get("state") in ch.TERMINAL)
            self.rows.append((time.time() - self.t0, running, starting, len(workers), done, types))
        except Exception:  # noqa: BLE001 - a sample missed while the controller is busy
            pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sample()  # the state the wait ended on

    def changes(self) -> list[tuple[float, int, int, int, int]]:
        out = []
        for row in self.rows:
            if not out or row[1:] != out[-1][1:]:
                out.append(row)
        return out

    def first_time(self, pred) -> Optional[float]:
        return next((r[0] for r in self.rows if pred(r)), None)


def _node_type(resources: dict) -> str:
    """cluster.yaml's node type of a raylet, from the accelerator resource it declares."""
    for name, short in (("H100", "p5"), ("A100", "p4d"), ("A10G", "g5")):
        if resources.get(name):
            return short
    return "?"


def job_figures(cluster: ch.LocalCluster, records: dict[str, dict], submitted: int) -> dict[str, Any]:
    counts = ch.completions(cluster)
    states = [r["state"] if r else "MISSING" for r in records.values()]
    retries = [int((r or {}).get("timings", {}).get("stage_retries", 0)) for r in records.values()]
    return {"submitted": submitted, "completed": states.count("COMPLETED"), "failed": states.count("FAILED"),
            "lost": sum(s not in ch.TERMINAL for s in states),
            "duplicated": sum(1 for j in records if counts.get(j, 0) > 1),
            "taken_over": sum(1 for r in records.values() if r and r.get("lease", 0) >= 1),
            "stage_retries_max": max(retries or [0]), "stage_retries_total": sum(retries),
            "attempts_max": max(int((r or {}).get("attempts", 0)) for r in records.values())}


# "<what> failed (<error>: <message>); retry n/m in s" (deployments/retry.py): the job re-run,
# or a Diffusion / VaeDecoder call re-sent in place.
RETRY_LINE = re.compile(r"(job [0-9a-f-]{36}|diffusion call|decode call) failed \(([^:]+):")


def retry_causes(cluster: ch.LocalCluster) -> dict[str, int]:
    """Retries so far by what was retried and why, from the ingress logs."""
    counts: dict[str, int] = {}
    for text in ch.ingress_logs(cluster):
        for what, error in RETRY_LINE.findall(text):
            key = f"{'job re-run' if what.startswith('job') else what + ' re-sent'}: {error}"
            counts[key] = counts.get(key, 0) + 1
    return counts


# --------------------------------------------------------------------------- autoscale
def upload_weights(endpoint: str, bucket: str, prefix: str, root: Path, blob_mb: int) -> int:
    """The tiny set under s3://bucket/prefix with a SHA256SUMS manifest, plus a blob of
    ``blob_mb`` MB (random fp16) so that the mirror's bandwidth is measured on real bytes."""
    import boto3
    import numpy as np
    from safetensors.numpy import save_file

    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    blob = root / "bench" / "blob.safetensors"
    blob.parent.mkdir(exist_ok=True)
    save_file({"blob": np.random.default_rng(0).standard_normal(blob_mb * 2**19).astype(np.float16)}, str(blob))
    sums, total = [], 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        rel = path.relative_to(root).as_posix()
        s3.upload_file(str(path), bucket, f"{prefix}/{rel}")
        sums.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {rel}")
        total += path.stat().st_size
    s3.put_object(Bucket=bucket, Key=f"{prefix}/SHA256SUMS", Body=("\n".join(sums) + "\n").encode())
    return total


def autoscale(args, work: Path) -> dict[str, Any]:
    from moto.server import ThreadedMotoServer

    from multitalk.checkpoints.remote import mirror_path

    store, cache = prepare(work)
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_REGION": "us-east-1"}
    os.environ.update(env)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=ch.free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    url = "s3://mt-weights/multitalk/v1"
    from multitalk.checkpoints.tiny import ensure_tiny_weights

    weights = work / "weights"  # a copy: the blob must not land in the cache's tiny set
    shutil.copytree(ensure_tiny_weights(cache), weights)
    total = upload_weights(endpoint, "mt-weights", "multitalk/v1", weights, args.blob_mb)
    mirror_cache = work / "node-cache"
    http = ch.free_port()
    s3_weights = {"applications": [{"name": ch.APP, "args": {"models_root": url, "cache_dir": str(mirror_cache)},
                                    "runtime_env": {"env_vars": {"MULTITALK_CACHE_DIR": str(mirror_cache)}}}]}
    config = ch.serve_config(http, cache, {"local_root": str(store)}, s3_weights)
    health = ch.FAST_HEALTH_CHECKS if args.fast_health_checks else None
    out: dict[str, Any] = {"weights_bytes": total}
    try:
        with ch.LocalCluster(work, autoscaling=True, health_checks=health,
                             env={**env, "AWS_ENDPOINT_URL": endpoint}) as cluster:
            t = time.monotonic()
            cluster.deploy(config)
            cluster.wait_running(1200)
            out["deploy_s"] = round(time.monotonic() - t, 1)
            jobs = ch.Jobs(f"http://127.0.0.1:{http}", store)
            warm = jobs.submit({**BODY, "sampling": {"steps": 2}})
            jobs.wait([warm], 600)
            log(f"deployed in {out['deploy_s']} s; warm-up job done; burst of {args.jobs} jobs")
            shutil.rmtree(mirror_path(url, mirror_cache))  # the next node starts with an empty disk
            before = {r["replica_id"] for r in cluster.replicas() if r["deployment"] == "Diffusion"}
            ids: list[str] = []
            sampler = Sampler(cluster, jobs, ids)  # t = 0: the burst begins
            burst_at = sampler.t0
            ids += [jobs.submit({**BODY, "sampling": {"steps": args.steps, "seed": i}}) for i in range(args.jobs)]
            records = jobs.wait(ids, 1800)
            done_at = time.time()
            log("burst done; waiting for the scale-down")
            cluster.wait_running(900, until=lambda: (len(cluster.running("Diffusion")) == 1
                                                    and sum(not n["head"] for n in cluster.nodes()) == 1))
            down_at = time.time()
            sampler.stop()
            out.update(jobs=job_figures(cluster, records, len(ids)), timeline=sampler.changes(),
                       burst_s=round(done_at - burst_at, 1), scale_down_after_burst_s=round(down_at - done_at, 1))
            out["scale_up"] = {
                "node_added_s": sampler.first_time(lambda r: r[3] > sampler.rows[0][3]),
                "replica_added_running_s": sampler.first_time(lambda r: r[1] > sampler.rows[0][1]),
                "max_replicas": max(r[1] for r in sampler.rows), "max_worker_nodes": max(r[3] for r in sampler.rows)}
            out["scale_down"] = {  # seconds after the burst began (the burst lasted burst_s)
                "replicas_back_to_min_s": _last_change(sampler.rows, 1),
                "nodes_back_to_min_s": _last_change(sampler.rows, 3),
                "decision_s": _decision(cluster, "Downscaling", burst_at)}
            out["scale_up"]["decision_s"] = _decision(cluster, "Upscaling", burst_at)
            out["cold_start"] = cold_start(cluster, before, burst_at)
        out["load_rate_mb_s"] = load_rate(mirror_path(url, mirror_cache) / "bench" / "blob.safetensors")
    finally:
        server.stop()
    out["estimate_14b"] = estimate_14b(out)
    return out


def _last_change(rows, column: int) -> Optional[float]:
    """When ``column`` last changed to its final value (seconds after the burst began)."""
    final = rows[-1][column]
    t = None
    for prev, row in zip(rows, rows[1:]):
        if row[column] == final and prev[column] != final:
            t = row[0]
    return None if t is None else round(t, 1)


def _decision(cluster: ch.LocalCluster, verb: str, burst_at: float) -> Optional[float]:
    """The controller's first ``Upscaling``/``Downscaling`` of Diffusion after the burst began."""
    lines = [line for p in serve_logs(cluster).glob("controller_*.log") for line in log_lines(p)]
    t = first(sorted(lines), f"{verb} Deployment(name='Diffusion'", burst_at)
    return None if t is None else round(t - burst_at, 1)


def cold_start(cluster: ch.LocalCluster, before: set[str], burst_at: float) -> dict[str, Any]:
    """The new Diffusion replica's start, from the controller's and its own log."""
    logs = serve_logs(cluster)
    controller = [line for p in logs.glob("controller_*.log") for line in log_lines(p)]
    decision = first(controller, "Upscaling Deployment(name='Diffusion'", burst_at)
    new = [log_lines(p) for p in logs.glob("replica_*_Diffusion_*.log") if p.stem.rsplit("_", 1)[-1] not in before]
    served = [lines for lines in new if first(lines, "Diffusion.sample started")]
    if not served or decision is None:  # (a replica started and stopped again before serving does not count)
        return {"error": "no new Diffusion replica served a job"}
    lines = min(served, key=lambda lines: first(lines, "Diffusion.sample started"))
    started, finished = first(lines, "Started initializing replica"), first(lines, "Finished initializing replica")
    sampled = first(lines, "Diffusion.sample started")
    timing = next((m for _, m in lines if "models root ready in" in m), "")
    root_s, load_s = (float(x) for x in re.findall(r"in ([\d.]+) s", timing)[:2]) if timing else (None, None)
    # The new node's mirror: made by whichever replica there resolved the root first (the
    # others wait on its lock), so looked for in every replica's log since the burst.
    mirrors = [m for p in logs.glob("replica_*.log") for t, m in log_lines(p)
               if t >= burst_at and m.startswith("mirrored s3://") and "GiB in" in m]
    mirrored = max(mirrors, key=lambda m: float(re.search(r"([\d.]+) GiB in", m).group(1)), default="")
    rate = re.search(r"\(([\d.]+) MiB/s\)", mirrored)
    rel = lambda t: None if t is None else round(t - decision, 1)  # noqa: E731
    return {"replica_process_started_s": rel(started), "models_root_s": root_s, "load_s": load_s,
            "initialized_s": rel(finished), "first_sampling_call_s": rel(sampled),
            "mirror_log": mirrored, "mirror_mib_s": float(rate.group(1)) if rate else None}


def load_rate(path: Path) -> Optional[float]:
    """MB/s of reading the mirrored blob's tensor into memory through safetensors (every byte
    copied; the file was just written, so from the page cache: an upper bound for a disk)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    t = time.monotonic()
    with safe_open(str(path), framework="pt") as f:
        total = sum(int(f.get_tensor(k).clone().numel()) for k in f.keys())
    assert total
    return round(path.stat().st_size / 1e6 / (time.monotonic() - t), 1)


def estimate_14b(out: dict[str, Any]) -> dict[str, Any]:
    cold = out.get("cold_start", {})
    mib_s = cold.get("mirror_mib_s")
    est: dict[str, Any] = {"set_gb": SET_14B_BYTES / 1e9, "dit_gb": DIT_14B_BYTES / 1e9}
    if mib_s:
        est["mirror_at_measured_s"] = round(SET_14B_BYTES / (mib_s * 2**20))
    est["mirror_at_1_gb_s_s"] = round(SET_14B_BYTES / 1e9)  # in-region S3, 32 ranges (docs/DEPLOY.md assumption)
    if out.get("load_rate_mb_s"):
        est["dit_load_at_measured_s"] = round(DIT_14B_BYTES / 1e6 / out["load_rate_mb_s"])
    return est


# --------------------------------------------------------------------------- kill drills
def kill(args, work: Path) -> dict[str, Any]:
    store, cache = prepare(work)
    http = ch.free_port()
    health = ch.FAST_HEALTH_CHECKS if args.fast_health_checks else None
    out: dict[str, Any] = {}
    with ch.LocalCluster(work, health_checks=health) as cluster:
        for node_type in ("gpu_p4d_24xlarge", "gpu_p4d_24xlarge", "gpu_p5_48xlarge"):
            cluster.add_node(node_type)
        jobs = ch.Jobs(f"http://127.0.0.1:{http}", store)
        plain = ch.serve_config(http, cache, {"local_root": str(store)})
        t = time.monotonic()
        cluster.deploy(plain)
        cluster.wait_running(1200)
        out["deploy_s"] = round(time.monotonic() - t, 1)
        log(f"deployed in {out['deploy_s']} s")
        out["gpu_node"] = drill(cluster, jobs, args, "Diffusion")
        out["ingress_node"] = drill(cluster, jobs, args, "MultiTalkIngress")
        cluster.add_node("gpu_p4d_24xlarge")  # a replacement machine for the last drill
        sp = ch.serve_config(http, cache, {"local_root": str(store)}, ch.sequence_parallel_variant(2))
        cluster.deploy(sp)
        cluster.wait_running(1200, until=lambda: len(cluster.running("Diffusion")) == 1 and all(
            r["state"] == "RUNNING" for r in cluster.replicas()))
        out["sp_node"] = drill(cluster, jobs, args, "Diffusion")
    return out


def drill(cluster: ch.LocalCluster, jobs: ch.Jobs, args, target: str) -> dict[str, Any]:
    """A burst; once a job samples, SIGKILL the worker node of ``target``'s replica; follow
    every job to its end."""
    head = next(n["node_id"] for n in cluster.nodes() if n["head"])
    victim = next(r for r in cluster.running(target) if r["node_id"] != head)
    node = victim["node_id"]
    ingress_on_node = any(r["node_id"] == node for r in cluster.running("MultiTalkIngress"))
    hosted = sorted(r["deployment"] for r in cluster.replicas() if r["node_id"] == node and r["state"] == "RUNNING")
    retried_before = retry_causes(cluster)
    ids = [jobs.submit({**BODY, "sampling": {"steps": args.steps, "seed": i}}) for i in range(args.jobs)]
    jobs.wait(ids, 600, until=lambda rs: any(
        r and r["progress"].get("stage") == "diffusion" for r in rs.values()))
    in_flight = sum(1 for j in ids if (jobs.record(j) or {}).get("state") == "IN_PROGRESS")
    log(f"killing node {node[:8]} ({', '.join(hosted)}) with {in_flight} jobs in progress")
    killed = cluster.kill_node(node)
    import ray

    dead_at = replaced_at = None
    while dead_at is None or replaced_at is None:
        if dead_at is None and not any(n["NodeID"] == node and n["Alive"] for n in ray.nodes()):
            dead_at = time.time()
        if replaced_at is None and dead_at is not None and all(
                r["node_id"] != node for r in cluster.running(target)) and cluster.running(target):
            replaced_at = time.time()
        if time.time() - killed > 900:
            break
        time.sleep(0.5)
    records = jobs.wait(ids, 1800)
    end = max((r["finished_at"] or 0) for r in records.values() if r)
    figures = job_figures(cluster, records, len(ids))
    figures.update(node_hosted=hosted, ingress_on_node=ingress_on_node, jobs_in_progress_at_kill=in_flight,
                   declared_dead_s=None if dead_at is None else round(dead_at - killed, 1),
                   replacement_running_s=None if replaced_at is None else round(replaced_at - killed, 1),
                   last_job_done_s=round(end - killed, 1))
    figures["retries_by_cause"] = {k: n - retried_before.get(k, 0) for k, n in sorted(retry_causes(cluster).items())
                                   if n > retried_before.get(k, 0)}
    log(f"{target} node drill: {figures}")
    return figures


# --------------------------------------------------------------------------- main
def report(results: dict[str, Any]) -> None:
    a = results.get("autoscale")
    if a:
        print("\nautoscale: t(s)  Diffusion running  starting  GPU nodes (types)  jobs done")
        for t, running, starting, nodes, done, types in a["timeline"]:
            print(f"  {t:7.1f}  {running:3d}  {starting:3d}  {nodes:3d} ({types})  {done:3d}")
        print(json.dumps({k: v for k, v in a.items() if k != "timeline"}, indent=1))
    for name in ("gpu_node", "ingress_node", "sp_node"):
        if name in results.get("kill", {}):
            print(f"\n{name}: " + json.dumps(results["kill"][name]))


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=("autoscale", "kill", "all"))
    parser.add_argument("--jobs", type=int, default=None, help="jobs per burst (autoscale 8, kill 6)")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps per job (autoscale 60, kill 30)")
    parser.add_argument("--blob-mb", type=int, default=256, help="extra MB in the S3 set, for the mirror bandwidth")
    parser.add_argument("--fast-health-checks", action="store_true", help="node death seen in ~4 s, not Ray's 20-55 s")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    results: dict[str, Any] = {"machine": f"{os.cpu_count()} CPUs", "health_checks":
                               "fast" if args.fast_health_checks else "Ray defaults"}
    with tempfile.TemporaryDirectory(prefix="mt-cluster-") as tmp:
        if args.what in ("autoscale", "all"):
            a = argparse.Namespace(**{**vars(args), "jobs": args.jobs or 8, "steps": args.steps or 60})
            results["autoscale"] = autoscale(a, Path(tmp) / "autoscale")
        if args.what in ("kill", "all"):
            k = argparse.Namespace(**{**vars(args), "jobs": args.jobs or 6, "steps": args.steps or 30})
            results["kill"] = kill(k, Path(tmp) / "kill")
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
