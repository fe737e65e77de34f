"""Run one bench case in a fresh interpreter, so that its peak RSS is its own."""
from __future__ import annotations

import multiprocessing as mp
import resource
import time
from typing import Any, Callable


def run_in_fresh_process(target: Callable[..., None], *args: Any) -> Any:
    """Call ``target(*args, queue)`` in a spawned process and return what it puts on ``queue``.

    Spawned, not forked: a forked child inherits the parent's allocations, which would
    make ``ru_maxrss`` measure the parent too.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    process = ctx.Process(target=target, args=(*args, queue))
    process.start()
    out = queue.get()
    process.join()
    return out


def timed_generation(pipe, request, base_rss_kb: int) -> dict:
    """Run ``pipe.generate(request)`` once and report what the CPU benches compare: seconds,
    peak RSS (MB, this process so far) against ``base_rss_kb`` (``ru_maxrss`` before it),
    chunks, frames and the pipeline's own stage timings."""
    t0 = time.perf_counter()
    result = pipe.generate(request)
    elapsed = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return dict(seconds=elapsed, peak_rss_mb=peak / 1024, rss_before_mb=base_rss_kb / 1024,
                chunks=result.chunks, frames=result.num_frames, timings=result.timings)
