"""`dvc push` + `dvc pull` of the same images as loose PNG files vs as prepared shards, against a local S3
server (`rclone serve s3`), each in its own fresh git + DVC project.

    .venv/bin/python bench/dvc_push_pull.py [--num 20000] [--size 32] [--work DIR] [--jobs N]

Per variant: `dvc add` (hashing), `dvc push`, then outputs, the project cache and DVC's site cache are deleted
and `dvc pull` restores them from the server (checked byte-identical). Prints a table and the ratios.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
from PIL import Image

BIN = Path(sys.executable).parent
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from s3_server import serve_s3  # noqa: E402  the tests' local S3 server

from pipeline.config import IngestConfig  # noqa: E402
from pipeline.data.ingest import ingest  # noqa: E402
from pipeline.data.versioning import configure_remote  # noqa: E402

BUCKET = "bench"
KEY, SECRET = "benchkey", "benchsecret"


def make_images(root: Path, num: int, size: int, seed: int = 0) -> None:
    """An imagefolder of distinct blocky-noise PNGs + metadata.jsonl (captions distinct too)."""
    rng = np.random.default_rng(seed)
    img_dir = root / "images"
    img_dir.mkdir(parents=True)
    lines = []
    for i in range(num):
        small = rng.integers(0, 256, (size // 4, size // 4, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        (img_dir / f"{i:06d}.png").write_bytes(buf.getvalue())
        lines.append(json.dumps({"file_name": f"images/{i:06d}.png", "text": f"noise picture number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def run(cmd: list[str], cwd: Path, env: dict) -> float:
    t = time.perf_counter()
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stdout}\n{res.stderr}")
    return time.perf_counter() - t


def digest(root: Path) -> dict[str, str]:
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(root.rglob("*")) if f.is_file()}


def measure(label: str, data: Path, work: Path, endpoint: str, jobs: int | None) -> dict:
    """Fresh project with `data` copied to proj/data/<name>: add, push, wipe, pull."""
    proj = work / f"proj-{label}"
    target = proj / "data" / data.name
    shutil.copytree(data, target)
    env = os.environ | {"DVC_NO_ANALYTICS": "1", "DVC_SITE_CACHE_DIR": str(work / f"site-{label}"),
                        "AWS_ACCESS_KEY_ID": KEY, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_DEFAULT_REGION": "us-east-1",
                        # rclone sends whole-object checksums on ranged GETs (see tests/s3_server.py)
                        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required"}
    dvc = [str(BIN / "dvc")]
    jobs_arg = ["--jobs", str(jobs)] if jobs else []
    run(["git", "init", "-q"], proj, env)
    run([*dvc, "init", "-q"], proj, env)
    configure_remote(proj, f"s3://{BUCKET}/{label}", endpoint)
    files = sum(1 for f in target.rglob("*") if f.is_file())
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    before = digest(target)
    r = {"variant": label, "files": files, "MB": round(size / 2**20, 1)}
    print(f"[{label}] {files} files, {r['MB']} MB: dvc add ...", flush=True)
    r["add_s"] = run([*dvc, "add", f"data/{data.name}"], proj, env)
    print(f"[{label}] dvc push ...", flush=True)
    r["push_s"] = run([*dvc, "push", *jobs_arg], proj, env)
    shutil.rmtree(target)
    shutil.rmtree(proj / ".dvc" / "cache")
    shutil.rmtree(work / f"site-{label}", ignore_errors=True)
    print(f"[{label}] dvc pull (fresh cache) ...", flush=True)
    r["pull_s"] = run([*dvc, "pull", *jobs_arg], proj, env)
    if digest(target) != before:
        raise SystemExit(f"[{label}] pulled data differs from what was pushed")
    r["push_pull_s"] = r["push_s"] + r["pull_s"]
    print(f"[{label}] {json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()})}",
          flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num", type=int, default=20000)
    ap.add_argument("--size", type=int, default=32, help="image side, px")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir, removed)")
    ap.add_argument("--jobs", type=int, default=None, help="dvc push/pull --jobs (default: DVC's, 4 x cores)")
    ap.add_argument("--out", type=Path, default=Path("runs/bench/dvc_push_pull.json"))
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="dvc-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        loose = work / "src" / "images_loose"
        t = time.perf_counter()
        make_images(loose, args.num, args.size)
        print(f"made {args.num} PNGs ({args.size}x{args.size}) in {time.perf_counter() - t:.1f} s", flush=True)
        t = time.perf_counter()
        info = ingest(str(loose), work / "src" / "images_prepared", args.size, IngestConfig(near_duplicates="flag"),
                      progress=False)
        print(f"ingested to {info['num_shards']} shard(s), {info['num_items']} items, "
              f"in {time.perf_counter() - t:.1f} s", flush=True)
        if info["num_items"] != args.num:
            raise SystemExit(f"ingest kept {info['num_items']} of {args.num} images")
        with serve_s3(work / "s3", BUCKET, KEY, SECRET) as server:
            endpoint = server.endpoint
            rows = [measure("loose", loose, work, endpoint, args.jobs),
                    measure("shards", work / "src" / "images_prepared", work, endpoint, args.jobs)]
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    loose_r, shard_r = rows
    print(f"\n{args.num} images {args.size}x{args.size}, {os.cpu_count()} cores, {date.today()}")
    print("| variant | files | MB | dvc add s | dvc push s | dvc pull s (fresh cache) | push + pull s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['variant']} | {r['files']} | {r['MB']} | {r['add_s']:.1f} | {r['push_s']:.1f} | "
              f"{r['pull_s']:.1f} | {r['push_pull_s']:.1f} |")
    ratios = {k: loose_r[k] / shard_r[k] for k in ("add_s", "push_s", "pull_s", "push_pull_s")}
    print("loose / shards: " + ", ".join(f"{k[:-2]} {v:.1f}x" for k, v in ratios.items()))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"num": args.num, "size": args.size, "cores": os.cpu_count(),
                                    "machine": platform.platform(), "date": str(date.today()),
                                    "jobs": args.jobs, "rows": rows, "ratios_loose_over_shards": ratios},
                                   indent=2))


if __name__ == "__main__":
    main()
