"""Samplers on the shapes model: wall time and prompt adherence for DPM-Solver++ 20, DDIM 50 and DDPM 1000
on the same fixed prompt set and seeds, in one run.

    .venv/bin/python bench/sampling.py [--model runs/shapes/model] [--per-pair 4]
"""

from __future__ import annotations

import argparse
import json
import platform
from datetime import date
from pathlib import Path

import torch

from pipeline.shapes.protocol import evaluate_model

RUNS = (("dpmpp", 20), ("ddim", 50), ("ddpm", 1000))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="runs/shapes/model")
    ap.add_argument("--per-pair", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--out", default="runs/bench/sampling.json")
    args = ap.parse_args()
    results = {}
    for sampler, steps in RUNS:
        report = evaluate_model(Path(args.model), args.per_pair, sampler=sampler, steps=steps, guidance=args.guidance)
        s = report["summary"]
        results[f"{sampler}-{steps}"] = {
            "seconds": report["protocol"]["generation_seconds"], "images": s["all"]["n"],
            "colour+shape seen": s["seen"]["colour+shape"], "colour+shape held-out": s["held_out"]["colour+shape"],
            "position": s["all"]["position"], "size": s["all"]["size"], "all attributes": s["all"]["all"],
        }
        print(sampler, steps, json.dumps(results[f"{sampler}-{steps}"]), flush=True)
    ref = results["ddpm-1000"]
    for r in results.values():
        r["time_vs_ddpm1000"] = round(r["seconds"] / ref["seconds"], 4)
        r["adherence_vs_ddpm1000"] = round(r["all attributes"] / max(ref["all attributes"], 1e-9), 3)
    out = {"date": str(date.today()), "machine": f"{platform.machine()} {torch.get_num_threads()} threads",
           "model": args.model, "guidance": args.guidance, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
