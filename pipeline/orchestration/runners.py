"""Where `retrain` runs the training job: `local` (a subprocess in this venv, the embedded default), `docker`
(DockerOperator with GPU device requests, image from docker/) or `kubernetes` (KubernetesPodOperator with
nvidia.com/gpu limits and the pod template from infra/). The same command runs in all three.

Settings (RunnerConfig in pipeline/config.py) come from the environment (DIFFUSE_RUNNER_*), so a DAG file can
choose its operator at parse time without reading Variables, Connections or the metadata database. The operator
packages (docker, kubernetes) are imported where their runner is built: the other runners do not need them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import RunnerConfig, from_environment

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ENV_PREFIX = "DIFFUSE_RUNNER_"


def runner_config(env: dict[str, str] | None = None) -> RunnerConfig:
    """RunnerConfig (pipeline/config.py) from DIFFUSE_RUNNER_KIND, DIFFUSE_RUNNER_IMAGE, DIFFUSE_RUNNER_GPUS, ..."""
    return from_environment(RunnerConfig, ENV_PREFIX, env, exclusive=True)


def train_command(config: str, dataset: str, run_dir: str, python: str = "python",
                  overrides: list[str] = (), gpus: int = 1, command: str = "train") -> list[str]:
    """The one training command every runner executes (`python -m pipeline.cli train` is `diffuse train`;
    `command` "train-vae" trains the VAE of a latent model instead). RUN_DIR is unique per DAG run, so --resume
    continues a retried job and starts a new one from scratch. With several GPUs, torchrun
    (`python -m torch.distributed.run`) starts one DDP process per GPU (pipeline/training/distributed.py);
    train.batch_size stays the global batch. The VAE trains in one process."""
    sets = [f"data.path={dataset}", f"run_dir={run_dir}", *overrides]
    distributed = gpus > 1 and command == "train"
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus)] if distributed else []
    return [python, *launcher, "-m", "pipeline.cli", command, "--config", config, "--resume",
            *[arg for s in sets for arg in ("--set", s)]]


def vae_run_dir(run_dir: str) -> str:
    """Where a DAG run trains its VAE (`diffuse train-vae`): beside the latent model's run folder."""
    return f"{run_dir}-vae"


def vae_override(run_dir: str) -> str:
    """The training override that makes the model a latent model on the VAE trained for this run."""
    return f"model.vae={vae_run_dir(run_dir)}/vae"


def run_local(config: str, dataset: str, run_dir: str, cwd: Path, overrides: list[str] = (),
              command: str = "train") -> None:
    """Train (or train the VAE: command "train-vae") in a subprocess of this venv; its output streams into the
    task log."""
    cmd = train_command(config, dataset, run_dir, python=sys.executable, overrides=overrides, command=command)
    proc = subprocess.run(cmd, cwd=cwd, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{command} exited with code {proc.returncode}: {' '.join(cmd)}")


def _job_env(rc: RunnerConfig) -> dict[str, str]:
    return {k: os.environ[k] for k in rc.pass_env if k in os.environ}


def docker_operator_kwargs(rc: RunnerConfig, config: str, dataset: str, run_dir: str, command: str = "train",
                           overrides: list[str] = ()) -> dict:
    """Arguments for airflow.providers.docker DockerOperator: GPUs through device_requests."""
    from docker.types import DeviceRequest, Mount

    mounts = [Mount(target=rc.workspace, source=rc.volume, type="bind")] if rc.volume else []
    gpus = [DeviceRequest(count=rc.gpus, capabilities=[["gpu"]])] if rc.gpus else None
    return {
        "image": rc.image, "command": train_command(config, dataset, run_dir, overrides=overrides, gpus=rc.gpus,
                                                    command=command),
        "working_dir": rc.workspace,
        "mounts": mounts, "device_requests": gpus, "environment": _job_env(rc), "docker_url": rc.docker_url,
        "network_mode": rc.network,
        "auto_remove": "success", "mount_tmp_dir": False, "shm_size": 8 * 2**30,
    }


def kubernetes_operator_kwargs(rc: RunnerConfig, config: str, dataset: str, run_dir: str, command: str = "train",
                               overrides: list[str] = ()) -> dict:
    """Arguments for KubernetesPodOperator: the GPU pod template from infra/, nvidia.com/gpu limits."""
    from kubernetes.client import models as k8s

    limits = {"nvidia.com/gpu": str(rc.gpus)} if rc.gpus else {}
    volumes, mounts = [], []
    if rc.volume:
        volumes = [k8s.V1Volume(name="workspace", persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(
            claim_name=rc.volume))]
        mounts = [k8s.V1VolumeMount(name="workspace", mount_path=rc.workspace)]
    cmd = train_command(config, dataset, run_dir, overrides=overrides, gpus=rc.gpus, command=command)
    return {
        "name": f"diffuse-{command}", "namespace": rc.namespace, "image": rc.image, "cmds": cmd[:1],
        "arguments": cmd[1:],
        "pod_template_file": str(PROJECT_ROOT / rc.pod_template),
        "container_resources": k8s.V1ResourceRequirements(limits=limits),
        "env_vars": [k8s.V1EnvVar(name=k, value=v) for k, v in _job_env(rc).items()],
        "volumes": volumes, "volume_mounts": mounts, "get_logs": True, "on_finish_action": "delete_succeeded_pod",
        "startup_timeout_seconds": 900,  # GPU nodes may need to scale up first
    }
