"""Typed arguments of the application builder (``pipeline_graph:build_app``).

A serve config's ``args`` are validated into :class:`AppArgs` before anything is bound
(Ray Serve's typed app-builder pattern): an unknown key anywhere, a stage name that does
not exist or a stage option its class does not take fails the deploy, naming it. What the
stage deployments receive is :class:`StageSettings`, whole; the ingress receives
:class:`~deployments.service.ServiceSettings` plus the store settings.

    args:
      models_root: /models          # "" = tiny random weights generated into cache_dir
      device: auto                  # auto | cpu | cuda
      dtype: bfloat16               # every stage; stage_options.<stage>.dtype overrides one
      stage_options: {diffusion: {batch_guidance: true, compile: true}, decode: {tiled: true}}
      parallel: {sp_degree: 4}      # Diffusion over several GPUs (deployments/diffusion_parallel.py)
      store: {bucket: my-bucket, region: eu-west-1}
      ingress: {max_concurrent_jobs: 4, limits: {max_steps: 60}}
"""
from __future__ import annotations

import inspect
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .diffusion_parallel import ParallelSettings
from .service import ServiceSettings

StageName = Literal["audio", "image", "text", "diffusion", "decode"]
STAGE_NAMES: tuple[str, ...] = ("audio", "image", "text", "diffusion", "decode")


class StoreSettings(BaseModel):
    """Where inputs, job records and videos live (``deployments/storage.py``); empty
    fields fall back to the environment (``AWS_S3_BUCKET_NAME``, ``AWS_REGION``,
    ``AWS_ENDPOINT_URL``, ``MULTITALK_STORE_DIR``)."""

    model_config = ConfigDict(extra="forbid")

    bucket: Optional[str] = None
    region: Optional[str] = None
    endpoint_url: Optional[str] = None
    prefix: str = ""
    local_root: Optional[str] = None


class StageSettings(BaseModel):
    """What every stage deployment (and every Diffusion rank actor) is built from."""

    model_config = ConfigDict(extra="forbid")

    models_root: str = ""
    device: str = "auto"
    dtype: str = "float32"
    cache_dir: Optional[str] = None
    # Other implementations of a stage ("module:Class" with the same interface).
    stage_classes: dict[StageName, str] = Field(default_factory=dict)
    # Per-stage extra from_pretrained arguments; "dtype" here overrides ``dtype`` for that stage.
    stage_options: dict[StageName, dict[str, Any]] = Field(default_factory=dict)
    parallel: ParallelSettings = Field(default_factory=ParallelSettings)
    torch_threads: Optional[int] = None  # default: the replica's CPU share, rounded up

    def options_for(self, stage: str) -> tuple[str, dict[str, Any]]:
        """``(dtype, other from_pretrained options)`` of one stage."""
        options = dict(self.stage_options.get(stage) or {})
        return str(options.pop("dtype", self.dtype)), options

    @model_validator(mode="after")
    def _options_exist(self):
        """Each stage option must be a parameter of that stage class's ``from_pretrained``
        (checked here, at deploy time, rather than when a replica starts)."""
        from multitalk.stage_factory import stage_class

        for stage, options in self.stage_options.items():
            cls = stage_class(stage, self.stage_classes)
            params = inspect.signature(cls.from_pretrained).parameters
            if any(p.kind is p.VAR_KEYWORD for p in params.values()):
                continue
            unknown = sorted(set(options) - set(params) - {"dtype"})
            if unknown:
                raise ValueError(f"stage_options.{stage}: {cls.__name__}.from_pretrained takes no option(s) "
                                 f"{unknown}; it takes {sorted(set(params) - {'cls', 'models', 'device'})}")
        return self


class AppArgs(StageSettings):
    """The builder's ``args``: the stage settings plus the ingress's and the store's."""

    store: StoreSettings = Field(default_factory=StoreSettings)
    ingress: ServiceSettings = Field(default_factory=ServiceSettings)

    def stage_settings(self) -> StageSettings:
        return StageSettings.model_validate(self.model_dump(include=set(StageSettings.model_fields)))

    def ingress_settings(self) -> dict[str, Any]:
        """The ingress deployment's settings: its own, the store, and the models root it reports on."""
        return {
            **self.ingress.model_dump(exclude_unset=True),
            "store": self.store.model_dump(exclude_none=True),
            "models_root": self.models_root,
            "cache_dir": self.cache_dir,
        }
