"""Typed arguments of the application builder (``pipeline_graph:build_app``).

A serve config's ``args`` are validated into :class:`AppArgs` before anything is bound
(Ray Serve's typed app-builder pattern): an unknown key anywhere, a stage name that does
not exist or a stage option its class does not take fails the deploy, naming it. What the
stage deployments receive is :class:`StageSettings`, whole; the ingress receives
:class:`~deployments.service.ServiceSettings` plus the store settings.

    args:
      models_root: /models          # or s3://bucket/prefix; `tiny`: tiny random weights generated into cache_dir
                                    # ("" means tiny weights too, but only on a CPU: refused with device cuda)
      device: auto                  # auto | cpu | cuda
      allow_no_lip_sync: false      # true: serve a set without the MultiTalk adapter as plain WAN 2.1 I2V
      dtype: null                   # null: each stage's official dtype on its device (multitalk/precision.py);
                                    # a name: every stage; stage_options.<stage>.dtype overrides one
      stage_options: {diffusion: {batch_guidance: true, compile: true}, decode: {tiled: true}}
      loras: {lightx2v: loras/lightx2v_i2v_480p.safetensors}   # LoRAs a request may pick by name
      model: multitalk              # or infinitetalk (any length, video-to-video dubbing)
      parallel: {sp_degree: 4}      # Diffusion over several GPUs (deployments/diffusion_parallel.py)
      store: {bucket: my-bucket, region: eu-west-1}
      ingress: {max_concurrent_jobs: 4, limits: {max_steps: 60}}
"""
from __future__ import annotations

import inspect
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .live_settings import LIVE_INGRESS_FIELDS, LiveSettings
from .service import ServiceSettings

StageName = Literal["audio", "image", "text", "diffusion", "decode", "speech"]
STAGE_NAMES: tuple[str, ...] = ("audio", "image", "text", "diffusion", "decode", "speech")


# Latent frames of the standard 81-frame clip (1 + 80/4): what the ring check uses at deploy time.
DEFAULT_LATENT_FRAMES = 21


class ParallelSettings(BaseModel):
    """App arg ``parallel`` (see the module docstring); unknown keys are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sp_degree: int = 1
    cfg_degree: int = 1  # rank groups that split each step's guidance passes (1, 2 or 3)
    ulysses_degree: Optional[int] = None  # default: sp_degree // ring_degree
    ring_degree: int = 1
    backend: str = "auto"
    cpus_per_rank: float = 1.0
    gpus_per_rank: Optional[float] = None  # None: 1 on a GPU device, 0 on CPU
    replica_cpus: float = 0.5
    health_check_period_s: float = 2.0
    latent_frames: int = DEFAULT_LATENT_FRAMES

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, raw):
        if isinstance(raw, dict):
            unknown = set(raw) - set(cls.model_fields)
            if unknown:
                raise ValueError(f"unknown parallel settings {sorted(unknown)}; expected some of "
                                 f"{sorted(cls.model_fields)}")
        return raw

    @model_validator(mode="after")
    def _positive(self):
        if self.sp_degree < 1 or self.ring_degree < 1 or self.cfg_degree < 1:
            raise ValueError(f"sp_degree ({self.sp_degree}), ring_degree ({self.ring_degree}) and cfg_degree "
                             f"({self.cfg_degree}) must be >= 1")
        return self

    @classmethod
    def from_settings(cls, settings: Any) -> "ParallelSettings":
        """From stage settings (a :class:`~deployments.app_args.StageSettings` or a dict)."""
        raw = settings.get("parallel") if isinstance(settings, dict) else getattr(settings, "parallel", None)
        return raw if isinstance(raw, cls) else cls.model_validate(dict(raw or {}))

    @property
    def ranks(self) -> int:
        """Rank actors (and GPUs) of one Diffusion replica."""
        return self.cfg_degree * self.sp_degree

    @property
    def ulysses(self) -> int:
        return self.ulysses_degree if self.ulysses_degree is not None else max(1, self.sp_degree // self.ring_degree)

    def gpus(self, device: str) -> float:
        if self.gpus_per_rank is not None:
            return float(self.gpus_per_rank)
        return 1.0 if device.startswith("cuda") else 0.0


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
    # None: each stage's official dtype for its device (on CUDA DiT and UMT5 bf16, CLIP fp16,
    # VAE and wav2vec2 fp32; fp32 on CPU; multitalk/precision.py). A name: every stage.
    dtype: Optional[str] = None
    cache_dir: Optional[str] = None
    # Other implementations of a stage ("module:Class" with the same interface).
    stage_classes: dict[StageName, str] = Field(default_factory=dict)
    # Per-stage extra from_pretrained arguments; "dtype" here overrides ``dtype`` for that stage.
    stage_options: dict[StageName, dict[str, Any]] = Field(default_factory=dict)
    parallel: ParallelSettings = Field(default_factory=ParallelSettings)
    torch_threads: Optional[int] = None  # default: the replica's CPU share, rounded up

    def options_for(self, stage: str) -> tuple[Optional[str], dict[str, Any]]:
        """``(dtype or None for the stage's default, other from_pretrained options)`` of one stage."""
        options = dict(self.stage_options.get(stage) or {})
        return options.pop("dtype", self.dtype), options

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
    """The builder's ``args``: the stage settings plus the ingress's and the store's, and
    the LoRAs requests may pick by name (``loras: {name: file under the models root}``:
    the Diffusion replicas load them once beside the base, applied per job without a
    reload; the ingress refuses other names with a 422 at submit)."""

    store: StoreSettings = Field(default_factory=StoreSettings)
    ingress: ServiceSettings = Field(default_factory=ServiceSettings)
    loras: dict[str, str] = Field(default_factory=dict)
    # The model served: MultiTalk, or InfiniteTalk (same base and DiT, its own adapters and
    # chunk loop: any length, video-to-video dubbing). Its Diffusion replicas load that
    # model; its ingress runs that loop, with its limits and request defaults.
    model: Literal["multitalk", "infinitetalk"] = "multitalk"
    # A models root without the MultiTalk adapter is refused (the Diffusion replica fails to
    # start, naming this setting) unless this says to serve plain WAN 2.1 I2V on purpose.
    allow_no_lip_sync: bool = False

    @model_validator(mode="after")
    def _real_weights_on_a_gpu(self):
        """No tiny random weights on a GPU unless asked for by name (``deployments/volume.py``)."""
        from .volume import check_weights_choice, models_root_setting

        check_weights_choice(models_root_setting({"models_root": self.models_root}), self.device)
        return self

    @model_validator(mode="after")
    def _model_everywhere(self):
        if self.model != "multitalk":
            self.ingress = self.ingress.model_copy(update={"model": self.model})
        return self

    @model_validator(mode="after")
    def _live_settings_valid(self):
        self.live_settings()  # presets naming unknown LoRAs etc. fail the build, naming them
        return self

    def live_settings(self) -> LiveSettings:
        """The live settings the args set (``ingress.presets``, ``request_defaults``,
        ``limits`` and ``loras``): the deployments' initial ``user_config``
        (``deployments/live_settings.py``); what the args leave out stays unset."""
        given = {f: getattr(self.ingress, f) for f in LIVE_INGRESS_FIELDS if f in self.ingress.model_fields_set}
        if self.loras:
            given["loras"] = dict(self.loras)
        return LiveSettings(**given)

    def ingress_user_config(self) -> dict[str, Any]:
        return self.live_settings().model_dump(mode="json", exclude_unset=True)

    def diffusion_user_config(self) -> dict[str, Any]:
        return {"loras": dict(self.loras)}

    def stage_settings(self) -> StageSettings:
        settings = StageSettings.model_validate(self.model_dump(include=set(StageSettings.model_fields)))
        extra = {**({"lora_registry": dict(self.loras)} if self.loras else {}),
                 **({"model": self.model} if self.model != "multitalk" else {}),
                 **({"allow_no_lip_sync": True} if self.allow_no_lip_sync else {})}
        if extra:
            options = dict(settings.stage_options)
            options["diffusion"] = {**options.get("diffusion", {}), **extra}
            settings = settings.model_copy(update={"stage_options": options})
        return settings

    def ingress_settings(self) -> dict[str, Any]:
        """The ingress deployment's settings: its own (less the live ones, which come
        through ``user_config``), the store, the models root it reports on, and the live
        settings the args set (``live_args``: refused if a config's ``user_config``
        replaces them with other values)."""
        return {
            **self.ingress.model_dump(exclude_unset=True, exclude=set(LIVE_INGRESS_FIELDS)),
            "store": self.store.model_dump(exclude_none=True),
            "models_root": self.models_root,
            "cache_dir": self.cache_dir,
            "live_args": self.ingress_user_config(),
        }
