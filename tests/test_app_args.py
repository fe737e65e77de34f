"""The typed app builder: what each bound deployment receives from a serve config.

``pipeline_graph.build_app`` only binds the graph (nothing loads), so the arguments each
deployment will be constructed with can be read off the bound application. These tests
read them for the production GPU config, the embedded CPU config and the KubeRay
RayService, and check that a bad key fails the build, naming it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import pipeline_graph
from deployments.launcher import default_config_path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("AudioEncoder", "ImageEncoder", "TextEncoder", "Diffusion", "VaeDecoder", "Speech")


def _field(settings, name):
    """A setting of a bound deployment's argument (a settings model or a plain dict)."""
    return settings.get(name) if isinstance(settings, dict) else getattr(settings, name)


def bound_arguments(app) -> dict:
    """``{deployment name: its first init argument}`` of the bound graph."""
    ingress = app._bound_deployment
    out = {ingress.name: ingress.init_args[-1]}
    for child in ingress.init_args[:-1]:
        out[child._bound_deployment.name] = child._bound_deployment.init_args[0]
    return out


def _app_args(config: dict) -> dict:
    return config["applications"][0]["args"]


def test_production_config_levers_reach_the_diffusion_deployment():
    args = _app_args(yaml.safe_load((ROOT / "serve_config.yaml").read_text()))
    assert args["stage_options"]["diffusion"]["batch_guidance"] == 40000  # the lever the config sets (a token cap)
    bound = bound_arguments(pipeline_graph.build_app(args))
    assert set(bound) == {"MultiTalkIngress", *STAGES}
    diffusion = bound["Diffusion"]
    assert _field(diffusion, "stage_options")["diffusion"] == {"batch_guidance": 40000}
    assert _field(diffusion, "device") == "cuda" and _field(diffusion, "dtype") is None  # the official per stage
    for name in STAGES:  # every stage gets the whole stage settings, the same for all
        assert _field(bound[name], "models_root") == args["models_root"]
        assert _field(bound[name], "stage_options") == _field(diffusion, "stage_options")
    ingress = bound["MultiTalkIngress"]
    assert ingress["exclusive"] is False and ingress["max_concurrent_jobs"] == 4
    assert ingress["models_root"] == args["models_root"] and ingress["store"] == {"prefix": ""}


def test_cpu_config_and_rayservice_bind_their_settings():
    cpu = _app_args(yaml.safe_load(default_config_path().read_text()))
    bound = bound_arguments(pipeline_graph.build_app(cpu))
    assert _field(bound["Diffusion"], "device") == "cpu" and _field(bound["Diffusion"], "dtype") == "float32"
    assert bound["MultiTalkIngress"]["max_concurrent_jobs"] == 1

    docs = yaml.safe_load_all((ROOT / "k8s" / "rayservice.yaml").read_text())
    service = next(d for d in docs if d and d.get("kind") == "RayService")
    rayservice = _app_args(yaml.safe_load(service["spec"]["serveConfigV2"]))
    bound = bound_arguments(pipeline_graph.build_app(rayservice))
    assert _field(bound["Diffusion"], "stage_options") == rayservice["stage_options"]


@pytest.mark.parametrize("args, named", [
    ({"modelsroot": "/typo"}, "modelsroot"),
    ({"stage_options": {"diffusion": {"batch_guidence": True}}}, "batch_guidence"),
    ({"stage_options": {"difusion": {}}}, "difusion"),
    ({"ingress": {"max_queued_job": 1}}, "max_queued_job"),
    ({"ingress": {"limits": {"max_step": 1}}}, "max_step"),
    ({"parallel": {"sp": 2}}, "sp"),
    ({"store": {"buckett": "x"}}, "buckett"),
])
def test_unknown_keys_fail_the_build_naming_them(args, named):
    with pytest.raises(ValueError, match=named):
        pipeline_graph.build_app(args)


def test_stage_options_dtype_overrides_one_stage():
    from deployments.app_args import AppArgs

    args = AppArgs.model_validate({"dtype": "bfloat16", "stage_options": {"audio": {"dtype": "float32"},
                                                                        "decode": {"tiled": True}}})
    settings = args.stage_settings()
    assert AppArgs().stage_settings().options_for("text") == (None, {})  # unset: the stage's official dtype
    assert settings.options_for("audio") == ("float32", {})
    assert settings.options_for("decode") == ("bfloat16", {"tiled": True})
    assert settings.options_for("diffusion") == ("bfloat16", {})
