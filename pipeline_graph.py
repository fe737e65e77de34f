"""Composition of the MultiTalk Serve application: five stage deployments and the ingress.

``pipeline_graph:build_app`` is a Ray Serve app builder; a serve config passes it ``args``::

    applications:
    - name: multitalk
      import_path: pipeline_graph:build_app
      args:
        models_root: /runpod-volume/models   # "" = tiny random weights generated into cache_dir
        device: auto                         # auto | cpu | cuda
        dtype: bfloat16                      # float32 | bfloat16 | float16
        cache_dir: ~/.cache/multitalk
        store: {bucket: my-bucket, region: eu-west-1, endpoint_url: null, prefix: "", local_root: null}
        ingress: {max_concurrent_jobs: 2, max_queued_jobs: 16, runsync_timeout_s: 120, ...}
        stage_classes: {diffusion: "my_pkg:QuantisedDiffusionStage"}   # optional overrides
        parallel: {sp_degree: 4, ulysses_degree: 4, ring_degree: 1}     # optional: DiT over 4 GPUs
      deployments:          # per-deployment resources, standard Serve overrides
      - name: Diffusion
        num_replicas: 1
        ray_actor_options: {num_gpus: 1}

Store settings fall back to the environment (``AWS_S3_BUCKET_NAME``, ``AWS_REGION``,
``AWS_ENDPOINT_URL``, ``MULTITALK_STORE_DIR``). Resources live in the config's
``deployments`` section, so the same graph serves the CPU default and a GPU cluster.
``app`` is the graph with defaults (``serve run pipeline_graph:app``).
"""
from __future__ import annotations

from typing import Any, Optional

from ray.serve import Application

from deployments.diffusion_parallel import deployment_options as diffusion_deployment_options
from deployments.ingress import MultiTalkIngress
from deployments.stages import AudioEncoder, Diffusion, ImageEncoder, TextEncoder, VaeDecoder

_STAGE_KEYS = ("models_root", "device", "dtype", "cache_dir", "stage_classes", "parallel", "torch_threads",
               "stage_options")
_KNOWN = set(_STAGE_KEYS) | {"store", "ingress"}


def build_app(args: Optional[dict[str, Any]] = None) -> Application:
    """Bind the graph; nothing is loaded until Serve starts the replicas."""
    args = dict(args or {})
    unknown = set(args) - _KNOWN
    if unknown:
        raise ValueError(f"unknown app args {sorted(unknown)}; expected some of {sorted(_KNOWN)}")
    stage_settings = {
        "models_root": args.get("models_root") or "",
        "device": args.get("device") or "auto",
        "dtype": args.get("dtype") or "float32",
        "cache_dir": args.get("cache_dir"),
        "stage_classes": args.get("stage_classes") or {},
        # Diffusion over several GPUs: {cfg_degree, sp_degree, ulysses_degree, ring_degree, backend, ...}
        # (deployments/diffusion_parallel.py); more than one rank gives Diffusion a placement group.
        "parallel": args.get("parallel") or {},
    }
    ingress_settings = {
        **(args.get("ingress") or {}),
        "store": args.get("store") or {},
        "models_root": stage_settings["models_root"],
        "cache_dir": stage_settings["cache_dir"],
    }
    return MultiTalkIngress.bind(
        AudioEncoder.bind(stage_settings),
        ImageEncoder.bind(stage_settings),
        TextEncoder.bind(stage_settings),
        Diffusion.options(**diffusion_deployment_options(stage_settings)).bind(stage_settings),
        VaeDecoder.bind(stage_settings),
        ingress_settings,
    )


app = build_app({})
