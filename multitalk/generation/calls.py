"""The running stage calls of one job: what cancelling the job must reach, and nothing more.

One mechanism for the in-process stages (:class:`multitalk.generation.local.LocalStages`)
and the served ones (``deployments.serve_stages.ServeStages``). A call is forgotten as soon
as it has ended, so a long job's tracker does not hold finished chunks' results (their
frames) until the job ends:

* a call run as an asyncio task (:meth:`CallTracker.start`) is forgotten when its task ends;
* a call whose end cannot be watched without fetching its result into this process (a
  Serve response handed un-awaited into the next stage call) is forgotten when a task that
  consumed it has succeeded: that task could only succeed once its inputs had ended.

:meth:`CallTracker.cancel` reaches every call still tracked.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Iterable

logger = logging.getLogger(__name__)


class CallTracker:
    def __init__(self) -> None:
        self._running: dict[int, Any] = {}  # by identity: handles need not be hashable

    def __len__(self) -> int:
        """Calls that may still be running."""
        return len(self._running)

    def start(self, work: Awaitable, consumes: Iterable[Any] = ()) -> "asyncio.Future":
        """Run ``work`` as a task and track it until it ends. ``consumes``: the handles it
        awaits (or hands to its stage); once it has succeeded they are forgotten too."""
        task = asyncio.ensure_future(work)
        self._running[id(task)] = task
        inputs = tuple(h for h in consumes if id(h) in self._running)

        def ended(done: "asyncio.Future") -> None:
            self._forget(done)
            if not done.cancelled() and done.exception() is None:
                for handle in inputs:
                    self._forget(handle)

        task.add_done_callback(ended)
        return task

    def add(self, call: Any) -> Any:
        """Track a call that is forgotten when a task consuming it succeeds (see the module
        docstring); returns ``call``. It must have ``cancel()``."""
        self._running[id(call)] = call
        return call

    def _forget(self, call: Any) -> None:
        if self._running.get(id(call)) is call:
            del self._running[id(call)]

    def cancel(self) -> None:
        """Cancel every call still tracked (best effort: cancelling a finished one is a no-op)."""
        for call in list(self._running.values()):
            try:
                call.cancel()
            except Exception:  # noqa: BLE001 - cancelling is best effort
                logger.debug("cancel failed", exc_info=True)
