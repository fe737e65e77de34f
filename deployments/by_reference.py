"""A stage's result handed on to the next stage by reference, resolved by the replica that reads it.

The ingress hands the encoders' results to the DiT call without fetching them: they are made
on the encoders' replicas and read on the DiT's. Serve can do that itself (a
``DeploymentResponse`` as a top-level argument of the next call), but then a lost input hangs
the job: Ray Serve 2.60's router (``Router._route_and_send_request_once``) passes an upstream
``ActorDiedError`` on at once, while an upstream ``ActorUnavailableError`` (the encoder's
node stopped answering after taking the call) is read as *the DiT replica* being unavailable,
and the DiT call is routed again and again, each time failing the same way. Seen in the
cluster drill (docs/BENCHMARKS.md, "Cluster"): jobs stuck at "encode" after a node died.

So the ingress passes the results' object references inside :class:`ByReference` (Ray does not
resolve references nested in an argument) and the replica resolves them itself
(:func:`resolve`). A result that is gone, whatever Ray calls it, becomes
:class:`~deployments.retry.InputLostError` there; the ingress reads that as a lost input and
re-runs the job, which makes its inputs anew (``deployments/retry.py``). A stage's own error
(a bad input, a bug) passes through unchanged.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import ray
from ray.serve.handle import DeploymentResponse

from .retry import InputLostError, is_transient


@dataclass(frozen=True)
class ByReference:
    """One stage result, by its object reference (owned by the ingress that made the call)."""

    ref: ray.ObjectRef
    what: str = "input"  # for the error message


@contextmanager
def _gone_is_lost(what: str) -> Iterator[None]:
    """Inside: a failure saying the input is gone (is_transient: a dead or unreachable replica,
    a lost object) is raised as :class:`InputLostError` naming ``what``; any other unchanged."""
    try:
        yield
    except Exception as e:
        if is_transient(e):
            raise InputLostError(f"{what} ({type(e).__name__}: {str(e)[:300]})") from e
        raise


async def by_reference(value: Any, what: str = "input") -> Any:
    """A Serve response as a :class:`ByReference` (waits until its call has been assigned to a
    replica, not for its result); any other value unchanged. A failure here is the input's
    too: its call could not be placed."""
    if not isinstance(value, DeploymentResponse):
        return value
    with _gone_is_lost(f"{what}: its stage call could not be placed"):
        return ByReference(await value._to_object_ref(), what)


async def resolve(value: Any) -> Any:
    """The value behind a :class:`ByReference` (fetched into this process); any other value
    unchanged. Raises :class:`InputLostError` when the result is gone: its replica or node
    died or stopped answering, or the object was lost with its node."""
    if not isinstance(value, ByReference):
        return value
    with _gone_is_lost(f"{value.what} is gone"):
        return await value.ref
