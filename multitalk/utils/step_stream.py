"""Run a step-reporting computation (the sampler) in a worker thread and read it as a stream.

Sampling one chunk is minutes of blocking torch work that reports each finished step
through an ``on_step(step, total)`` callback. Every caller needs the same three things
from it: the step events where the caller lives (an asyncio loop, or a Ray actor's
generator), the result at the end, and a way to stop it early. A Python thread cannot be
killed, so stopping means the callback raises :class:`~multitalk.api.StageCancelled` at
the next step. :class:`StepStream` is that pump, written once for the in-process stages
(``multitalk.generation.local.LocalStages``), the Diffusion deployment and the sequence-parallel
rank actors (``deployments/``).
"""
from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Optional

from ..api import StageCancelled

StepCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class StepEvent:
    """Sampler step ``step`` of ``total`` (counted within one chunk) has finished."""

    step: int
    total: int


_END = object()


class StepStream:
    """``work(on_step)`` in a worker thread, its step events as a (sync or async) stream.

    ``should_stop``: polled in the worker at every step; ``True`` stops the work with
    :class:`StageCancelled`. The default is this stream's own :meth:`cancel` flag; a
    sequence-parallel rank passes a collective vote instead, so that every rank stops at
    the same step. After the stream is exhausted, :attr:`result` holds what ``work``
    returned (an exception raised by ``work`` is re-raised by the iteration instead).
    """

    def __init__(self, work: Callable[[StepCallback], Any], should_stop: Optional[Callable[[], bool]] = None):
        self._work = work
        self._cancelled = threading.Event()
        self._should_stop = should_stop or self._cancelled.is_set
        self.result: Any = None

    def cancel(self) -> None:
        """Stop the work at its next step (no effect once it has finished)."""
        self._cancelled.set()

    def _run(self, put: Callable[[Any], None]) -> Any:
        def on_step(step: int, total: int) -> None:
            if self._should_stop():
                raise StageCancelled()
            put(StepEvent(int(step), int(total)))

        try:
            return self._work(on_step)
        finally:
            put(_END)

    # --- a plain generator (Ray actor methods, threads) ----------------------------------
    def __iter__(self) -> Iterator[StepEvent]:
        events: queue.Queue = queue.Queue()
        box: dict = {}

        def target() -> None:
            try:
                box["result"] = self._run(events.put)
            except BaseException as e:  # noqa: BLE001 - re-raised in the consumer
                box["error"] = e

        thread = threading.Thread(target=target, name="step-stream", daemon=True)
        thread.start()
        try:
            while (item := events.get()) is not _END:
                yield item
        finally:
            if thread.is_alive():  # the consumer stopped early: stop the work, wait for it
                self.cancel()
            thread.join()
        if "error" in box:
            raise box["error"]
        self.result = box.get("result")

    # --- an async generator (asyncio: the in-process stages, Serve replicas) --------------
    async def __aiter__(self) -> AsyncIterator[StepEvent]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        work = loop.run_in_executor(None, self._run, lambda item: loop.call_soon_threadsafe(events.put_nowait, item))
        finished = False
        try:
            while (item := await events.get()) is not _END:
                yield item
            self.result = await work
            finished = True
        finally:
            if not finished:
                # Cancelled or abandoned: stop the thread and wait for it, so that the
                # caller's lock is not released while a zombie sampler still holds the model.
                self.cancel()
                await asyncio.shield(asyncio.gather(work, return_exceptions=True))
