"""Start the Ray Serve application locally (``multitalk serve``) and the end-to-end demo
(``multitalk demo``: serve the embedded CPU default on tiny weights, submit the sample job,
write an mp4).
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

from multitalk.client import JobFailed, RequestRejected, submit

# --- the local server -------------------------------------------------------------------


def default_config_path() -> Path:
    """The embedded CPU config, ``deployments/configs/serve_cpu.yaml``."""
    candidate = Path(__file__).resolve().parent / "configs" / "serve_cpu.yaml"
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(f"{candidate} not found")


def load_serve_config(config: Optional[str] = None, host: Optional[str] = None, port: Optional[int] = None):
    """Parse a Serve config file (default: the embedded CPU one) into ``ServeDeploySchema``,
    with ``host``/``port`` overriding its ``http_options``."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    path = Path(config).expanduser() if config else default_config_path()
    with open(path) as f:
        raw = yaml.safe_load(f) or {}
    http = dict(raw.get("http_options") or {})
    if host is not None:
        http["host"] = host
    if port is not None:
        http["port"] = int(port)
    raw["http_options"] = http
    return ServeDeploySchema.model_validate(raw)


class ConfigError(ValueError):
    """A serve config that must not start; the message names the setting."""


def check_config(schema) -> None:
    """Validate each application's builder arguments before Ray starts, as its builder will
    (``pipeline_graph:build_app`` takes :class:`~deployments.app_args.AppArgs`): a config
    that would serve the wrong model (tiny random weights on a GPU, ...) or has a typo
    fails here, naming the setting, instead of as a failed deploy minutes later."""
    from pydantic import ValidationError

    from .app_args import AppArgs
    from .volume import ENV_MODELS_ROOT

    for app in schema.applications:
        if app.import_path != "pipeline_graph:build_app":
            continue
        args = dict(app.args or {})
        env_vars = (app.runtime_env or {}).get("env_vars") or {}
        if not args.get("models_root") and env_vars.get(ENV_MODELS_ROOT):  # the replicas will see it
            args["models_root"] = env_vars[ENV_MODELS_ROOT]
        try:
            AppArgs.model_validate(args)
        except ValidationError as e:
            problems = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
            raise ConfigError(f"application {app.name!r}: {problems}") from None


def serve_main(config: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000, blocking: bool = True,
               log_to_driver: bool = True):
    """Start a local Ray, deploy the config's applications and block (``multitalk serve``).

    Same mechanism as ``serve run config.yaml``: per-deployment overrides in the config
    (replicas, resources, autoscaling, queue limits) are applied by Serve itself.
    """
    import ray
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions

    schema = load_serve_config(config, host, port)
    check_config(schema)  # before Ray starts: raises ConfigError naming the setting
    # Replicas import `pipeline_graph` / `deployments` by name: make the source tree
    # importable for every worker this Ray starts (inherited through the environment).
    root = str(Path(__file__).resolve().parent.parent)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + paths)
    if not ray.is_initialized():
        ray.init(namespace="serve", log_to_driver=log_to_driver)
    client = serve_api.serve_start(
        http_options=schema.http_options.model_dump(),
        proxy_location=schema.proxy_location,
        grpc_options=gRPCOptions(**schema.grpc_options.model_dump()),
    )
    client.deploy_apps(schema, _blocking=False)
    url = f"http://{schema.http_options.host}:{schema.http_options.port}"
    names = [a.name for a in schema.applications]
    print(f"MultiTalk Serve: deploying {', '.join(names)} at {url} (docs: {url}/docs)", file=sys.stderr)
    if not blocking:
        return url
    try:
        ready = False
        while True:
            time.sleep(2)
            if not ready:
                statuses = serve.status().applications
                if all(statuses.get(n) and statuses[n].status == "RUNNING" for n in names):
                    ready = True
                    print(f"MultiTalk Serve: ready at {url}", file=sys.stderr)
                elif any(statuses.get(n) and statuses[n].status == "DEPLOY_FAILED" for n in names):
                    msg = "; ".join(f"{n}: {statuses[n].message}" for n in names if statuses.get(n))
                    raise RuntimeError(f"deployment failed: {msg}")
    except KeyboardInterrupt:
        print("MultiTalk Serve: shutting down", file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()


# --- the demo ---------------------------------------------------------------------------

# Small enough for a CPU on tiny random weights: one clip at ~128 px, 4 sampler steps.
# The sample speech (multi1/1.wav) lasts 1.76 s = 44 frames, so the clip has 41.
DEMO_OPTIONS = {"frames": 41, "size": "multitalk-128", "sampling": {"steps": 4}}


def _find_fixtures(fixtures: Optional[str]) -> Path:
    candidates = [Path(fixtures).expanduser()] if fixtures else []
    env = os.environ.get("MULTITALK_FIXTURES")
    if env:
        candidates.append(Path(env))
    here = Path(__file__).resolve().parent
    candidates += [here.parent.parent / "shared" / "fixtures", Path.cwd() / "fixtures"]
    for c in candidates:
        if (c / "multi1" / "1.wav").is_file() and (c / "multi1" / "multi1.png").is_file():
            return c
    raise FileNotFoundError(
        "sample inputs not found (multi1/1.wav, multi1/multi1.png); pass --fixtures or set MULTITALK_FIXTURES. "
        f"Looked in: {', '.join(str(c) for c in candidates)}"
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_main(out: str = "outputs/demo.mp4", fixtures: Optional[str] = None, options: Optional[dict] = None,
              config: Optional[str] = None, port: Optional[int] = None, ready_timeout: float = 900.0) -> int:
    """``multitalk demo``: serve locally (embedded CPU config, tiny weights), submit the
    predecessor's sample job (``1.wav`` + ``multi1.png``) over HTTP, write the mp4."""
    import ray
    from ray import serve

    fx = _find_fixtures(fixtures)
    prompt = ""
    try:
        prompt = json.loads((fx / "prompts.json").read_text())["multi1"]["prompt"]
    except (OSError, KeyError, ValueError):
        pass
    url = serve_main(config, host="127.0.0.1", port=port or _free_port(), blocking=False, log_to_driver=False)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:  # replicas load (and generate tiny weights on first use) before answering
            status = serve.status().applications.get("multitalk")
            if status is not None and status.status == "RUNNING":
                break
            if status is not None and status.status == "DEPLOY_FAILED":
                print(f"deployment failed: {status.message}", file=sys.stderr)
                return 1
            if time.monotonic() > deadline:
                print("the application did not become ready in time", file=sys.stderr)
                return 1
            time.sleep(2)
        print(f"MultiTalk Serve: ready at {url}; submitting the sample job", file=sys.stderr)
        try:
            final = submit(url, str(fx / "multi1" / "multi1.png"), str(fx / "multi1" / "1.wav"), prompt=prompt,
                           wait=True, out=out, options={**DEMO_OPTIONS, **(options or {})})
        except (JobFailed, RequestRejected) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        result = final.get("result") or {}
        print(json.dumps({"out": str(out), "job": final["id"], "frames": result.get("frames"),
                          "width": result.get("width"), "height": result.get("height"),
                          "lip_sync": result.get("lip_sync"), "timings": final.get("timings")}, indent=2))
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
