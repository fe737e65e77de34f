"""Prometheus metrics for the serving path (Ray Serve custom metrics, ``ray.serve.metrics``).

Ray exports every custom metric on each node's metrics agent (``ray.init(_metrics_export_port=...)``
or ``ray start --metrics-export-port``), prefixed with ``ray_``, and Serve adds the
``deployment`` / ``replica`` / ``application`` tags. What we record:

================================================  =========  ===============================================
name (as scraped)                                 type       meaning
================================================  =========  ===============================================
``ray_multitalk_job_transitions_total{state}``    counter    jobs entering a state (IN_QUEUE, IN_PROGRESS,
                                                             COMPLETED, FAILED, CANCELLED), ingress replica
``ray_multitalk_jobs{state}``                     gauge      jobs this ingress replica holds in IN_QUEUE /
                                                             IN_PROGRESS now
``ray_multitalk_queue_depth``                     gauge      jobs waiting for a run slot (IN_QUEUE)
``ray_multitalk_stage_seconds{stage}``            histogram  per-stage latency of completed jobs:
                                                             prepare/encode/diffusion/decode/mux from the
                                                             driver's ``GenerationResult.timings``, plus the
                                                             service's queue/fetch_inputs/generate/upload and
                                                             ``total`` (start of run to end of upload)
``ray_multitalk_diffusion_step_seconds``          histogram  one sampler step, seen from the ingress (time
                                                             between consecutive step events of one chunk)
``ray_multitalk_gpu_max_memory_bytes{device}``    gauge      ``torch.cuda.max_memory_allocated`` in each stage
                                                             replica that has CUDA (absent on CPU)
================================================  =========  ===============================================

Everything here is a no-op where Ray is not initialised (in-process tests, the plain
pipeline), and a failure to record never reaches a job.
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any, Optional

logger = logging.getLogger("multitalk.serve")

ACTIVE_STATES = ("IN_QUEUE", "IN_PROGRESS")
TERMINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED")

# Seconds: from sub-second CPU toy runs to the 14B model's multi-minute chunks.
STAGE_BOUNDARIES = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1200, 2400, 3600]
STEP_BOUNDARIES = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80]

METRIC_NAMES = (
    "multitalk_job_transitions",
    "multitalk_jobs",
    "multitalk_queue_depth",
    "multitalk_stage_seconds",
    "multitalk_diffusion_step_seconds",
    "multitalk_gpu_max_memory_bytes",
)

_lock = threading.Lock()
_metrics: Optional[dict] = None


def _ray_ready() -> bool:
    ray = sys.modules.get("ray")
    try:
        return ray is not None and ray.is_initialized()
    except Exception:  # noqa: BLE001
        return False


def _get() -> Optional[dict]:
    """The metric objects of this process, created on first use; None without Ray."""
    global _metrics
    if _metrics is not None:
        return _metrics or None
    if not _ray_ready():
        return None
    with _lock:
        if _metrics is None:
            try:
                from ray.serve.metrics import Counter, Gauge, Histogram

                _metrics = {
                    "transitions": Counter(
                        "multitalk_job_transitions", description="Jobs entering each state.", tag_keys=("state",)
                    ),
                    "jobs": Gauge(
                        "multitalk_jobs", description="Unfinished jobs held by this ingress replica, by state.",
                        tag_keys=("state",),
                    ),
                    "queue": Gauge("multitalk_queue_depth", description="Jobs waiting for a run slot."),
                    "stage": Histogram(
                        "multitalk_stage_seconds", description="Per-stage latency of completed jobs (s).",
                        boundaries=STAGE_BOUNDARIES, tag_keys=("stage",),
                    ),
                    "step": Histogram(
                        "multitalk_diffusion_step_seconds", description="Duration of one sampler step (s).",
                        boundaries=STEP_BOUNDARIES,
                    ),
                    "gpu": Gauge(
                        "multitalk_gpu_max_memory_bytes",
                        description="torch.cuda.max_memory_allocated in a stage replica.", tag_keys=("device",),
                    ),
                }
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.warning("metrics disabled: could not create Ray Serve metrics", exc_info=True)
                _metrics = {}
    return _metrics or None


def _safe(fn):
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            logger.debug("recording a metric failed", exc_info=True)
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


class JobMetrics:
    """Job-level metrics for one ingress replica, fed by ``JobService``."""

    def __init__(self):
        self.states: dict[str, str] = {}  # unfinished jobs -> state
        self._steps: dict[str, tuple[int, int, float]] = {}  # job -> (chunk, step, monotonic time)

    @_safe
    def state(self, job_id: str, state: Any) -> None:
        """Record that ``job_id`` is in ``state`` now (repeats are ignored)."""
        state = getattr(state, "value", state)
        if self.states.get(job_id) == state:
            return
        if state in TERMINAL_STATES:
            self.states.pop(job_id, None)
            self._steps.pop(job_id, None)
        else:
            self.states[job_id] = state
        m = _get()
        if m is None:
            return
        m["transitions"].inc(1, tags={"state": state})
        counts = {s: 0 for s in ACTIVE_STATES}
        for s in self.states.values():
            counts[s] = counts.get(s, 0) + 1
        for s, n in counts.items():
            m["jobs"].set(n, tags={"state": s})
        m["queue"].set(counts.get("IN_QUEUE", 0))

    @_safe
    def progress(self, job_id: str, progress: Any) -> None:
        """Sampler step times from the job's progress events (stage ``diffusion``)."""
        if getattr(progress, "stage", None) != "diffusion" or not getattr(progress, "total_steps", 0):
            return
        now = time.monotonic()
        chunk, step = int(getattr(progress, "chunk", 0) or 0), int(progress.step)
        prev = self._steps.get(job_id)
        self._steps[job_id] = (chunk, step, now)
        if prev is None or prev[0] != chunk or step <= prev[1]:
            return  # first step event of a chunk: no previous step to measure from
        m = _get()
        if m is not None:
            per_step = (now - prev[2]) / (step - prev[1])
            for _ in range(step - prev[1]):
                m["step"].observe(per_step)

    @_safe
    def finished(self, job_id: str, state: Any, timings: Optional[dict]) -> None:
        """Terminal state; per-stage latencies when the job completed."""
        self.state(job_id, state)
        state = getattr(state, "value", state)
        m = _get()
        if m is None or state != "COMPLETED":
            return
        for stage, seconds in (timings or {}).items():
            try:
                m["stage"].observe(float(seconds), tags={"stage": str(stage)})
            except (TypeError, ValueError):
                continue


jobs = JobMetrics()  # the ingress replica's (one JobService per process)


# --- stage replicas -------------------------------------------------------------------

_gpu_thread: Optional[threading.Thread] = None


@_safe
def record_gpu_memory() -> None:
    """Set the GPU memory gauge from ``torch.cuda.max_memory_allocated`` (CUDA only)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return
    m = _get()
    if m is None:
        return
    for i in range(torch.cuda.device_count()):
        m["gpu"].set(float(torch.cuda.max_memory_allocated(i)), tags={"device": str(i)})


@_safe
def watch_gpu_memory(interval_s: float = 5.0) -> None:
    """In a stage replica: refresh the GPU memory gauge every ``interval_s`` (once per process;
    nothing at all without CUDA)."""
    global _gpu_thread
    torch = sys.modules.get("torch")
    if _gpu_thread is not None or torch is None or not torch.cuda.is_available():
        return

    def loop():
        while True:
            record_gpu_memory()
            time.sleep(interval_s)

    _gpu_thread = threading.Thread(target=loop, name="multitalk-gpu-metrics", daemon=True)
    _gpu_thread.start()


def prometheus_lines(text: str, names=METRIC_NAMES) -> dict[str, list[str]]:
    """Sample lines per metric name in a Prometheus text page (``ray_`` prefix and the
    ``_total``/``_bucket``/``_sum``/``_count`` suffixes allowed). For tests and checks."""
    found: dict[str, list[str]] = {n: [] for n in names}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        metric = line.split("{", 1)[0].split(" ", 1)[0]
        if metric.startswith("ray_"):
            metric = metric[4:]
        for n in names:
            if metric == n or (metric.startswith(n + "_") and metric[len(n) + 1:] in ("total", "bucket", "sum", "count")):
                found[n].append(line)
    return found


# --- logs -----------------------------------------------------------------------------


# The job id as a log record attribute (``logger.info(..., extra={JOB_LOG_FIELD: id})``): Ray's
# JSON formatter writes it as a field of its own. Not ``job_id``: Ray's logging filter
# overwrites that attribute with the Ray job's id.
JOB_LOG_FIELD = "multitalk_job_id"


@_safe
def replica_logging(name: str = "multitalk.serve", level: int = logging.INFO) -> None:
    """In a Serve replica: send our logger's lines (``[job <id>] ...``, see ``service.JobLog``)
    through Ray Serve's replica log handlers, so they land in ``logs/serve/replica_*.log``
    with the replica, request id and (``LoggingConfig(encoding="JSON")``) JSON fields.
    Without this they stop at Python's last-resort handler (warnings and up, stderr only)."""
    serve_logger = logging.getLogger("ray.serve")
    ours = logging.getLogger(name)
    if not serve_logger.handlers or any(getattr(h, "_multitalk", False) for h in ours.handlers):
        return
    for handler in serve_logger.handlers:
        ours.addHandler(handler)
    ours.addHandler(_Marker())
    ours.setLevel(level)
    ours.propagate = False


class _Marker(logging.NullHandler):
    _multitalk = True
