"""The shapes evaluation protocol: fixed prompts, fixed seeds, fixed sampler; scored analytically."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from rich.table import Table

from pipeline.config import SAMPLING, GenerationConfig
from pipeline.data.doodle import filled_mask, iou
from pipeline.errors import UserError
from pipeline.images import condition_tensor, to_pil
from pipeline.model.folder import load_model
from pipeline.model.sampling import generate
from pipeline.shapes import dataset as shapes
from pipeline.shapes import scorer


def evaluate_model(model_dir: Path, per_pair: int = 8, **protocol) -> dict:
    return evaluate(load_model(model_dir), per_pair, **protocol)


def evaluate(model, per_pair: int = 8, *, sampler: str = SAMPLING.sampler, steps: int = SAMPLING.steps,
             guidance: float = SAMPLING.guidance) -> dict:
    """Generate the fixed prompt set with a loaded model and score it."""
    items = shapes.eval_prompts(per_pair)
    prompts = [p for _, p in items]
    start = time.perf_counter()
    images = generate(model, prompts, list(range(len(prompts))), sampler=sampler, steps=steps, guidance=guidance)
    seconds = time.perf_counter() - start
    pil = [to_pil(im) for im in images]
    report = scorer.score(zip(pil, prompts, strict=True))
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
    return scorer.score(items)


def print_summary(summary: dict, console) -> None:
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


def evaluate_doodles(model, per_pair: int = 4, *, use_doodle: bool = True, sampler: str = SAMPLING.sampler,
                     steps: int = SAMPLING.steps, guidance: float = SAMPLING.guidance,
                     image_guidance: float = GenerationConfig().image_guidance) -> dict:
    """Does the image follow the doodle's outline while its colour follows the text? For every colour x shape
    pair (held-out ones too) a doodle drawn from a shapes image plus that image's caption: the IoU of the
    generated object's mask with the doodle's filled outline, and colour and shape adherence. `use_doodle=False`
    generates the same prompts without the doodles: the reference that shows how much of the overlap the text
    alone explains."""
    res = model.spec.resolution
    items = shapes.doodle_eval_items(per_pair, resolution=res)
    prompts = [p for _, p, _ in items]
    cond = None
    if use_doodle:
        cond = torch.stack([condition_tensor(d) for _, _, d in items])
    start = time.perf_counter()
    images = generate(model, prompts, list(range(len(prompts))), sampler=sampler, steps=steps, guidance=guidance,
                      cond_images=cond, image_guidance=image_guidance)
    seconds = time.perf_counter() - start
    summary = score_doodles(items, images, res)
    return {"summary": summary, "protocol": {"per_pair": per_pair, "use_doodle": use_doodle, "sampler": sampler,
                                             "steps": steps, "guidance": guidance,
                                             "image_guidance": image_guidance if use_doodle else None,
                                             "seeds": f"0..{len(prompts) - 1}",
                                             "generation_seconds": round(seconds, 2)}}


def score_doodles(items: list[tuple], images: torch.Tensor, resolution: int) -> dict:
    """Per group (seen / held-out colour x shape pairs / all): the IoU of each generated object's mask with its
    doodle's filled outline, the share with IoU >= 0.5, colour and shape adherence, and the IoU the image the
    doodle was drawn from scores (the reference: a doodle's lines sit on the outline, half outside the shape)."""
    groups: dict[str, dict[str, list[float]]] = {"seen": {}, "held_out": {}, "all": {}}
    for (spec, _, doodle), img in zip(items, images, strict=True):
        pil = to_pil(img)
        found = scorer.analyse(pil) or {}
        target = filled_mask(doodle)
        overlap = iou(scorer.object_mask(pil), target)
        ceiling = iou(scorer.object_mask(shapes.render(spec, resolution)), target)
        row = {"iou": overlap, "iou_of_source_image": ceiling, "iou>=0.5": float(overlap >= 0.5),
               "colour": float(found.get("colour") == spec.colour), "shape": float(found.get("shape") == spec.shape)}
        for g in ("held_out" if spec.held_out else "seen", "all"):
            for k, v in row.items():
                groups[g].setdefault(k, []).append(v)
    return {g: {k: round(float(np.mean(v)), 4) for k, v in d.items()} | {"n": len(d.get("iou", []))}
            for g, d in groups.items()}
