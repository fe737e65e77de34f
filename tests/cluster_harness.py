"""The production Serve config on Ray's own multi-node harness, on one machine.

``ray.cluster_utils.Cluster`` runs several real raylets on this host; a raylet may declare
GPUs it does not have, so Serve places ``num_gpus`` replicas on it exactly as on a GPU
cluster (torch sees no CUDA: the overlay runs every stage on the CPU). With
``autoscaling=True`` the head also runs Ray's real autoscaler (the monitor process) over
the ``fake_multinode`` provider, which launches and removes raylets on this host the way
the AWS provider launches instances (the provider config is written here: the pip wheel
does not ship the ``example.yaml`` that ``AutoscalingCluster`` opens).

What is deployed is ``serve_config.yaml`` itself merged with ONE overlay
(``tests/data/cluster_cpu_overlay.yaml``, see :func:`serve_config`); the node types are
``cluster.yaml``'s, with their CPU and GPU counts scaled down (:func:`node_types`).

Kept small for a shared 2-core machine: a few hundred MB of object store per raylet, no
prestarted workers, and ``RAY_TMPDIR`` pointing at a folder of its own, so that the
``ray_current_cluster`` file this cluster writes never makes another process's
``ray.init()`` join it. Nothing here runs ``ray stop`` (host-wide); nodes are killed by
their own process ids. Cluster, ``remove_node`` and the fake provider are Ray developer
APIs: Ray is pinned in pyproject.toml.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OVERLAY = HERE / "data" / "cluster_cpu_overlay.yaml"
APP = "multitalk"

# cluster.yaml's node types, scaled down: CPUs / 6 (rounded up), GPUs / 2 (at least 1). A
# p4d.24xlarge (96 CPUs, 8 GPUs) becomes a raylet declaring 16 CPUs and 4 GPUs: it holds the
# encoders' shared GPU, the Speech fraction and two whole-GPU Diffusion replicas.
CPU_SCALE = 6
GPU_SCALE = 2
OBJECT_STORE_BYTES = 200 * 2**20
# Raylets start no idle workers ahead of demand (each would be a Python process on 2 cores).
QUIET_RAYLETS = {"prestart_worker_first_driver": False, "enable_worker_prestart": False}
# Node death seen after ~4 s instead of Ray's default 20-55 s (the suite's drills; the bench
# keeps the defaults, as production does).
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 1000, "health_check_period_ms": 1000,
                      "health_check_timeout_ms": 1000, "health_check_failure_threshold": 3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- the config
def merge(base: Any, overlay: Any) -> Any:
    """``overlay`` merged into ``base``: dicts key by key, lists of named items (applications,
    deployments) item by item by ``name``; anything else is replaced."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        out = dict(base)
        for key, value in overlay.items():
            out[key] = merge(base[key], value) if key in base else copy.deepcopy(value)
        return out
    if (isinstance(base, list) and isinstance(overlay, list)
            and all(isinstance(i, dict) and "name" in i for i in base + overlay)):
        out = [copy.deepcopy(i) for i in base]
        index = {item["name"]: n for n, item in enumerate(out)}
        for item in overlay:
            if item["name"] in index:
                out[index[item["name"]]] = merge(out[index[item["name"]]], item)
            else:
                out.append(copy.deepcopy(item))
        return out
    return copy.deepcopy(overlay)


def serve_config(port: int, cache_dir: str, store: dict, *extra: dict) -> dict:
    """``serve_config.yaml`` + the CPU overlay + what differs per run (port, cache, store),
    then ``extra`` overlays (a test's variant, e.g. :func:`sequence_parallel_variant`)."""
    config = yaml.safe_load((REPO / "serve_config.yaml").read_text())
    config = merge(config, yaml.safe_load(OVERLAY.read_text()))
    per_run = {
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": APP, "runtime_env": {"env_vars": {"MULTITALK_CACHE_DIR": cache_dir}},
                          "args": {"cache_dir": cache_dir, "store": store}}],
    }
    config = merge(config, per_run)
    for more in extra:
        config = merge(config, more)
    return config


def sequence_parallel_variant(sp_degree: int = 2, max_replicas: Optional[int] = None) -> dict:
    """serve_config.yaml's commented sequence-parallel Diffusion (the block under "Replace
    ray_actor_options with:"), for ``sp_degree`` ranks: bundle 0 holds the replica actor."""
    import re

    text = (REPO / "serve_config.yaml").read_text()
    block = []
    for line in text[text.index("Replace ray_actor_options with:"):].splitlines()[1:]:
        m = re.match(r"^\s*# ?(.*)$", line)
        if not m:
            break
        block.append(m.group(1))
    diffusion = yaml.safe_load("\n".join(block))
    diffusion["placement_group_bundles"] = diffusion["placement_group_bundles"][:sp_degree]
    if max_replicas is not None:  # the example is fixed at one replica; a test may let it autoscale
        diffusion["autoscaling_config"] = {**diffusion["autoscaling_config"], "max_replicas": max_replicas}
    return {"applications": [{"name": APP,
                              "args": {"parallel": {"sp_degree": sp_degree, "ulysses_degree": sp_degree,
                                                    "ring_degree": 1}},
                              "deployments": [{"name": "Diffusion", **diffusion}]}]}


def _scaled(resources: dict) -> dict:
    out = {}
    for name, amount in resources.items():
        if name == "CPU":
            out[name] = max(1, -(-int(amount) // CPU_SCALE))
        elif name == "GPU" or amount == resources.get("GPU"):  # accelerator resources follow the GPUs
            out[name] = max(1, int(amount) // GPU_SCALE) if amount else 0
        else:
            out[name] = amount
    return out


def node_types() -> dict[str, dict]:
    """``cluster.yaml``'s worker node types, scaled down: ``{name: {resources, min_workers,
    max_workers}}`` (resources as a raylet declares them)."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    out = {}
    for name, spec in cluster["available_node_types"].items():
        if name == cluster["head_node_type"]:
            continue
        out[name] = {"resources": _scaled(spec["resources"]), "min_workers": spec.get("min_workers", 0),
                     "max_workers": spec.get("max_workers", 1)}
    return out


def head_resources() -> dict:
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    return _scaled(cluster["available_node_types"][cluster["head_node_type"]]["resources"])


def serve_env() -> dict[str, str]:
    """The ``RAY_*`` environment cluster.yaml gives every node's container (``-e`` docker
    options): e.g. the Serve controller's pack scheduling."""
    cluster = yaml.safe_load((REPO / "cluster.yaml").read_text())
    out = {}
    for option in cluster.get("docker", {}).get("run_options", []):
        if option.startswith("-e RAY_"):
            key, _, value = option[3:].partition("=")
            out[key] = value
    return out


def autoscaler_config(gcs_address: str, idle_timeout_minutes: float = 0.1,
                      types: Optional[dict] = None) -> dict:
    """The fake_multinode provider's cluster config (what ``ray up`` would get on AWS), from
    :func:`node_types`: the real autoscaler adds and removes these raylets on this host."""
    workers = {name: {"resources": {**spec["resources"], "object_store_memory": OBJECT_STORE_BYTES},
                      "node_config": {}, "min_workers": spec["min_workers"], "max_workers": spec["max_workers"]}
               for name, spec in (types or node_types()).items()}
    return {
        "cluster_name": "multitalk-fake",
        "max_workers": sum(t["max_workers"] for t in workers.values()),
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {"ray.head.default": {"resources": head_resources(), "node_config": {},
                                                      "max_workers": 0}, **workers},
        "head_node_type": "ray.head.default",
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


# --------------------------------------------------------------------------- the cluster
class LocalCluster:
    """A head raylet (CPU only, like cluster.yaml's head) plus GPU worker raylets, Serve, and
    the application deployed from a config dict. Use as a context manager."""

    def __init__(self, workdir: Path, *, autoscaling: bool = False, health_checks: Optional[dict] = None,
                 env: Optional[dict] = None):
        self.workdir = Path(workdir)
        self.autoscaling = autoscaling
        self.system_config = {**QUIET_RAYLETS, **(health_checks or {})}
        self.env = dict(env or {})
        self.cluster = None
        self.static_nodes: dict[str, Any] = {}  # node id -> ray Node (added with add_node)
        self._saved_env: dict[str, Optional[str]] = {}

    # --- lifecycle ------------------------------------------------------------------
    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _set_env(self, values: dict) -> None:
        for key, value in values.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def start(self) -> None:
        import ray
        from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_ID
        from ray.cluster_utils import Cluster

        # A short temp root of our own: Unix socket paths must stay under 108 bytes, and the
        # cluster's address file lands here instead of the host-wide /tmp/ray.
        self.tmp_root = tempfile.mkdtemp(prefix="mtc-", dir="/tmp")
        paths = [str(REPO), str(HERE)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        env = {"RAY_TMPDIR": self.tmp_root, "PYTHONPATH": os.pathsep.join(paths), **serve_env(), **self.env}
        head_args: dict[str, Any] = {
            "num_cpus": head_resources()["CPU"], "num_gpus": 0, "object_store_memory": OBJECT_STORE_BYTES,
            "include_dashboard": False, "_system_config": self.system_config,
        }
        if self.autoscaling:
            from ray._private.services import get_node_ip_address

            port = free_port()
            config_path = self.workdir / "autoscaler.yaml"
            config_path.write_text(yaml.safe_dump(autoscaler_config(f"{get_node_ip_address()}:{port}")))
            # The monitor (a child of the head) inherits these: the fake provider refuses to
            # run without RAY_FAKE_CLUSTER, and updates every second instead of every 5.
            env.update({"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"})
            head_args.update(autoscaling_config=str(config_path), gcs_server_port=port,
                             env_vars={"RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID})
        self._set_env(env)
        self.cluster = Cluster(initialize_head=True, head_node_args=head_args)
        ray.init(address=self.cluster.address, namespace="serve", log_to_driver=False)

    def stop(self) -> None:
        import ray
        from ray._private import auto_init_hook

        worker_ids = []
        try:
            head = getattr(self.cluster, "head_node", None)
            worker_ids = [n["NodeID"] for n in ray.nodes() if head is None or n["NodeID"] != head.node_id]
        except Exception:  # noqa: BLE001 - not connected: only the nodes we added are known
            pass
        # Serve's handle threads in this process would connect again after the shutdown (to this
        # cluster, keeping its head from being removed; later to whatever ray.init() finds or
        # starts): Ray's implicit init stays off in this process from here on.
        auto_init_hook.enable_auto_connect = False
        try:
            ray.shutdown()  # no graceful serve.shutdown: every process of the cluster is killed next
            for node_id in worker_ids:  # the autoscaler's raylets outlive the head: stop them by pid
                if node_id not in self.static_nodes:
                    self._kill_node_processes(node_id)
            if self.cluster is not None:
                self.cluster.shutdown()
        finally:
            # Whatever is left of this cluster (its session folder is under our temp root).
            for pid in self._pids_matching(self.tmp_root):
                for p in [pid, *self._children(pid)]:
                    try:
                        os.kill(p, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            if not os.environ.get("MULTITALK_KEEP_CLUSTER_LOGS"):
                shutil.rmtree(self.tmp_root, ignore_errors=True)
            for key, value in self._saved_env.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    # --- nodes ----------------------------------------------------------------------
    def add_node(self, node_type: str) -> str:
        """Start a worker raylet of ``node_type`` (scaled from cluster.yaml); its node id."""
        resources = dict(node_types()[node_type]["resources"])
        node = self.cluster.add_node(num_cpus=resources.pop("CPU"), num_gpus=resources.pop("GPU", 0),
                                     resources=resources, object_store_memory=OBJECT_STORE_BYTES)
        self.static_nodes[node.node_id] = node
        return node.node_id

    def nodes(self) -> list[dict]:
        """The live nodes: ``[{node_id, resources, head}]``."""
        import ray

        return [{"node_id": n["NodeID"], "resources": n["Resources"],
                 "head": n["Resources"].get("node:__internal_head__", 0) > 0}
                for n in ray.nodes() if n["Alive"]]

    def kill_node(self, node_id: str) -> float:
        """SIGKILL every process of a worker node (its raylet first), as a machine that dies;
        Ray notices through its health checks. Returns the time of the kill."""
        node = self.static_nodes.pop(node_id, None)
        killed_at = time.time()
        if node is not None:
            self.cluster.remove_node(node, allow_graceful=False)
            return killed_at
        self._kill_node_processes(node_id)
        return killed_at

    def _kill_node_processes(self, node_id: str) -> None:
        """A raylet the autoscaler started (a child of the monitor): its processes by their
        pids, the raylet's children too (workers, agents). Its parent never reaps the raylet,
        and a worker whose raylet is a zombie lives on: kill them all, as a machine that dies."""
        pids = self._node_pids(node_id)
        pids += [p for raylet in pids for p in self._children(raylet) if p not in pids]
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry))
        return out

    @staticmethod
    def _pids_matching(text: str, kinds: tuple[str, ...] = ()) -> list[int]:
        """Processes whose command line contains ``text`` (and one of ``kinds``), raylets first."""
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmdline and (not kinds or any(k in cmdline for k in kinds)):
                found.append(("raylet" not in cmdline, int(entry)))
        return [pid for _, pid in sorted(found)]

    def _node_pids(self, node_id: str) -> list[int]:
        """Raylet (and agents) of ``node_id``: the processes whose command line names it."""
        return self._pids_matching(node_id, ("raylet", "agent"))

    # --- Serve ------------------------------------------------------------------------
    def deploy(self, config: dict) -> None:
        """``serve deploy`` of ``config`` (a Serve config as a dict), not waiting."""
        from ray.serve._private import api as serve_api
        from ray.serve.config import ProxyLocation
        from ray.serve.schema import ServeDeploySchema

        schema = ServeDeploySchema.model_validate(config)
        client = serve_api.serve_start(http_options=schema.http_options.model_dump(),
                                       proxy_location=ProxyLocation(schema.proxy_location))
        client.deploy_apps(schema, _blocking=False)

    def wait_running(self, timeout: float = 300.0, app: str = APP,
                     until: Optional[Callable[[], bool]] = None) -> float:
        """Wait until ``app`` is RUNNING (and ``until()`` holds); seconds waited."""
        from ray import serve

        t0 = time.monotonic()
        while True:
            status = serve.status().applications.get(app)
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"{app}: deploy failed: {status.message}")
            if status is not None and status.status == "RUNNING" and (until is None or until()):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"{app} not running after {timeout:.0f} s: {status}")
            time.sleep(0.5)

    def replicas(self, app: str = APP) -> list[dict]:
        """Every replica of ``app`` the controller knows: ``[{deployment, replica_id, state,
        node_id, pid, actor_name}]``."""
        from ray.serve.context import _get_global_client

        details = _get_global_client().get_serve_details()
        out = []
        for name, dep in (details.get("applications", {}).get(app, {}).get("deployments") or {}).items():
            for r in dep.get("replicas", []):
                out.append({"deployment": name, "replica_id": r["replica_id"], "state": r["state"],
                            "node_id": r.get("node_id"), "pid": r.get("pid"), "actor_name": r.get("actor_name")})
        return out

    def running(self, deployment: str, app: str = APP) -> list[dict]:
        return [r for r in self.replicas(app) if r["deployment"] == deployment and r["state"] == "RUNNING"]


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True, default=str)


# --------------------------------------------------------------------------- jobs
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED")


class Jobs:
    """Jobs submitted over HTTP (through whichever node's proxy answers) and followed in the
    local store's records, which every ingress replica writes."""

    def __init__(self, url: str, store_dir: Path):
        self.url, self.store_dir = url, Path(store_dir)

    def submit(self, body: dict, attempts: int = 5) -> str:
        """POST /v1/jobs with an Idempotency-Key, again after a connection error (a proxy on a
        dying node): the key makes a retried submission the same job."""
        import uuid

        import requests

        key = uuid.uuid4().hex
        for attempt in range(attempts):
            try:
                r = requests.post(f"{self.url}/v1/jobs", json=body, headers={"Idempotency-Key": key}, timeout=60)
            except requests.RequestException:
                time.sleep(1 + attempt)
                continue
            if r.status_code == 202:
                return r.json()["id"]
            raise AssertionError(f"submit answered {r.status_code}: {r.text}")
        raise AssertionError(f"submit failed {attempts} times")

    def record(self, job_id: str) -> Optional[dict]:
        try:
            return json.loads((self.store_dir / "jobs" / f"{job_id}.json").read_text())
        except (OSError, ValueError):
            return None

    def wait(self, ids: list[str], timeout: float, poll_s: float = 0.5,
             until: Optional[Callable[[dict[str, dict]], bool]] = None) -> dict[str, dict]:
        """Records of ``ids`` once all are finished (or ``until(records)`` holds)."""
        deadline = time.monotonic() + timeout
        while True:
            records = {j: self.record(j) for j in ids}
            if until is not None and until(records):
                return records
            if until is None and all(r and r["state"] in TERMINAL for r in records.values()):
                return records
            if time.monotonic() > deadline:
                states = {j[:8]: (r or {}).get("state") for j, r in records.items()}
                raise TimeoutError(f"jobs not finished after {timeout:.0f} s: {states}")
            time.sleep(poll_s)


def replica_log(cluster: LocalCluster, deployment: str, replica_id: str, app: str = APP) -> str:
    """A replica's Serve log (every node's logs are in the one session folder of this host)."""
    path = Path(cluster.tmp_root, "ray", "session_latest", "logs", "serve", f"replica_{app}_{deployment}_{replica_id}.log")
    return path.read_text(errors="replace") if path.is_file() else ""


def ingress_logs(cluster: LocalCluster) -> list[str]:
    """Every ingress replica's Serve log so far, the dead nodes' too (one machine, one session
    folder)."""
    logs = Path(cluster.tmp_root, "ray", "session_latest", "logs", "serve")
    return [path.read_text(errors="replace") for path in logs.glob("replica_*MultiTalkIngress*.log")]


def completions(cluster: LocalCluster) -> dict[str, int]:
    """How many times each job completed, from the ingress logs: a job run twice to
    completion counts 2."""
    import collections
    import re

    counts: collections.Counter = collections.Counter()
    for text in ingress_logs(cluster):
        for match in re.finditer(r"\[job ([0-9a-f-]{36})\] completed:", text):
            counts[match.group(1)] += 1
    return dict(counts)
