"""Composition of the MultiTalk Serve application: six stage deployments and the ingress.

Uploaded speech goes to AudioEncoder; a job that gives text goes first through Speech
(Kokoro-82M), whose tracks then take the same audio path.

``pipeline_graph:build_app`` is a Ray Serve app builder with typed arguments
(:class:`deployments.app_args.AppArgs`); a serve config passes it ``args``::

    applications:
    - name: multitalk
      import_path: pipeline_graph:build_app
      args:
        models_root: /runpod-volume/models   # "" = tiny random weights generated into cache_dir
        device: auto                         # auto | cpu | cuda
        dtype: bfloat16                      # float32 | bfloat16 | float16
        cache_dir: ~/.cache/multitalk
        stage_options: {diffusion: {batch_guidance: true}}              # per-stage from_pretrained extras
        stage_classes: {diffusion: "my_pkg:QuantisedDiffusionStage"}   # optional overrides
        parallel: {sp_degree: 4, ulysses_degree: 4, ring_degree: 1}     # optional: DiT over 4 GPUs
        store: {bucket: my-bucket, region: eu-west-1, endpoint_url: null, prefix: "", local_root: null}
        ingress: {max_concurrent_jobs: 2, max_queued_jobs: 16, runsync_timeout_s: 120, ...}
      deployments:          # per-deployment resources, standard Serve overrides
      - name: MultiTalkIngress
        user_config: {presets: {...}, request_defaults: {...}, limits: {...}, loras: {...}}  # live settings
      - name: Diffusion
        num_replicas: 1
        ray_actor_options: {num_gpus: 1}

Unknown keys fail the deploy, naming them. Store settings fall back to the environment
(``AWS_S3_BUCKET_NAME``, ``AWS_REGION``, ``AWS_ENDPOINT_URL``, ``MULTITALK_STORE_DIR``).
Resources live in the config's ``deployments`` section, so the same graph serves the CPU
default and a GPU cluster. ``app`` is the graph with defaults (``serve run pipeline_graph:app``).
"""
from __future__ import annotations

from typing import Any, Union

from ray.serve import Application

from deployments.app_args import AppArgs
from deployments.diffusion_parallel import deployment_options as diffusion_deployment_options
from deployments.ingress import MultiTalkIngress
from deployments.stages import AudioEncoder, Diffusion, ImageEncoder, Speech, TextEncoder, VaeDecoder


def build_app(args: Union[AppArgs, dict[str, Any], None] = None) -> Application:
    """Bind the graph; nothing is loaded until Serve starts the replicas. The live settings
    the args give (presets, request defaults, limits, LoRAs) become the initial
    ``user_config`` of the ingress and of Diffusion (``deployments/live_settings.py``)."""
    args = args if isinstance(args, AppArgs) else AppArgs.model_validate(dict(args or {}))
    stage_settings = args.stage_settings()
    diffusion = Diffusion.options(**diffusion_deployment_options(stage_settings),
                                  user_config=args.diffusion_user_config())
    return MultiTalkIngress.options(user_config=args.ingress_user_config()).bind(
        AudioEncoder.bind(stage_settings),
        ImageEncoder.bind(stage_settings),
        TextEncoder.bind(stage_settings),
        diffusion.bind(stage_settings),
        VaeDecoder.bind(stage_settings),
        Speech.bind(stage_settings),
        args.ingress_settings(),
    )


app = build_app({})
