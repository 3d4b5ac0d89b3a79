"""`diffuse`: the command line. Heavy libraries are imported inside commands to keep start-up fast."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import typer
from rich.console import Console

from pipeline.errors import TrainingDiverged, UserError

app = typer.Typer(help="Train, sample and evaluate text-conditioned diffusion models.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")
err = Console(stderr=True)
out = Console()


def _setup_logging(verbose: bool = False) -> None:
    from rich.logging import RichHandler

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
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _parse_overrides(pairs: list[str]) -> dict:
    import yaml

    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects KEY=VALUE (e.g. train.max_steps=100), got {pair!r}")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@data_app.command("shapes")
@user_errors
def data_shapes(
    out_dir: Path = typer.Option(Path("data/shapes"), "--out", help="folder to write the imagefolder into"),
    num: int = typer.Option(10000, min=1, help="number of training images"),
    resolution: int = typer.Option(32, min=8, max=512),
    seed: int = typer.Option(0),
):
    """Make the procedural coloured-shapes dataset (held-out colour x shape pairs excluded)."""
    from pipeline import shapes

    info = shapes.make_dataset(out_dir, num, resolution, seed)
    out.print(f"wrote {info['num_images']} images to {out_dir} (held out of training: "
              f"{', '.join(' '.join(p) for p in info['held_out_pairs'])})")


@app.command()
@user_errors
def train(
    config: Path = typer.Option(..., "--config", "-c", help="YAML training config (see configs/shapes.yaml)"),
    resume: bool = typer.Option(False, help="continue from the latest checkpoint in run_dir"),
    overwrite: bool = typer.Option(False, help="start again in a run_dir that holds an earlier run"),
    set_: list[str] = typer.Option([], "--set", help="override a config value: KEY=VALUE, e.g. train.max_steps=100"),
):
    """Train a model; the final model lands in RUN_DIR/model (diffusers format)."""
    from pipeline.config import load_config
    from pipeline.train import train as run_training

    cfg = load_config(config, _parse_overrides(set_))
    model_dir = run_training(cfg, resume=resume, overwrite=overwrite)
    out.print(f"model saved to {model_dir}")


@app.command()
@user_errors
def sample(
    model: Path = typer.Option(..., "--model", "-m", help="model directory (RUN_DIR/model)"),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="text prompt; repeat for several; '' = unconditional"),
    negative_prompt: str = typer.Option("", help="what to steer away from (replaces the empty prompt in guidance)"),
    init_image: Path | None = typer.Option(None, help="img2img: start from this image"),
    strength: float = typer.Option(0.6, help="img2img: 0 keeps the init image, 1 ignores it"),
    sampler: str = typer.Option("dpmpp", help="dpmpp | ddim | ddpm"),
    steps: int = typer.Option(20, help="denoising steps"),
    guidance: float = typer.Option(4.0, help="classifier-free guidance scale (1 = off)"),
    seed: int = typer.Option(0, help="seed of the first image; image k uses seed + k"),
    num: int = typer.Option(8, min=1, max=4096, help="images per prompt"),
    out_dir: Path = typer.Option(Path("samples"), "--out", help="where PNGs and grid.png go"),
):
    """Generate images from text (txt2img) or from text + an image (img2img)."""
    from PIL import Image, UnidentifiedImageError

    from pipeline.model_dir import load_model
    from pipeline.sample import generate, grid, image_to_tensor, save_pngs

    if not 0.0 <= strength <= 1.0:
        raise UserError(f"--strength must be between 0 and 1 (got {strength})")
    loaded = load_model(model)
    prompts = [p for p in prompt for _ in range(num)]
    seeds = [seed + k for k in range(len(prompts))]
    init = None
    if init_image is not None:
        try:
            with Image.open(init_image) as im:
                im.load()
                if im.size != (loaded.spec.resolution,) * 2:
                    err.print(f"note: init image is {im.size[0]}x{im.size[1]}; resized and centre-cropped to "
                              f"{loaded.spec.resolution}x{loaded.spec.resolution}")
                init = image_to_tensor(im, loaded.spec.resolution)
        except (FileNotFoundError, IsADirectoryError):
            raise UserError(f"init image not found: {init_image}") from None
        except (UnidentifiedImageError, OSError) as e:
            raise UserError(f"init image {init_image} is not a readable image ({e})") from None
        init = init.unsqueeze(0).expand(len(prompts), -1, -1, -1)
    images = generate(loaded, prompts, seeds, sampler=sampler, steps=steps, guidance=guidance,
                      negative_prompts=[negative_prompt] * len(prompts), init_images=init,
                      strength=strength if init is not None else 1.0)
    names = [f"{k:04d}-seed{s}.png" for k, s in enumerate(seeds)]
    save_pngs(images, out_dir, names)
    grid(images, cols=min(num, 8) if len(prompt) == 1 else num).save(out_dir / "grid.png")
    records = [{"file_name": n, "prompt": p, "seed": s, "sampler": sampler, "steps": steps, "guidance": guidance}
               for n, p, s in zip(names, prompts, seeds, strict=True)]
    (out_dir / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out.print(f"wrote {len(images)} images and grid.png to {out_dir}")


@app.command("score-shapes")
@user_errors
def score_shapes(
    model: Path | None = typer.Option(None, "--model", "-m", help="generate the fixed evaluation set with this model"),
    images: Path | None = typer.Option(None, help="or score a folder of images with metadata.jsonl (prompt/text)"),
    per_pair: int = typer.Option(8, min=1, help="evaluation prompts per colour x shape pair"),
    sampler: str = typer.Option("dpmpp"),
    steps: int = typer.Option(20),
    guidance: float = typer.Option(4.0),
    out_file: Path | None = typer.Option(None, "--out", help="write the full report as JSON here"),
):
    """Prompt adherence of a shapes model (or of images on disk): colour, shape, size, position."""
    from pipeline.evaluate_shapes import evaluate_images, evaluate_model, print_summary

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
