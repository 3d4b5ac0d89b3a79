"""Sketch model on shapes: does the generated shape follow the doodle's outline while its colour follows the text?

Every colour x shape pair (held-out pairs too), a doodle drawn from a shapes image plus that image's caption:
IoU of the generated object's mask with the doodle's filled outline, share with IoU >= 0.5, colour and shape
adherence. In one run, on the same prompts and seeds: the sketch model with the doodles at several image
guidance scales, the same model without doodles, and the text-only model it was extended from (the references:
how much of the overlap the text alone explains).

    .venv/bin/python bench/doodle_adherence.py [--model runs/shapes_doodle/model]
        [--text-model runs/shapes/model] [--per-pair 4]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch

from pipeline.model.folder import load_model
from pipeline.shapes.protocol import evaluate_doodles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/shapes_doodle/model")
    ap.add_argument("--text-model", default="runs/shapes/model")
    ap.add_argument("--per-pair", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--image-guidance", type=float, nargs="+", default=[1.0, 1.5, 3.0])
    ap.add_argument("--out", default="runs/bench/doodle_adherence.json")
    args = ap.parse_args()
    sketch = load_model(Path(args.model))
    runs = {f"sketch model, doodle, image guidance {ig:g}": (sketch, True, ig) for ig in args.image_guidance}
    runs["sketch model, no doodle"] = (sketch, False, 1.0)
    if args.text_model and Path(args.text_model).is_dir():
        runs["text-only model (init_from), no doodle"] = (load_model(Path(args.text_model)), False, 1.0)
    results = {}
    for name, (model, use_doodle, ig) in runs.items():
        report = evaluate_doodles(model, args.per_pair, use_doodle=use_doodle, guidance=args.guidance,
                                  image_guidance=ig)
        s = report["summary"]
        results[name] = {"mean IoU": s["all"]["iou"], "IoU of the source images": s["all"]["iou_of_source_image"],
                         "IoU>=0.5": s["all"]["iou>=0.5"],
                         "mean IoU held-out": s["held_out"]["iou"], "colour": s["all"]["colour"],
                         "colour held-out": s["held_out"]["colour"], "shape": s["all"]["shape"],
                         "images": s["all"]["n"], "seconds": report["protocol"]["generation_seconds"]}
        print(name, json.dumps(results[name]), flush=True)
    ref = results["sketch model, no doodle"]["mean IoU"]
    for r in results.values():
        r["IoU vs no doodle"] = round(r["mean IoU"] / max(ref, 1e-9), 2)
    out = {"date": str(date.today()), "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
           "model": args.model, "text_model": args.text_model, "guidance": args.guidance, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
