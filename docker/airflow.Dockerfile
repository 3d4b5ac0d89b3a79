# The Airflow image: apache/airflow 3.3 + this project with its `airflow` and `data` extras (DAGs, pipeline
# package, configs, the Great Expectations gate, DVC, and the docker and cncf.kubernetes providers that the
# training runners use). Every Airflow component runs it (api-server,
# scheduler, dag-processor, triggerer, Celery or Kubernetes-executor workers), and so does the MLflow server in
# docker/docker-compose.yaml (mlflow, boto3 and psycopg2 are all here at the project's pinned versions).
#
#   docker build -f docker/airflow.Dockerfile -t diffuse-airflow:0.1.0 .          (from the repository root)
#
# torch: constraints.txt pins `torch==2.13.0`. The tasks that run inside Airflow workers (ingest, validation,
# evaluation, CPU generation) need torch but no GPU, so the CPU build comes from the PyTorch CPU index
# (2.13.0+cpu satisfies the ==2.13.0 pin; it is the same CPU wheel the development venv uses). GPU work runs
# in the pipeline image (docker/pipeline.Dockerfile) through the docker / kubernetes runners.
ARG AIRFLOW_IMAGE=apache/airflow:3.3.2-python3.11
#checkov:skip=CKV_DOCKER_7:the tag is pinned in ARG AIRFLOW_IMAGE above; checkov does not resolve build args
FROM ${AIRFLOW_IMAGE}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# The image's own user (airflow: uid 50000, gid 0) installs the packages, as the image's docs ask.
USER 50000:0
WORKDIR /opt/diffuse
COPY --chown=airflow:0 pyproject.toml constraints.txt README.md ./
COPY --chown=airflow:0 pipeline ./pipeline
COPY --chown=airflow:0 configs ./configs
COPY --chown=airflow:0 dags ./dags
# the GPU pod template of the kubernetes training runner (RunnerConfig.pod_template, relative to the project)
COPY --chown=airflow:0 infra/k8s ./infra/k8s
# apache-airflow==3.3.2 is named so pip can never move Airflow itself while resolving the project.
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu -c constraints.txt \
        "apache-airflow==3.3.2" -e ".[airflow,data]" "psycopg2-binary" \
    && python -c "import airflow.providers.docker, airflow.providers.cncf.kubernetes, pipeline.orchestration.runners"

ENV AIRFLOW__CORE__DAGS_FOLDER=/opt/diffuse/dags \
    AIRFLOW__CORE__LOAD_EXAMPLES=False
WORKDIR /opt/airflow

# The health of each Airflow component is checked per service (docker-compose.yaml, the Helm chart's probes):
# the same image serves the api-server (HTTP /api/v2/monitor/health), the scheduler (its health server) and
# jobs that have no port (dag-processor, triggerer: `airflow jobs check`). One image-level check cannot fit all.
HEALTHCHECK NONE
