# syntax=docker/dockerfile:1
# MultiTalk Serve: CUDA runtime + Python 3.11 + CUDA torch + this project ([parallel] extra).
# Weights are NOT in the image: mount them (MULTITALK_MODELS_ROOT=/models) or give an
# s3://bucket/prefix that replicas mirror into MULTITALK_CACHE_DIR (node-local disk).
#
#   docker build -t multitalk-serve:0.1.0 .
#   docker run --gpus all -p 8000:8000 -v /data/models:/models:ro \
#       -e MULTITALK_MODELS_ROOT=/models -e AWS_S3_BUCKET_NAME=my-bucket multitalk-serve:0.1.0
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.8.17

FROM ${UV_IMAGE} AS uv

FROM ${CUDA_IMAGE}

ARG PYTHON_VERSION=3.11
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# Ray on the cluster = Ray in the image = k8s/rayservice.yaml rayVersion = your laptop's `ray up`.
ARG RAY_VERSION=2.60.0

ENV DEBIAN_FRONTEND=noninteractive \
    LANG=C.UTF-8 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    UV_NO_CACHE=1 \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_LINK_MODE=copy \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# wget: the HEALTHCHECK and KubeRay's probes; rsync/openssh-client: the Ray cluster launcher.
# ffmpeg comes with imageio-ffmpeg (a static binary in the wheel), no apt ffmpeg needed.
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Unpinned on purpose: the base image is pinned, and these get the release's security fixes.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates wget rsync openssh-client tini \
 && rm -rf /var/lib/apt/lists/* \
 && (userdel -r ubuntu 2>/dev/null || true) \
 && useradd --create-home --uid 1000 --shell /bin/bash ray \
 && mkdir -p /app /models /cache \
 && chown ray:ray /app /models /cache

# Python 3.11 (python-build-standalone, via uv) in a venv owned by root, read-only for the app.
COPY --from=uv /uv /usr/local/bin/uv
RUN uv venv --python "${PYTHON_VERSION}" "${VIRTUAL_ENV}" \
 && uv pip install --python "${VIRTUAL_ENV}/bin/python" --index-url "${TORCH_INDEX}" "torch==${TORCH_VERSION}"

WORKDIR /app

# Dependencies first (cached while only the sources change): the metadata and empty packages.
# The CUDA torch above already satisfies "torch>=2.4" and is kept (checked below).
COPY pyproject.toml README.md ./
RUN mkdir -p multitalk deployments \
 && touch multitalk/__init__.py deployments/__init__.py pipeline_graph.py \
 && uv pip install --python "${VIRTUAL_ENV}/bin/python" ".[parallel]" "ray[serve]==${RAY_VERSION}" \
 && rm -rf multitalk deployments pipeline_graph.py build ./*.egg-info \
 && python -c "import torch; assert torch.version.cuda, torch.__version__; print(torch.__version__)"

# Optional flash attention (diffusers' "flash" attention backend), only where a prebuilt wheel
# matches this torch/CUDA: building it from source takes an hour. SDPA (cuDNN/flash kernels
# inside torch) is the default either way.
ARG INSTALL_FLASH_ATTN=0
RUN if [ "${INSTALL_FLASH_ATTN}" = "1" ]; then \
      uv pip install --python "${VIRTUAL_ENV}/bin/python" --only-binary=:all: flash-attn \
      || echo "no prebuilt flash-attn wheel for this torch/CUDA: using SDPA"; \
    fi

# The project itself (no dependency changes: --no-deps).
COPY multitalk ./multitalk
COPY deployments ./deployments
COPY pipeline_graph.py serve_config.yaml ./
RUN uv pip install --python "${VIRTUAL_ENV}/bin/python" --no-deps . \
 && rm -rf build ./*.egg-info \
 && python -c "import pipeline_graph, multitalk.checkpoints.remote, imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())"

ENV MULTITALK_MODELS_ROOT=/models \
    MULTITALK_CACHE_DIR=/cache \
    HOME=/home/ray

# Numeric, so that Kubernetes' runAsNonRoot can verify it (uid 1000 = ray).
USER 1000:1000
EXPOSE 8000 8265 6379

HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
  CMD ["/bin/sh", "-c", "wget -q -T 4 -O /dev/null http://127.0.0.1:8000/healthz || exit 1"]

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["multitalk", "serve", "--config", "/app/serve_config.yaml", "--host", "0.0.0.0", "--port", "8000"]
