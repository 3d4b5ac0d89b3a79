"""Checkpoints: weights in safetensors, training state kept apart, atomic writes, keep the last K.

    run_dir/checkpoints/step-000500/
        unet.safetensors    raw (trained) weights (vae.safetensors for `diffuse train-vae`)
        ema.safetensors     EMA weights (what the final model ships)
        state.pt            optimizer, LR schedule, EMA counters, RNG states, step, data position
                            (tensors and plain values only: loaded with weights_only=True)

A checkpoint is written into a temporary folder and renamed into place, so a kill at any moment leaves
either the complete checkpoint or none.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and "." not in p.name)


def save_checkpoint(run_dir: Path, step: int, unet_state: dict, ema_state: dict, state: dict,
                    keep_last: int, weights_name: str = "unet") -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:07d}"
    tmp = root / f"step-{step:07d}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.contiguous() for k, v in unet_state.items()}, str(tmp / f"{weights_name}.safetensors"))
    save_file({k: v.contiguous() for k, v in ema_state.items()}, str(tmp / "ema.safetensors"))
    torch.save(state, tmp / "state.pt")
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob("step-*.tmp-*"):  # left by a killed process
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(path: Path, weights_name: str = "unet") -> tuple[dict, dict, dict]:
    """(trained weights, ema weights, training state); a clear error for a missing or corrupt file."""
    path = Path(path)
    try:
        unet = load_file(str(path / f"{weights_name}.safetensors"))
        ema = load_file(str(path / "ema.safetensors"))
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except FileNotFoundError as e:
        raise UserError(f"checkpoint {path} is incomplete: {Path(e.filename or '').name or e} is missing. "
                        "Delete this folder to resume from the one before it.") from None
    except Exception as e:
        raise UserError(f"checkpoint {path} is corrupt ({type(e).__name__}: {e}). "
                        "Delete this folder to resume from the one before it.") from None
    return unet, ema, state


def clear_earlier_run(run_dir: Path, resume: bool, overwrite: bool, outputs: tuple[str, ...],
                      delete: bool = True) -> None:
    """A run folder with an earlier run's checkpoints: an error unless the run resumes it or overwrites it; to
    overwrite, its `outputs` are deleted (`delete`: by the one process that owns the folder)."""
    if resume or not checkpoint_dirs(run_dir):
        return
    if not overwrite:
        raise UserError(f"{run_dir} holds checkpoints of an earlier run: add --resume to continue it, or "
                        f"--overwrite to start again (its {', '.join(outputs)} are deleted)")
    for stale in outputs if delete else ():
        path = Path(run_dir) / stale
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None
