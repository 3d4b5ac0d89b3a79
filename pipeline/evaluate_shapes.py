"""The shapes evaluation protocol: fixed prompts, fixed seeds, fixed sampler; scored analytically."""

from __future__ import annotations

import json
import time
from pathlib import Path

from PIL import Image

from pipeline import shapes
from pipeline.errors import UserError


def evaluate_model(model_dir: Path, per_pair: int = 8, **protocol) -> dict:
    from pipeline.model_dir import load_model

    return evaluate(load_model(model_dir), per_pair, **protocol)


def evaluate(model, per_pair: int = 8, *, sampler: str = "dpmpp", steps: int = 20, guidance: float = 4.0) -> dict:
    """Generate the fixed prompt set with a loaded model and score it."""
    from pipeline.sample import generate

    items = shapes.eval_prompts(per_pair)
    prompts = [p for _, p in items]
    start = time.perf_counter()
    images = generate(model, prompts, list(range(len(prompts))), sampler=sampler, steps=steps, guidance=guidance)
    seconds = time.perf_counter() - start
    pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in images]
    report = shapes.score(zip(pil, prompts, strict=True))
    report["protocol"] = {"per_pair": per_pair, "sampler": sampler, "steps": steps, "guidance": guidance,
                          "seeds": f"0..{len(prompts) - 1}", "generation_seconds": round(seconds, 2)}
    return report


def evaluate_images(folder: Path) -> dict:
    meta = Path(folder) / "metadata.jsonl"
    if not meta.is_file():
        raise UserError(f"{folder}: no metadata.jsonl with file_name and prompt (or text) per image")
    items = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            image = Image.open(Path(folder) / rec["file_name"]).convert("RGB")
            items.append((image, rec.get("prompt", rec.get("text"))))
        except Exception as e:
            raise UserError(f"{meta} line {n}: {e}") from None
    return shapes.score(items)


def print_summary(summary: dict, console) -> None:
    from rich.table import Table

    cols = ["colour", "shape", "size", "position", "background", "colour+shape", "all"]
    table = Table(title="prompt adherence")
    table.add_column("pairs")
    table.add_column("n", justify="right")
    for c in cols:
        table.add_column(c, justify="right")
    for group in ("seen", "held_out", "all"):
        row = summary.get(group, {})
        if row.get("n"):
            table.add_row(group, str(row["n"]), *[f"{100 * row.get(c, 0):.0f}%" for c in cols])
    console.print(table)
