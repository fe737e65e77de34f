"""The application's entry point: the ``MultiTalkIngress`` deployment.

It owns one :class:`~deployments.service.JobService` (over deployment handles of the five
stages, :class:`~deployments.serve_stages.ServeStages`), serves the HTTP API
(``deployments/routes``) and offers handle methods to other Ray apps::

    handle = serve.get_app_handle("multitalk")
    status = handle.generate.remote(JobRequest(...)).result()   # runs a job to the end
    status = handle.submit.remote({...}).result()               # returns at once
"""
from __future__ import annotations

import logging
from typing import Optional, Union

from ray import serve

from .routes import create_app
from .live_settings import LiveSettings, check_one_place
from .schemas import JobRequest, JobStatus
from .serve_stages import ServeStages
from .service import JobService, ServiceSettings
from .storage import store_from_settings

logger = logging.getLogger("multitalk.serve")


def live_ingress_replicas():
    """In a replica: a function listing the ids of this deployment's replicas the cluster
    still runs (their actors are alive in the GCS; ``None`` outside Serve). Job records name
    their owner by this id (``deployments/leases.py``)."""
    try:
        ctx = serve.get_replica_context()
    except Exception:  # noqa: BLE001 - outside a replica (tests)
        return None
    prefix = f"SERVE_REPLICA::{ctx.app_name}#{ctx.deployment}#"

    def live() -> set[str]:
        import ray

        return {a["name"][len(prefix):] for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(prefix)}

    return live


@serve.deployment(ray_actor_options={"num_cpus": 0.25}, max_ongoing_requests=64)
@serve.ingress()
class MultiTalkIngress:
    """HTTP routes plus handle methods; handles are trusted in-cluster callers, who may
    name the ``tenant`` a job runs as."""

    def __init__(self, audio, image, text, diffusion, decode, speech, settings: Optional[dict] = None):
        from .metrics import replica_logging

        replica_logging()  # the [job <id>] lines into this replica's Serve log
        settings = dict(settings or {})
        store = store_from_settings(settings.pop("store", None))
        self._live_args = settings.pop("live_args", {})  # the live settings the app args set
        if "replica_id" not in settings:
            # Serve's own replica id: job records name their owner as Serve's logs and
            # actor names do (SERVE_REPLICA::<app>#MultiTalkIngress#<id>).
            try:
                settings["replica_id"] = serve.get_replica_context().replica_id.unique_id
            except Exception:  # noqa: BLE001 - outside a replica (tests): a random id
                pass
        self.service = JobService(store=store, stages=ServeStages(audio, image, text, diffusion, decode, speech),
                                  settings=ServiceSettings.from_dict(settings), live_replicas=live_ingress_replicas())
        logger.info("ingress replica %s: store %s", self.service.settings.replica_id, store.describe())

    def reconfigure(self, user_config: dict) -> None:
        """Serve's ``user_config``: the live settings (``deployments/live_settings.py``),
        applied without a restart; a bad one fails the deploy, naming the field."""
        check_one_place(self._live_args, user_config, "MultiTalkIngress")
        live = LiveSettings.model_validate(user_config or {})
        self.service.apply_live(live)
        logger.info("live settings applied: presets %s, request defaults %s, LoRAs %s, limits %s",
                    sorted(live.presets), live.request_defaults, sorted(live.loras),
                    "set" if live.limits is not None else "the model's defaults")

    def __serve_build_asgi_app__(self):
        return create_app(self.service)

    async def submit(self, request: Union[JobRequest, dict], idempotency_key: Optional[str] = None,
                     tenant: Optional[str] = None) -> JobStatus:
        """Queue a job; raises InputError / Overloaded like the HTTP route answers 4xx/429."""
        rec = await self.service.submit(request, idempotency_key, source="handle", tenant=tenant)
        return rec.status()

    async def generate(self, request: Union[JobRequest, dict], idempotency_key: Optional[str] = None,
                       timeout: Optional[float] = None, tenant: Optional[str] = None) -> JobStatus:
        """Run a job to the end and return its final status (COMPLETED/FAILED/CANCELLED)."""
        rec = await self.service.submit(request, idempotency_key, source="handle", tenant=tenant)
        rec = await self.service.wait(rec.id, timeout)
        return (await self.service.refresh_url(rec)).status()

    async def status(self, job_id: str, tenant: Optional[str] = None) -> Optional[JobStatus]:
        """The job's status, or ``None`` when there is no such job."""
        if await self.service.get(job_id) is None:
            return None
        return (await self.service.refresh_url(await self.service.get_for(job_id, tenant))).status()

    async def cancel(self, job_id: str, tenant: Optional[str] = None) -> Optional[JobStatus]:
        """Cancel the job; ``None`` when there is no such job."""
        if await self.service.get(job_id) is None:
            return None
        return (await self.service.cancel(job_id, tenant)).status()
