"""Adherence against training minutes: evaluate the EMA (or raw) weights of the checkpoints a run kept.

    .venv/bin/diffuse train --config configs/shapes.yaml --set train.keep_last=50
    .venv/bin/python bench/adherence_curve.py --run runs/shapes
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from safetensors.torch import load_file

from pipeline.config import load_saved_config
from pipeline.model.folder import load_model
from pipeline.shapes.protocol import evaluate
from pipeline.training.checkpoints import checkpoint_dirs
from pipeline.training.schedule import Schedule


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", default="runs/shapes")
    ap.add_argument("--per-pair", type=int, default=4)
    ap.add_argument("--out", default=None)
    ap.add_argument("--steps", type=int, nargs="*", help="only the checkpoints of these steps (default: all kept)")
    ap.add_argument("--weights", choices=("ema", "raw"), default="ema", help="the EMA or the trained weights")
    args = ap.parse_args()
    run = Path(args.run)
    model = load_model(run / "model")
    # a checkpoint of a cycle at a lower resolution is scored at the side it trained at
    cfg = load_saved_config(run / "config.yaml")
    schedule = Schedule(cfg.train, cfg.data.resolution)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in x]
    t0 = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["time"]
    when = {r["step"]: (r["time"] - t0) / 60 for r in lines}
    curve = []
    for ckpt in checkpoint_dirs(run):
        step = int(ckpt.name.split("-")[1])
        if args.steps and step not in args.steps:
            continue
        model.unet.load_state_dict(load_file(str(ckpt / ("ema.safetensors" if args.weights == "ema" else
                                                         "unet.safetensors"))))
        side = schedule.resolution_after(step)
        s = evaluate(dataclasses.replace(model, spec=model.spec.model_copy(update={"resolution": side})),
                     args.per_pair)["summary"]
        row = {"step": step, "weights": args.weights, "minutes": round(when.get(step, float("nan")), 2),
               "resolution": side,
               "colour+shape seen": s["seen"]["colour+shape"], "colour+shape held-out": s["held_out"]["colour+shape"],
               "colour": s["all"]["colour"], "shape": s["all"]["shape"], "size": s["all"]["size"],
               "position": s["all"]["position"], "all": s["all"]["all"]}
        curve.append(row)
        print(json.dumps(row), flush=True)
    out = Path(args.out or run / "adherence_curve.json")
    out.write_text(json.dumps(curve, indent=2))


if __name__ == "__main__":
    main()
