"""The one error and retry policy of the serving layer.

Which failures are worth another attempt, and how many attempts a job gets, are decided
here and nowhere else:

* :func:`is_transient`: the failure came from infrastructure that Serve replaces by
  itself: a replica or rank actor that died or could not be reached, or a broken
  sequence-parallel group (:class:`TransientStageError`). A bad input, a bug or an
  out-of-memory error is not transient: it would fail the same way again.
* :class:`RetryBudget`: the attempts one job may spend, shared by both places that
  retry, so that they never multiply: a failed Diffusion or VaeDecoder call is re-sent
  in place (chunk level, ``deployments.serve_stages``), and a job whose failure cannot be
  retried in place (an encoder's result, handed un-awaited to the DiT call, is gone with
  its replica or node: :class:`InputLostError`, or any lost object) is re-run from the
  start (job level, ``deployments.runner``). Both draw from the same budget: retries go on
  for ``stage_retry_window_s`` after the job's first transient failure (default 150 s),
  waiting 1, 2, 4, 8, then 15 s between them, and at most ``max_stage_retries`` times
  (default 16).

Why a window: a call to a replica on a machine that died either hangs or fails fast
(the actor unreachable) until Ray's health checks declare the node dead, 20-55 s with
Ray's defaults (``health_check_period_ms`` 3 s, ``health_check_timeout_ms`` 10 s,
``health_check_failure_threshold`` 5), and Serve only then stops routing to it. Retries
must outlast that (the cluster drills, ``bench/cluster.py``); once Serve knows, a call waits
in its router for a replacement replica however long it takes to start, without failing:
the job's deadline (``job_timeout_s``), not the retries, has to cover a cold start. A
cluster with slower health checks needs a longer window (docs/DEPLOY.md).

Ray wraps an exception raised in another process (``RayTaskError`` with ``.cause``), so
every check walks the cause chain (:func:`cause_chain`).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Iterator, Optional

from multitalk.api import InputError

logger = logging.getLogger("multitalk.serve")

# Ray's errors for a dead or unreachable actor / replica / node (matched by class name:
# the ingress must not need Ray's exception classes to classify a failure).
DEAD_REPLICA_ERRORS = frozenset({
    "RayActorError", "ActorDiedError", "ActorUnavailableError", "ReplicaUnavailableError",
    "DeploymentUnavailableError", "NodeDiedError", "WorkerCrashedError", "OwnerDiedError",
})
# A stage call's input is gone: an object lost with its node (e.g. the motion frames the decoder
# hands to the next chunk's encoder; ObjectReconstructionFailedError, OwnerDiedError,
# ObjectFetchTimedOutError are all ObjectLostErrors), or an encoder result the DiT replica could
# not fetch (InputLostError). Re-sending the same call cannot help; re-running the job makes its
# inputs anew.
LOST_INPUT_ERRORS = frozenset({"ObjectLostError", "InputLostError"})


class TransientStageError(RuntimeError):
    """A stage failure that another attempt can fix (e.g. a sequence-parallel rank died:
    the replica is unhealthy and Serve replaces it)."""

    def __reduce__(self):  # keep the type and message through Ray's pickling
        return (type(self), (str(self),))


class InputLostError(TransientStageError):
    """An input a stage replica resolves itself (``deployments/by_reference.py``) is gone:
    the replica or node that made it died or stopped answering. A lost input (see
    LOST_INPUT_ERRORS): the job is re-run."""


def cause_chain(exc: Optional[BaseException], limit: int = 8) -> Iterator[BaseException]:
    """``exc`` and what it wraps: Ray's ``.cause``, then ``__cause__``/``__context__``."""
    seen = 0
    while exc is not None and seen < limit:
        yield exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        seen += 1


def _error_names(e: BaseException) -> set[str]:
    return {c.__name__ for c in type(e).__mro__}


def is_transient(exc: BaseException) -> bool:
    """Whether retrying can fix ``exc``: a dead/unreachable replica, a lost input object or
    a broken rank group."""
    for e in cause_chain(exc):
        names = _error_names(e)
        if names & (DEAD_REPLICA_ERRORS | LOST_INPUT_ERRORS) or "TransientStageError" in names:
            return True
        if isinstance(e, InputError):
            return False
    return False


def lost_input(exc: BaseException) -> bool:
    """Whether ``exc`` says an input object of the call is gone (see LOST_INPUT_ERRORS)."""
    return any(_error_names(e) & LOST_INPUT_ERRORS for e in cause_chain(exc))


def input_error_in(exc: BaseException) -> Optional[InputError]:
    """The :class:`InputError` inside ``exc`` (raised in a stage replica), if any."""
    for e in cause_chain(exc):
        if isinstance(e, InputError):
            return e
    return None


@dataclass
class RetryBudget:
    """The retries one job may spend (see the module docstring); not thread-safe (one job's
    calls run on one event loop)."""

    retries: int = 16
    backoff_s: float = 1.0
    max_backoff_s: float = 15.0
    window_s: Optional[float] = 150.0  # retry for this long after the first transient failure
    used: int = 0
    first_failure: Optional[float] = None  # time.monotonic() of the first transient failure

    def next_delay(self, exc: BaseException, resend: bool = False) -> Optional[float]:
        """Seconds to wait before retrying after ``exc``, or ``None``: do not retry
        (not transient, or the budget is spent). Spends one retry when it answers.
        ``resend``: the retry would send the same call again (in place), which cannot bring
        back a lost input: that failure goes up to the job, which is re-run."""
        if not is_transient(exc) or (resend and lost_input(exc)):
            return None
        now = time.monotonic()
        if self.first_failure is None:
            self.first_failure = now
        if self.used >= self.retries or (self.window_s is not None and now - self.first_failure > self.window_s):
            return None
        self.used += 1
        return min(self.backoff_s * 2 ** (self.used - 1), self.max_backoff_s)

    async def run(self, what: str, call: Callable[[], Awaitable[Any]],
                  on_retry: Optional[Callable[[BaseException, float], None]] = None, resend: bool = False) -> Any:
        """``await call()``, called again after each transient failure while retries remain
        (``resend``: a call re-sent in place, see :meth:`next_delay`)."""
        while True:
            try:
                return await call()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - only transient failures are retried
                delay = self.next_delay(e, resend)
                if delay is None:
                    raise
                logger.warning("%s failed (%s: %s); retry %d/%d in %.0f s", what, type(e).__name__,
                               str(e)[:200], self.used, self.retries, delay)
                if on_retry is not None:
                    on_retry(e, delay)
                await asyncio.sleep(delay)
