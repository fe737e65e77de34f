"""Run one bench case in a fresh interpreter, so that its peak RSS is its own."""
from __future__ import annotations

import multiprocessing as mp
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
