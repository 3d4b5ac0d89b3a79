"""`diffuse`: the command line (Typer). Bad input ends with a clear message and exit code 2, never a traceback.

Each command imports the part of the package it runs when it runs: `diffuse --help` starts in a fraction of a
second instead of importing torch, diffusers and MLflow, and a command whose optional extra is not installed
(`data validate` and `data remote` need `diffuse-pipeline[data]`) says so instead of breaking the others.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
from pathlib import Path

import typer
import yaml
from pydantic import ValidationError
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from pipeline.config import (
    SAMPLING,
    ContextConfig,
    CoverageConfig,
    EvaluationConfig,
    GenerationConfig,
    IngestConfig,
    PromotionConfig,
    ReportConfig,
    TrackingConfig,
    format_validation_error,
    load_config,
    load_saved_config,
    load_section,
)
from pipeline.errors import TrainingDiverged, UserError

app = typer.Typer(help="Train, sample and evaluate text-conditioned diffusion models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
err = Console(stderr=True)
out = Console()
GENERATION = GenerationConfig()  # sampling defaults of `diffuse sample`, as batch generation and the pyfunc have them


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)], force=True)
    logging.getLogger("pipeline").setLevel(logging.INFO)
    for noisy in ("transformers", "diffusers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def user_errors(fn):
    """Bad input ends with a clear message and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _setup_logging()
        try:
            return fn(*args, **kwargs)
        except (UserError, TrainingDiverged) as e:
            # escaped: a message naming e.g. "s3://B[/PREFIX]" or "[nan]" is text, not rich markup
            err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


# the packages an optional extra of diffuse-pipeline brings (pyproject.toml)
EXTRA_PACKAGES = {"data": ("great_expectations", "dvc")}


@contextlib.contextmanager
def needs_extra(extra: str, command: str):
    """Imports in this block that fail for want of an optional extra's packages become a clear error."""
    try:
        yield
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] not in EXTRA_PACKAGES[extra]:
            raise
        raise UserError(f"`{command}` needs the `{extra}` extra ({e.name} is not installed): pip install "
                        f"'diffuse-pipeline[{extra}]' (in a checkout: pip install -c constraints.txt '.[{extra}]')"
                        ) from None


def _parse_overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE (e.g. train.lr=0.0005), got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@data_app.command("shapes")
@user_errors
def data_shapes(
    out_dir: Path = typer.Option(Path("data/shapes"), "--out", help="folder to write the imagefolder into"),
    num: int = typer.Option(10000, min=1, help="number of training images"),
    resolution: int = typer.Option(32, min=8, max=512),
    seed: int = typer.Option(0),
    doodles: bool = typer.Option(False, "--doodles", help="also an outline doodle per image (doodles/), named in "
                                 "metadata.jsonl's conditioning_image field"),
):
    """Make the procedural coloured-shapes dataset (held-out colour x shape pairs excluded)."""
    from pipeline.shapes import dataset as shapes

    info = shapes.make_dataset(out_dir, num, resolution, seed, doodles=doodles)
    out.print(f"wrote {info['num_images']} images{' and doodles' if doodles else ''} to {out_dir} (held out of "
              f"training: {', '.join(' '.join(p) for p in info['held_out_pairs'])})")


@data_app.command("doodle")
@user_errors
def data_doodle(
    image: Path = typer.Argument(..., help="any image file (a photo, a rendering)"),
    out_file: Path = typer.Argument(..., help="where the doodle PNG goes"),
    resolution: int = typer.Option(32, min=8, max=2048, help="side of the doodle (the model's data.resolution)"),
    seed: int = typer.Option(0, help="seed of the hand-drawn wobble"),
):
    """Sketch an image: its outlines as black lines on white, the way training doodles are made (ingest
    --doodles), ready for a sketch-conditioned model."""
    import numpy as np
    from PIL import Image

    from pipeline.data.doodle import doodle_from_image
    from pipeline.images import open_image, to_square

    rgb = np.asarray(to_square(open_image(image), resolution), dtype=np.uint8)
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(doodle_from_image(rgb, seed)).save(out_file, format="PNG")
    except OSError as e:
        raise UserError(f"cannot write {out_file}: {e.strerror or e}") from None
    out.print(f"wrote {out_file} ({resolution}x{resolution} doodle of {image})")


@data_app.command("ingest")
@user_errors
def data_ingest(
    source: str = typer.Argument(..., help="imagefolder (metadata.jsonl), .csv, .tar (WebDataset) or s3:// prefix"),
    name: str = typer.Option(..., "--name", "-n", help="dataset name: written to data/prepared/NAME"),
    resolution: int = typer.Option(64, min=8, max=2048, help="square side of the prepared images (with "
                                   "--buckets: the side of the square whose area every bucket has)"),
    caption_column: str | None = typer.Option(None, help="caption field (default: 'text', else 'caption')"),
    label_column: str | None = typer.Option(None, help="class label field, for category conditioning"),
    near_duplicates: str | None = typer.Option(None, help="quarantine | flag (default from config: quarantine)"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with an `ingest:` section"),
    workers: int | None = typer.Option(None, min=1, help="decode processes (default: all cores)"),
    condition_column: str | None = typer.Option(None, help="field naming each item's condition image file "
                                                "(e.g. conditioning_image): a sketch per item"),
    doodles: bool = typer.Option(False, "--doodles", help="derive a doodle condition image for every item "
                                 "without one (default from config: ingest.doodles)"),
    buckets: bool | None = typer.Option(None, "--buckets/--no-buckets", help="keep each image's aspect ratio in "
                                        "aspect-ratio buckets instead of the centre-cropped square (default from "
                                        "config: ingest.buckets.enabled)"),
):
    """Decode, check and shard an image-text source into a versioned prepared dataset."""
    from pipeline.data.ingest import ingest
    from pipeline.data.prepared import dataset_dir

    overrides = {k: v for k, v in {"near_duplicates": near_duplicates, "workers": workers,
                                   "doodles": doodles or None}.items() if v is not None}
    base = load_section(config, "ingest", IngestConfig)
    if buckets is not None:
        overrides["buckets"] = base.buckets.model_dump() | {"enabled": buckets}
    try:
        cfg = IngestConfig.model_validate(base.model_dump() | overrides)
    except Exception as e:
        raise UserError(f"invalid option: {e}") from None
    out_dir = dataset_dir(name)
    info = ingest(source, out_dir, resolution, cfg, caption_column=caption_column, label_column=label_column,
                  condition_column=condition_column, name=Path(name).name)
    table = Table(title=f"dataset {info['name']} ({out_dir})", show_header=False)
    table.add_row("kept", f"{info['num_items']} ({info['num_train']} train, {info['num_eval']} eval) "
                          f"in {info['num_shards']} shard(s)")
    table.add_row("quarantined", str(info["num_quarantined"]))
    for kind, n in info["quarantined_by_kind"].items():
        table.add_row(f"  {kind}", str(n))
    if info["num_conditions"]:
        table.add_row("condition images", str(info["num_conditions"]))
    table.add_row("exact duplicates", str(info["exact_duplicates"]))
    table.add_row(f"near duplicates ({info['near_duplicate_policy']})", str(info["near_duplicates"]))
    for note, n in info["notes"].items():
        table.add_row(f"note: {note}", str(n))
    for bucket, n in info.get("items_per_bucket", {}).items():
        table.add_row(f"bucket {bucket}", f"{n} ({100 * n / info['num_items']:.0f}%)")
    table.add_row("version", info["version"][:16])
    out.print(table)
    if info["num_quarantined"]:
        out.print(f"reasons per item: {out_dir / 'quarantine.jsonl'}")


@data_app.command("encode")
@user_errors
def data_encode(
    config: Path = typer.Option(..., "--config", "-c", help="a latent model's training config (model.vae, data)"),
    set_: list[str] = typer.Option([], "--set", help="override a config value: KEY=VALUE"),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when there is one)"),
):
    """Fill the latent cache of a latent model's training data with its VAE (what `diffuse train` does first):
    only items the cache lacks are encoded."""
    import torch

    from pipeline.data.loader import open_training_data
    from pipeline.model.vae import load_vae, vae_spec
    from pipeline.training.latents import latents_for

    cfg = load_config(config, _parse_overrides(set_))
    if cfg.model.vae is None:
        raise UserError(f"{config}: model.vae is not set; only a latent model's data is encoded")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    data = open_training_data(cfg.data, cfg.ingest, conditions=cfg.context.image_condition)
    result = latents_for(cfg, data, load_vae(cfg.model.vae, device), vae_spec(cfg.model.vae))
    out.print(f"{len(result.items)} items: {result.encoded} images encoded now, the rest were cached "
              f"({result.folder})", highlight=False)


@data_app.command("validate")
@user_errors
def data_validate(
    name: str = typer.Argument(..., help="dataset name (data/prepared/NAME) or path of a prepared dataset"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with a `validation:` section "
                                       "(a training config's data.resolution is the expected resolution)"),
    out_dir: Path | None = typer.Option(None, "--out", help="where validation.json and docs/ go "
                                        "(default: DATASET.validation beside the dataset)"),
    resolution: int | None = typer.Option(None, min=8, max=2048, help="expected image side (overrides config)"),
):
    """Great Expectations gate: exit 1 when a hard check fails; soft checks only warn."""
    with needs_extra("data", "diffuse data validate"):
        from pipeline.data.validation import config_from_file, summary_table, validate_dataset

    cfg = config_from_file(config)
    if resolution is not None:
        cfg = cfg.model_copy(update={"resolution": resolution})
    result = validate_dataset(name, cfg, out_dir)
    out.print(summary_table(result))
    out.print(f"report: {result.report}\ndata docs: {result.docs}")
    for c in result.soft_failures:
        err.print(f"[yellow]warning:[/] {c.name}: expected {escape(c.expected)}, observed {escape(c.observed)}",
                  highlight=False)
    if not result.success:
        err.print(f"[bold red]validation failed:[/] {', '.join(c.name for c in result.hard_failures)}",
                  highlight=False)
        raise typer.Exit(1)


@data_app.command("remote")
@user_errors
def data_remote(
    url: str | None = typer.Option(None, help="s3://BUCKET/PREFIX (default: $DVC_REMOTE_URL)"),
    endpoint: str | None = typer.Option(None, help="S3 endpoint of a non-AWS server (default: $AWS_ENDPOINT_URL)"),
    name: str = typer.Option("storage", help="DVC remote name"),
    repo: Path = typer.Option(Path("."), help="the DVC project (folder with .dvc/)"),
):
    """Point DVC at an S3 remote from the environment (.dvc/config.local; credentials stay in the env)."""
    with needs_extra("data", "diffuse data remote"):
        from pipeline.data.versioning import configure_remote, credentials_hint

    written = configure_remote(repo, url, endpoint, name)
    where = f" at {written['endpointurl']}" if "endpointurl" in written else ""
    out.print(f"DVC remote '{name}' -> {written['url']}{where} (default; in {written['config']}, not committed)",
              highlight=False)
    if hint := credentials_hint():
        err.print(f"[yellow]note:[/] {hint}", highlight=False)


@data_app.command("report")
@user_errors
def data_report(
    name: str = typer.Argument(..., help="dataset name (data/prepared/NAME) or path"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with context/report/coverage sections"),
):
    """Diversity and coverage report: vocabulary, concepts, balance, near duplicates, embedding clusters."""
    from pipeline.data.report import build_report

    r = build_report(name, load_section(config, "context", ContextConfig), load_section(config, "report", ReportConfig),
                     load_section(config, "coverage", CoverageConfig))
    c = r["captions"]
    out.print(f"{r['dataset']['items']} items, {c['unique_captions']} unique captions, vocabulary "
              f"{c['vocabulary_size']} words")
    out.print("top concepts: " + ", ".join(f"{w} ({n})" for w, n in c["top_concepts"][:10]))
    for attr, a in r["attributes"].items():
        missing = f"; never mentioned: {', '.join(a['missing'])}" if a["missing"] else ""
        out.print(f"{attr}: balance {a['balance']:.2f}{missing}")
    from pipeline.data.prepared import dataset_dir

    out.print(f"report: {dataset_dir(name) / 'report' / 'report.html'}")


@data_app.command("coverage")
@user_errors
def data_coverage(
    name: str = typer.Argument(..., help="dataset name (data/prepared/NAME) or path"),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="prompt to score; repeat for several"),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML with context/coverage sections"),
):
    """How well the data covers each prompt: nearest training captions and a coverage score."""
    from pipeline.data.report import coverage

    for c in coverage(prompt, name, load_section(config, "context", ContextConfig),
                      load_section(config, "coverage", CoverageConfig)):
        flag = "[green]in span[/]" if c.in_span else "[red]outside the data's span[/]"
        out.print(f"{c.score:.3f} {flag}  {c.prompt!r}")
        for cap, sim in c.nearest:
            out.print(f"    {sim:.3f}  {cap}")


def _tracked(cfg, resume: bool, run):
    """run(logger) with an MLflowLogger when tracking is on (under torchrun: on rank 0 only); a failed or killed
    run is closed as such. Returns (what run returned, the logger or None)."""
    from pipeline.training.distributed import is_main_process

    mlflow_logger = None
    if cfg.tracking.enabled and is_main_process():
        from pipeline.registry.tracking import MLflowLogger

        mlflow_logger = MLflowLogger(cfg, resume=resume)
    try:
        return run(mlflow_logger), mlflow_logger
    except BaseException as e:
        if mlflow_logger is not None:
            mlflow_logger.finish(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise


@app.command()
@user_errors
def train(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML training config (see configs/shapes.yaml)"),
    resume: bool = typer.Option(False, help="continue from the latest checkpoint in run_dir"),
    overwrite: bool = typer.Option(False, help="start again in a run_dir that holds an earlier run"),
    set_: list[str] = typer.Option([], "--set", help="override a config value: KEY=VALUE, e.g. train.lr=0.0005 or "
                                   "train.cycles.1.steps=500"),
    log_only: Path | None = typer.Option(None, "--log-only", help="do not train: log this finished RUN_DIR "
                                         "(config, metrics.jsonl, sample grids, model) to MLflow; e.g. with "
                                         "--set tracking.uri=URI"),
):
    """Train a model; the final model lands in RUN_DIR/model (diffusers format). Logs to MLflow unless
    tracking.enabled is false."""
    if log_only is not None:
        from pipeline.registry.tracking import log_only as log_run

        # tracking settings: the tracking section of --config, else the run's own; --set tracking.KEY overrides
        overrides = _parse_overrides(set_)
        if bad := [k for k in overrides if not k.startswith("tracking.")]:
            raise UserError(f"--log-only logs a finished run: only tracking.* can be --set (not {', '.join(bad)})")
        tc = load_section(config, "tracking", TrackingConfig) if config else None
        if tc is None and (log_only / "config.yaml").is_file():
            tc = load_saved_config(log_only / "config.yaml").tracking
        if tc is not None and overrides:
            try:
                tc = TrackingConfig.model_validate(tc.model_dump() | {k.removeprefix("tracking."): v
                                                                      for k, v in overrides.items()})
            except ValidationError as e:
                raise UserError(format_validation_error(e, "--set").replace("\n  - ", "\n  - tracking.")) from None
        out.print(f"logged {log_only} to MLflow run {log_run(log_only, tc)}")
        return
    if config is None:
        raise UserError("give --config CONFIG.yaml (or --log-only RUN_DIR)")
    from pipeline.training.loop import train as run_training

    cfg = load_config(config, _parse_overrides(set_))
    model_dir, mlflow_logger = _tracked(cfg, resume, lambda logger: run_training(cfg, resume=resume,
                                                                               overwrite=overwrite, logger=logger))
    out.print(f"model saved to {model_dir}")
    if mlflow_logger is not None:
        mlflow_logger.finish(model_dir)
        if mlflow_logger.failed:
            raise UserError(f"training finished and the model is saved, but MLflow logging failed: "
                            f"{mlflow_logger.failed}\nWhen the tracking server is back: "
                            f"diffuse train --log-only {cfg.run_dir}")
        out.print(f"MLflow run {mlflow_logger.run_id} ({mlflow_logger.client.tracking_uri})")


@app.command("train-vae")
@user_errors
def train_vae(
    config: Path = typer.Option(..., "--config", "-c", help="YAML with run_dir, data and a vae: section"),
    resume: bool = typer.Option(False, help="continue from the latest checkpoint in run_dir"),
    overwrite: bool = typer.Option(False, help="start again in a run_dir that holds an earlier run"),
    set_: list[str] = typer.Option([], "--set", help="override a config value: KEY=VALUE, e.g. vae.max_steps=500"),
):
    """Train a VAE (diffusers AutoencoderKL) on the dataset; it lands in RUN_DIR/vae, ready for model.vae of a
    latent model. Reports reconstruction PSNR/SSIM on the eval split; logs to MLflow unless tracking.enabled is
    false."""
    from pipeline.training.vae_loop import train_vae as run_training

    cfg = load_config(config, _parse_overrides(set_))
    vae_dir, mlflow_logger = _tracked(cfg, resume, lambda logger: run_training(cfg, resume=resume,
                                                                             overwrite=overwrite, logger=logger))
    metrics = json.loads((vae_dir.parent / "vae_eval.json").read_text())
    out.print(f"VAE saved to {vae_dir}: PSNR {metrics['psnr']:.2f} dB, SSIM {metrics['ssim']:.4f} on the "
              f"{metrics['measured_on']} ({metrics['items']} items); scaling factor {metrics['scaling_factor']:.4f}")
    if mlflow_logger is not None:
        mlflow_logger.log_folder(vae_dir, "vae")
        mlflow_logger.finish()
        if mlflow_logger.failed:
            raise UserError(f"training finished and the VAE is saved, but MLflow logging failed: "
                            f"{mlflow_logger.failed}")
        out.print(f"MLflow run {mlflow_logger.run_id} ({mlflow_logger.client.tracking_uri})")


@app.command()
@user_errors
def sample(
    model: Path = typer.Option(..., "--model", "-m", help="model directory (RUN_DIR/model)"),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="text prompt; repeat for several; '' = unconditional"),
    negative_prompt: str = typer.Option("", help="what to steer away from (replaces the empty prompt in guidance)"),
    init_image: Path | None = typer.Option(None, help="img2img: start from this image"),
    strength: float = typer.Option(GENERATION.strength, help="img2img: 0 keeps the init image, 1 ignores it"),
    doodle: Path | None = typer.Option(None, help="a sketch the image follows (models trained with "
                                       "context.image_condition); black lines on white, any size"),
    image_guidance: float = typer.Option(GENERATION.image_guidance, help="with --doodle: how strongly the image "
                                         "follows it (1 = plain)"),
    sampler: str = typer.Option(GENERATION.sampler, help="dpmpp | ddim | ddpm"),
    steps: int = typer.Option(GENERATION.steps, help="denoising steps"),
    guidance: float = typer.Option(GENERATION.guidance, help="classifier-free guidance scale of the text (1 = off)"),
    seed: int = typer.Option(0, help="seed of the first image; image k uses seed + k"),
    num: int = typer.Option(8, min=1, max=4096, help="images per prompt"),
    width: int | None = typer.Option(None, min=8, help="image width in px (default: the model's resolution)"),
    height: int | None = typer.Option(None, min=8, help="image height in px (default: the model's resolution)"),
    out_dir: Path = typer.Option(Path("samples"), "--out", help="where PNGs and grid.png go"),
):
    """Generate images from text (txt2img), from text + an image (img2img) or from text + a doodle, at the model's
    resolution or at --width x --height (e.g. the aspect-ratio buckets a model trained on)."""
    from pipeline.data.doodle import load_doodle
    from pipeline.images import condition_tensor, grid, image_to_tensor, open_image, save_pngs
    from pipeline.model.folder import load_model
    from pipeline.model.sampling import check_size, generate

    if not 0.0 <= strength <= 1.0:
        raise UserError(f"--strength must be between 0 and 1 (got {strength})")
    loaded = load_model(model)
    h, w = check_size(loaded, width, height)
    prompts = [p for p in prompt for _ in range(num)]
    seeds = [seed + k for k in range(len(prompts))]
    init = cond = None
    if init_image is not None:
        with open_image(init_image, "init image") as im:
            if im.size != (w, h):
                err.print(f"note: init image is {im.size[0]}x{im.size[1]}; resized and centre-cropped to {w}x{h}")
            init = image_to_tensor(im, w, h).unsqueeze(0).expand(len(prompts), -1, -1, -1)
    if doodle is not None:
        if not loaded.spec.condition_channels:
            raise UserError(f"{model} was trained without a condition image and cannot follow --doodle: train a "
                            "model with context.image_condition (configs/shapes_doodle.yaml), or use --init-image")
        if w != h:
            raise UserError(f"--doodle makes square images (a doodle is cropped square): give --width and --height "
                            f"the same side, not {w}x{h}")
        with open_image(doodle, "doodle") as im:
            cond = condition_tensor(load_doodle(im, w)).unsqueeze(0).expand(len(prompts), -1, -1, -1)
    images = generate(loaded, prompts, seeds, sampler=sampler, steps=steps, guidance=guidance,
                      negative_prompts=[negative_prompt] * len(prompts), init_images=init,
                      strength=strength if init is not None else 1.0, cond_images=cond,
                      image_guidance=image_guidance, width=w, height=h)
    names = [f"{k:04d}-seed{s}.png" for k, s in enumerate(seeds)]
    save_pngs(images, out_dir, names)
    grid(images, cols=min(num, 8) if len(prompt) == 1 else num).save(out_dir / "grid.png")
    records = [{"file_name": n, "prompt": p, "seed": s, "sampler": sampler, "steps": steps, "guidance": guidance}
               | ({"doodle": str(doodle), "image_guidance": image_guidance} if doodle else {})
               for n, p, s in zip(names, prompts, seeds, strict=True)]
    (out_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out.print(f"wrote {len(images)} images and grid.png to {out_dir}")


@app.command("score-shapes")
@user_errors
def score_shapes(
    model: Path | None = typer.Option(None, "--model", "-m", help="generate the fixed evaluation set with this model"),
    images: Path | None = typer.Option(None, help="or score a folder of images with metadata.jsonl (prompt/text)"),
    per_pair: int = typer.Option(8, min=1, help="evaluation prompts per colour x shape pair"),
    sampler: str = typer.Option(SAMPLING.sampler),
    steps: int = typer.Option(SAMPLING.steps),
    guidance: float = typer.Option(SAMPLING.guidance),
    out_file: Path | None = typer.Option(None, "--out", help="write the full report as JSON here"),
):
    """Prompt adherence of a shapes model (or of images on disk): colour, shape, size, position."""
    from pipeline.shapes.protocol import evaluate_images, evaluate_model, print_summary

    if (model is None) == (images is None):
        raise UserError("give exactly one of --model (generate and score) or --images (score a folder)")
    if model is not None:
        report = evaluate_model(model, per_pair, sampler=sampler, steps=steps, guidance=guidance)
    else:
        report = evaluate_images(images)
    print_summary(report["summary"], out)
    if out_file:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(report, indent=2))
        out.print(f"report written to {out_file}")


# ------------------------------------------------------------------ MLflow: evaluate, register, promote, rollback


def _tracking(config: Path | None, tracking_uri: str | None):
    tc = load_section(config, "tracking", TrackingConfig)
    return tc.model_copy(update={"uri": tracking_uri}) if tracking_uri else tc


_CONFIG_HELP = "YAML with tracking/evaluation/promotion sections (a training config works); default: built-ins"
_URI_HELP = "MLflow tracking URI (default: config, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db)"


@app.command()
@user_errors
def evaluate(
    model: str = typer.Argument(..., help="model dir, run dir, models:/NAME@ALIAS or models:/NAME/VERSION"),
    config: Path | None = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    tracking_uri: str | None = typer.Option(None, help=_URI_HELP),
    out_file: Path | None = typer.Option(None, "--out", help="write the JSON report here"),
    no_log: bool = typer.Option(False, help="do not log the results to the model's MLflow run"),
):
    """The fixed evaluation protocol: denoising MSE per timestep bucket, shapes adherence, copy rate, FID/KID
    and CLIP score (when their weights exist locally). Logged to the model's MLflow run."""
    from pipeline.evaluation.protocol import evaluate as run_eval
    from pipeline.evaluation.protocol import public_report
    from pipeline.registry.client import read_run_file
    from pipeline.registry.client import tracking_uri as store_uri
    from pipeline.registry.model_uri import resolve_model

    tc = _tracking(config, tracking_uri)
    ec = load_section(config, "evaluation", EvaluationConfig)
    resolved = resolve_model(model, store_uri(tc) if model.startswith("models:/") else None)
    report = run_eval(resolved.model_dir, ec)
    report["model"] = {"uri": model, "name": resolved.name, "version": resolved.version, "run_id": resolved.run_id}
    run_id = resolved.run_id
    if run_id is None:
        record = read_run_file(resolved.model_dir.parent)
        run_id = record["run_id"] if record and record.get("tracking_uri") == store_uri(tc) else None
    if run_id and not no_log:
        from pipeline.registry.client import connect, with_retries
        from pipeline.registry.versions import log_evaluation

        client, _ = connect(tc)
        with_retries(lambda: log_evaluation(client, run_id, report), tc, "log the evaluation")
        report["model"]["logged_to_run"] = run_id
    table = Table(title=f"evaluation of {model} (protocol {report['protocol_id']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in report["metrics"].items():
        table.add_row(k, f"{v:.4f}")
    for k, v in report["skipped"].items():
        table.add_row(k, v)
    out.print(table)
    if out_file:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(public_report(report), indent=2, default=str))
        out.print(f"report written to {out_file}")


@app.command()
@user_errors
def register(
    run_dir: Path = typer.Argument(..., help="a finished training run (RUN_DIR with model/)"),
    name: str = typer.Option(..., "--name", "-n", help="registered model name"),
    config: Path | None = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    tracking_uri: str | None = typer.Option(None, help=_URI_HELP),
):
    """Evaluate RUN_DIR's model and register it as a new version of NAME with alias `challenger` (a run is
    registered once), with evaluation tags and a model card."""
    from pipeline.registry.versions import register as do_register

    result = do_register(run_dir, name, _tracking(config, tracking_uri),
                         load_section(config, "evaluation", EvaluationConfig))
    if result.created:
        out.print(f"registered {name} version {result.version} (alias challenger) from run {result.run_id}")
    else:
        out.print(f"run {result.run_id} is already {name} version {result.version}: nothing registered")
    out.print(json.dumps(dataclasses.asdict(result), indent=2, default=str))


@app.command()
@user_errors
def promote(
    name: str = typer.Argument(..., help="registered model name"),
    force: bool = typer.Option(False, help="promote the challenger without running the gate"),
    config: Path | None = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    tracking_uri: str | None = typer.Option(None, help=_URI_HELP),
):
    """Move `champion` to the challenger if it passes the bars and beats the champion by the margins; the
    decision and its reasons are recorded as tags on the version. Exit 1 when rejected."""
    from pipeline.registry.versions import promote as do_promote

    result = do_promote(name, _tracking(config, tracking_uri), load_section(config, "evaluation", EvaluationConfig),
                        load_section(config, "promotion", PromotionConfig), force=force)
    colour = {"promoted": "green", "forced": "yellow", "rejected": "red"}.get(result.decision, "white")
    out.print(f"[bold {colour}]{result.decision}[/]: {name} v{result.version} "
              f"(champion before: {result.champion_before or 'none'})")
    for r in result.reasons:
        out.print(f"  - {r}", highlight=False)
    if result.decision == "rejected":
        raise typer.Exit(1)


@app.command()
@user_errors
def rollback(
    name: str = typer.Argument(..., help="registered model name"),
    to: int | None = typer.Option(None, "--to", help="version to make champion (default: the previous champion)"),
    config: Path | None = typer.Option(None, "--config", "-c", help=_CONFIG_HELP),
    tracking_uri: str | None = typer.Option(None, help=_URI_HELP),
):
    """Point `champion` back at the previous champion (or at --to VERSION)."""
    from pipeline.registry.versions import rollback as do_rollback

    result = do_rollback(name, _tracking(config, tracking_uri), None if to is None else str(to))
    out.print(f"{name}: champion v{result.from_version} -> v{result.to_version}")


# ------------------------------------------------------------------ prompt store and batch generation

prompts_app = typer.Typer(help="The prompt store (SQLite by default, Postgres by URL).", no_args_is_help=True)
app.add_typer(prompts_app, name="prompts")
_STORE_HELP = "prompt store URL (default: generation.store_url, $DIFFUSE_PROMPT_STORE, sqlite:///prompts.db)"
_GEN_CONFIG_HELP = "YAML with generation/coverage/tracking sections (a training config works)"


def _open_prompt_store(store: str | None, config: Path | None):
    from pipeline.generation.prompt_store import open_store, store_url

    gc = load_section(config, "generation", GenerationConfig)
    return open_store(store_url(gc, store)), gc


@prompts_app.command("add")
@user_errors
def prompts_add(
    text: str = typer.Argument(..., help="the prompt"),
    negative_prompt: str | None = typer.Option(None, "--negative-prompt", help="what to steer away from"),
    sampler: str | None = typer.Option(None, help="dpmpp | ddim | ddpm (default: generation.sampler)"),
    steps: int | None = typer.Option(None, help="denoising steps (default: generation.steps)"),
    guidance: float | None = typer.Option(None, help="classifier-free guidance (default: generation.guidance)"),
    size: int | None = typer.Option(None, help="image side in px (default: the model's)"),
    seed: int | None = typer.Option(None, help="seed of the first image; image k uses seed + k"),
    num_images: int | None = typer.Option(None, "--num-images", "-n", help="images to make"),
    init_image: str | None = typer.Option(None, help="img2img: a local path or s3:// URI"),
    strength: float | None = typer.Option(None, help="img2img: 0 keeps the init image, 1 ignores it"),
    doodle: Path | None = typer.Option(None, help="a sketch the images follow (models trained with "
                                       "context.image_condition); its bytes are stored with the prompt"),
    priority: int = typer.Option(0, help="higher goes first"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    config: Path | None = typer.Option(None, "--config", "-c", help=_GEN_CONFIG_HELP),
):
    """Add one prompt (unset parameters take the generation defaults)."""
    from pipeline.generation.prompt_store import parse_prompt

    st, gc = _open_prompt_store(store, config)
    raw = {"text": text, "negative_prompt": negative_prompt, "sampler": sampler, "steps": steps,
           "guidance": guidance, "size": size, "seed": seed, "num_images": num_images, "init_image": init_image,
           "strength": strength, "condition_image": str(doodle) if doodle else None, "priority": priority}
    (pid,) = st.add([parse_prompt({k: v for k, v in raw.items() if v is not None}, gc)], check=gc)
    out.print(f"added prompt {pid} to {st.url}")


@prompts_app.command("import")
@user_errors
def prompts_import(
    file: Path = typer.Argument(..., help=".jsonl (one JSON object per line) or .csv (header row); field `text` "
                                "plus any of negative_prompt, sampler, steps, guidance, size, seed, num_images, "
                                "init_image, strength, condition_image (a doodle file, relative to FILE), priority"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    config: Path | None = typer.Option(None, "--config", "-c", help=_GEN_CONFIG_HELP),
):
    """Add every good record of a file; bad records are listed with their line and left out (exit 1 if any)."""
    from pipeline.generation.prompt_store import import_file

    st, gc = _open_prompt_store(store, config)
    result = import_file(st, file, gc)
    ids = result.ids
    span = f" (ids {ids[0]}..{ids[-1]})" if ids else ""
    out.print(f"added {result.added} prompts{span} to {st.url}")
    for r in result.rejected:
        err.print(f"line {r.line}: {escape(r.reason)}", highlight=False)
    if result.rejected:
        err.print(f"{len(result.rejected)} records rejected")
        raise typer.Exit(1)


@prompts_app.command("list")
@user_errors
def prompts_list(
    status: str | None = typer.Option(None, help="pending | done | failed | skipped"),
    limit: int | None = typer.Option(None, min=1),
    as_json: bool = typer.Option(False, "--json", help="one JSON object per line"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    config: Path | None = typer.Option(None, "--config", "-c", help=_GEN_CONFIG_HELP),
):
    """Prompts with their parameters and the status of their latest generation run."""
    st, _ = _open_prompt_store(store, config)
    rows = st.prompts(status=status, limit=limit)
    if as_json:
        for p in rows:
            print(json.dumps({"id": p.id, "text": p.text, **p.params(), "negative_prompt": p.negative_prompt,
                              "priority": p.priority, "status": p.status, "reason": p.reason,
                              "created_at": p.created_at.isoformat() if p.created_at else None}))
        return
    table = Table(title=f"{len(rows)} prompts in {st.url}")
    for col in ("id", "text", "params", "prio", "status"):
        table.add_column(col)
    for p in rows:
        params = f"{p.sampler} {p.steps} g{p.guidance} seeds {p.seed}..{p.seed + p.num_images - 1}"
        if p.init_image_uri:
            params += f" init {p.init_image_uri} s{p.strength}"
        if p.condition_sha256:
            params += f" doodle {p.condition_sha256[:12]}"
        st_text = p.status + (f": {p.reason}" if p.reason else "")
        table.add_row(str(p.id), escape(p.text[:80]), escape(params), str(p.priority), escape(st_text))
    out.print(table)


@prompts_app.command("retry")
@user_errors
def prompts_retry(
    ids: list[int] | None = typer.Argument(None, help="prompt ids (default: every failed or skipped prompt)"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    config: Path | None = typer.Option(None, "--config", "-c", help=_GEN_CONFIG_HELP),
):
    """Let the next `diffuse generate` try failed/skipped prompts again (after fixing an init image, say)."""
    st, _ = _open_prompt_store(store, config)
    out.print(f"{st.retry(ids or None)} prompts are pending again")


@prompts_app.command("migrate")
@user_errors
def prompts_migrate(
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    config: Path | None = typer.Option(None, "--config", "-c", help=_GEN_CONFIG_HELP),
):
    """Create or upgrade the store's schema to the newest migration (opening the store does this too)."""
    from pipeline.generation.prompt_store import store_url
    from pipeline.generation.prompt_store.store import _engine, migrate

    engine = _engine(store_url(load_section(config, "generation", GenerationConfig), store))
    before, after = migrate(engine)
    url = engine.url.render_as_string(hide_password=True)
    out.print(f"{url}: schema at {after}" + ("" if before == after else f" (was {before or 'empty'})"))


@app.command()
@user_errors
def generate(
    model: str = typer.Option(..., "--model", "-m", help="models:/NAME@ALIAS, models:/NAME/VERSION or a model dir"),
    shard: str = typer.Option("0/1", help="I/N: only the pending prompts of shard I (0-based) of N"),
    limit: int | None = typer.Option(None, min=1, help="at most K prompts (highest priority first)"),
    store: str | None = typer.Option(None, "--store", help=_STORE_HELP),
    artifacts: str | None = typer.Option(None, "--artifacts", help="artifact root: folder or s3://BUCKET/PREFIX "
                                         "(default: generation.artifact_root)"),
    config: Path | None = typer.Option(None, "--config", "-c", help=_GEN_CONFIG_HELP),
    run_id: str | None = typer.Option(None, help="generation run id (default: a new one)"),
    device: str = typer.Option("cpu", help="cpu or cuda (bf16 autocast)"),
):
    """Turn every pending prompt into images with one model version, exactly once: re-running skips what is
    done. Writes ARTIFACT_ROOT/runs/RUN_ID/{manifest.jsonl,summary.json,gallery.html} and logs them to MLflow.
    Exit 0: all done; 1: some prompts failed (listed; the others are done); 2: nothing ran (bad input)."""
    from pipeline.generation.artifacts import StorageUnavailable
    from pipeline.generation.batch import generate_shard
    from pipeline.generation.gallery import write_gallery
    from pipeline.registry.model_uri import version_label

    s = generate_shard(model, shard, store_url=store, artifact_root=artifacts, run_id=run_id, limit=limit,
                       config=config, device=device)
    m = s.model
    out.print(f"model {m.requested} -> {m.name} {version_label(m.version)}; shard {s.shard}: {s.prompts} pending "
              f"prompts, {s.images} images made ({s.images_already_done} existed), {s.done} prompts done "
              f"in {s.seconds:.1f} s ({s.images_per_second:.2f} img/s)", highlight=False)
    if cov := s.coverage:
        note = f" (not scored: {cov.unavailable})" if cov.unavailable else ""
        out.print(f"coverage ({cov.policy}, threshold {cov.threshold}): {cov.counts}{note}", highlight=False)

    gallery_error = None
    try:
        g = write_gallery(s.run_id, store_url=store, artifact_root=artifacts, config=config, summaries=[s])
        out.print(f"gallery: {g['gallery']}\nmanifest: {g['manifest']}\nMLflow: {g['mlflow']}"
                  + (f" (run {g['mlflow_run_id']})" if g.get("mlflow_run_id") else ""), highlight=False)
    except StorageUnavailable as e:  # the images and their rows are in place; only the run's record is missing
        gallery_error = f"manifest and gallery not written: {e} (later: pipeline.generation.gallery.write_gallery)"
    for f in s.skipped:
        out.print(f"skipped prompt {f.prompt_id}: {escape(f.reason)}", highlight=False)
    for f in s.failed:
        err.print(f"[red]failed[/] prompt {f.prompt_id} ({f.kind}): {escape(f.reason)}", highlight=False)
    if s.failed:
        err.print(f"{len(s.failed)} prompts failed; the others are done (rerun to retry transient failures, "
                  "`diffuse prompts retry` for the rest)")
    if gallery_error:
        err.print(f"[red]error:[/] {escape(gallery_error)}", highlight=False)
    if s.failed or gallery_error:
        raise typer.Exit(1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
