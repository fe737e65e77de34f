"""No silent fallback to the wrong model: a GPU config without real weights, or a MultiTalk
set without its audio adapter, is refused where the decision is made, naming the setting
that would allow it; asked for by name, both still work (the embedded CPU default serves
tiny weights because its config says ``models_root: tiny``)."""
from __future__ import annotations

import shutil
import subprocess
import sys

import pytest
import yaml

import pipeline_graph
from conftest import source_pythonpath
from deployments import volume
from deployments.app_args import AppArgs, StageSettings
from deployments.launcher import default_config_path


def _serve_config(tmp_path, **args) -> str:
    config = yaml.safe_load(default_config_path().read_text())
    config["applications"][0]["args"].update(args)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_multitalk_serve_on_cuda_without_weights_exits_naming_the_setting(tmp_path):
    """``multitalk serve`` with an empty ``models_root`` and ``device: cuda`` exits before
    Ray starts, and says which setting to change."""
    config = _serve_config(tmp_path, models_root="", device="cuda", cache_dir=str(tmp_path / "cache"))
    env = {"PYTHONPATH": source_pythonpath(), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-m", "deployments.cli", "serve", "--config", config, "--port", "0"],
                         capture_output=True, text=True, timeout=180, env=env)
    assert run.returncode == 2, (run.returncode, run.stderr[-2000:])
    assert "models_root is empty and device is 'cuda'" in run.stderr and "models_root: tiny" in run.stderr
    assert "deploying" not in run.stderr  # refused before Ray started


def test_the_weights_choice_at_the_config_and_on_each_replica(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="models_root is empty and device is 'cuda'"):
        pipeline_graph.build_app({"device": "cuda"})
    pipeline_graph.build_app({"device": "cuda", "models_root": "tiny"})  # asked for by name
    pipeline_graph.build_app({"device": "cpu"})  # a CPU: tiny weights, as before
    assert yaml.safe_load(default_config_path().read_text())["applications"][0]["args"]["models_root"] == "tiny"
    # `device: auto` is decided where the device is known: a replica on a GPU node.
    monkeypatch.setattr("deployments.replica.resolve_device", lambda setting: "cuda")
    from deployments.replica import load_replica_stage

    with pytest.raises(ValueError, match="models_root is empty and device is 'cuda'"):
        load_replica_stage("audio", StageSettings(device="auto", cache_dir=str(tmp_path)))
    monkeypatch.setenv("MULTITALK_MODELS_ROOT", "/models")  # the environment's root counts
    assert volume.resolve_models_root({"models_root": ""}, device="cuda") == "/models"


@pytest.fixture(scope="module")
def no_adapter(tiny_official, tmp_path_factory):
    """The tiny official set without ``MeiGen-MultiTalk/`` (a user's typo in a path)."""
    root = tmp_path_factory.mktemp("no-adapter") / "w"
    shutil.copytree(tiny_official, root)
    shutil.rmtree(root / "MeiGen-MultiTalk")
    return root


def test_a_multitalk_set_without_its_adapter_is_refused_unless_allowed(no_adapter):
    from multitalk.checkpoints.discovery import MissingCheckpointError
    from multitalk.stages import DiffusionStage

    from deployments.replica import load_replica_stage

    with pytest.raises(MissingCheckpointError, match="allow_no_lip_sync: true"):
        DiffusionStage.from_pretrained(str(no_adapter))
    settings = {"models_root": str(no_adapter), "device": "cpu", "dtype": "float32", "torch_threads": 1}
    with pytest.raises(MissingCheckpointError, match="allow_no_lip_sync"):  # what the Diffusion replica builds
        load_replica_stage("diffusion", AppArgs(**settings).stage_settings())
    stage = load_replica_stage("diffusion", AppArgs(**settings, allow_no_lip_sync=True).stage_settings())
    assert stage.lip_sync is False  # served on purpose; results say lip_sync: false
