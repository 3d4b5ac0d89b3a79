"""The model card of a registered version: what it was trained on and how, its evaluation, and its limits.
Written as the version's description and as a run artifact (with the sample grid inline)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from pipeline.data.prepared import is_prepared, open_prepared
from pipeline.images import data_uri
from pipeline.shapes.dataset import BACKGROUNDS, COLOURS, HELD_OUT_PAIRS, SHAPES, SIZES


def inline_grid(report: dict) -> str:
    """The evaluation's sample grid as markdown with the image inline (empty without a grid)."""
    grid = report["details"].get("sample_grid")
    if grid is None:
        return ""
    return f"\n\n## Sample grid (evaluation prompts, fixed seeds)\n\n![sample grid]({data_uri(grid)})\n"


def _data_statistics(tags: dict, report: dict) -> list[str]:
    path = Path(tags.get("dataset_path") or report["protocol"]["data"])
    lines = [f"- path: `{path}` ({tags.get('dataset_kind', 'unknown kind')})",
             f"- version: `{tags.get('dataset_version', 'unknown')}`"]
    if tags.get("dataset_dvc_md5"):
        lines.append(f"- DVC md5: `{tags['dataset_dvc_md5']}`")
    captions: list[str] = []
    try:
        if is_prepared(path):
            ds = open_prepared(path)
            m = ds.manifest
            counts = m["split"].value_counts().to_dict() if "split" in m.columns else {}
            lines.append(f"- items: {len(ds)} ({', '.join(f'{k}: {v}' for k, v in sorted(counts.items()))}), "
                         f"quarantined: {len(ds.quarantine())}, resolution {ds.resolution}")
            captions = m["caption"].tolist()
        elif (path / "metadata.jsonl").is_file():
            recs = [json.loads(x) for x in (path / "metadata.jsonl").read_text().splitlines() if x.strip()]
            captions = [str(r.get("text", "")) for r in recs]
            lines.append(f"- items: {len(recs)} (imagefolder)")
    except Exception as e:  # the card is still written without statistics
        lines.append(f"- statistics unavailable: {type(e).__name__}: {e}")
    if captions:
        lines.append(f"- unique captions: {len(set(captions))}")
    lines.append(f"- evaluation: {report['protocol']['heldout_items']} held-out items "
                 f"({report['protocol']['heldout_rule']})")
    lines.append("")
    lines.append("**Concepts the data covers** (the model knows nothing else):")
    if report["protocol"].get("shapes_scorer") != "off" and "adherence" in report["metrics"]:
        lines.append(f"colours {', '.join(COLOURS)}; shapes {', '.join(SHAPES)}; sizes "
                     f"{', '.join(SIZES)}; positions on a 3x3 grid; backgrounds {', '.join(BACKGROUNDS)}."
                     f" Colour x shape pairs never seen in training: "
                     f"{', '.join(' '.join(p) for p in sorted(HELD_OUT_PAIRS))}.")
    elif captions:
        words = Counter(w for c in captions for w in c.lower().split() if len(w) > 3)
        lines.append("most frequent caption words: " + ", ".join(w for w, _ in words.most_common(30)) + ".")
    return lines


def _normalisation(vae: dict) -> str:
    if vae.get("latents_mean"):
        return "per-channel latent mean and std"
    return f"scaling factor {vae['scaling_factor']:.4f}" + (f", shift {vae['shift_factor']}" if vae.get("shift_factor")
                                                             else "")


def _space(report: dict) -> str:
    """What the UNet denoises: pixels, or the latents of which VAE (copied into the model folder as vae/)."""
    vae = report.get("vae")
    if not vae:
        return "pixel space"
    return (f"latent space of the VAE {vae['source']} (sha256 {vae['sha256'][:12]}, {vae['downsample']}x "
            f"downsampling, {vae['latent_channels']} channels, {_normalisation(vae)}); the "
            "model folder carries it as vae/")


def model_card(name: str, version_: str, run_id: str, tags: dict, report: dict) -> str:
    cfg = report.get("train_config") or {}
    data, ctx, model, train, diff = (cfg.get(k, {}) for k in ("data", "context", "model", "train", "diffusion"))
    metric_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(report["metrics"].items()))
    skipped = "\n".join(f"- {k}: {v}" for k, v in sorted(report["skipped"].items())) or "- none"
    p = report["protocol"]
    dirty = " (uncommitted changes)" if tags.get("git_dirty") == "true" else ""
    return "\n".join([
        f"# {name} v{version_}",
        "",
        f"Text-to-image diffusion model (diffusers UNet2DConditionModel). Run `{run_id}`, git "
        f"`{tags.get('git_commit', 'unknown')[:12]}`{dirty}.",
        "",
        "## Data",
        *_data_statistics(tags, report),
        "",
        "## Training",
        f"- {data.get('resolution')}x{data.get('resolution')} px; context: {ctx.get('encoder')} "
        f"({ctx.get('max_length')} tokens, attach {ctx.get('attach')}, CFG dropout {ctx.get('cfg_dropout')})",
        f"- UNet {model.get('block_out_channels')} x {model.get('layers_per_block')} layers, attention "
        f"{model.get('attention_levels')}, patch {model.get('patch_size')}",
        f"- {_space(report)}",
        f"- {diff.get('prediction_type')}, {diff.get('beta_schedule')}, loss weighting {diff.get('loss_weighting')}",
        f"- {train.get('max_steps')} steps, batch {train.get('batch_size')} x {train.get('grad_accum')}, "
        f"lr {train.get('lr')}, EMA {train.get('ema_decay')}; full config: run artifact `config.yaml`",
        "",
        f"## Evaluation (protocol `{report['protocol_id']}`)",
        f"{p['sampler']}, {p['steps']} steps, guidance {p['guidance']}, seeds from {p['seed']}; copy threshold "
        f"{p['copy_threshold']} at {p['copy_resolution']} px.",
        "",
        "| metric | value |",
        "| --- | --- |",
        metric_rows,
        "",
        "Not computed:",
        skipped,
        "",
        f"Sample grid: run artifact `evaluation/{report['protocol_id']}/grid.png`; samples over training steps: "
        "the run's images (key `samples`).",
        "",
        "## Known limits",
        f"- Only {data.get('resolution')} px images; prompts longer than {ctx.get('max_length')} tokens are truncated.",
        "- Only the concepts above; anything else is out of distribution.",
        f"- Metrics come from {p['heldout_items']} held-out items and a fixed prompt set: small samples, "
        "compare versions only under the same protocol id.",
        "- Serving needs the `diffuse-pipeline` package installed (the pyfunc imports it; --env-manager local).",
    ])
