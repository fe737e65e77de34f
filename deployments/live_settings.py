"""Live settings: what a ``serve deploy`` changes without restarting a replica.

Serve hands a deployment's ``user_config`` to its replicas' ``reconfigure`` (right after
start, and again whenever only the ``user_config`` of a redeployed config changed: no new
replica, running jobs go on). Two deployments take live settings:

* ``MultiTalkIngress``: the named presets, the request defaults, the request limits and the
  LoRA names requests may pick (a :class:`LiveSettings`);
* ``Diffusion``: the LoRA files, ``{"loras": {name: file under the models root}}`` (each
  replica reads and checks a new file, and forgets a removed one).

In serve_config.yaml both read one YAML anchor for the LoRAs, so the names the ingress
offers are the files the Diffusion replicas hold. The builder binds the app args' values
(``ingress.presets`` ..., ``loras``) as each deployment's initial ``user_config``; a
deployment-level ``user_config`` in a config file replaces it, as it does for every Serve
deployment option. Setting the same field in both places is refused (:func:`check_one_place`).
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from multitalk.api import Limits

from .request_options import check_layer

LIVE_INGRESS_FIELDS = ("presets", "request_defaults", "limits")


class OptionLayers(BaseModel):
    """Named option sets a request may pick (``preset``) and the server's defaults for the
    fields a request leaves out (deployments/request_options.py), each checked on arrival.
    Shared by the live settings and the service settings they update."""

    model_config = ConfigDict(extra="forbid")

    presets: dict[str, dict[str, Any]] = Field(default_factory=dict)
    request_defaults: dict[str, Any] = Field(default_factory=dict)

    @field_validator("presets")
    @classmethod
    def _known_preset_options(cls, v):
        return {name: check_layer(f"presets.{name}", layer) for name, layer in v.items()}

    @field_validator("request_defaults")
    @classmethod
    def _known_default_options(cls, v):
        return check_layer("request_defaults", v)


class LiveSettings(OptionLayers):
    """The ingress's ``user_config``; unknown keys are refused."""

    limits: Optional[Limits] = None  # None: the served model's default limits
    loras: dict[str, Any] = Field(default_factory=dict)  # name -> file (the names are what the ingress uses)

    @model_validator(mode="after")
    def _presets_name_known_loras(self):
        from multitalk.modules.lora_runtime import normalize_lora_set

        for name, preset in self.presets.items():
            try:
                normalize_lora_set(preset.get("loras"), known=self.loras)
            except ValueError as e:
                raise ValueError(f"presets.{name}: {e}") from None
        return self

    def for_model(self, model: str) -> dict[str, Any]:
        """The ingress's effective values for ``model``: its default limits when none are
        set, its request defaults under the configured ones (``model_defaults``)."""
        limits, defaults = model_defaults(model)
        return {"presets": dict(self.presets), "request_defaults": {**defaults, **self.request_defaults},
                "limits": self.limits if self.limits is not None else limits,
                "lora_names": tuple(sorted(self.loras))}


def model_defaults(model: str) -> tuple[Limits, dict[str, Any]]:
    """The served model's own limits and request defaults (InfiniteTalk: 10 minutes of
    audio, streaming, 9 motion frames, infinitetalk-480); the request and its preset win."""
    if model == "infinitetalk":
        from multitalk.infinitetalk import DEFAULTS, INFINITETALK_LIMITS

        return INFINITETALK_LIMITS, {k: v for k, v in DEFAULTS.items() if k != "frames"}
    return Limits(), {}


def check_one_place(from_args: dict, user_config: dict, deployment: str) -> None:
    """Refuse live fields set both in the app args and, differently, in the deployment's
    ``user_config`` (Serve would silently keep only the ``user_config``)."""
    if from_args and from_args != user_config:
        raise ValueError(
            f"{deployment}: live settings {sorted(from_args)} are set in the app args and the deployment's "
            f"user_config replaces them; keep them in one place (user_config, to change them without a restart)")
