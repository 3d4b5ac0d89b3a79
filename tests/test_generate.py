"""`diffuse generate` end to end with a tiny model: exactly once (rerun, shards), failures per prompt, the coverage
guard, the S3 artifact store, a Postgres store, registry aliases + the MLflow gallery. The kill-and-resume test is
in test_generate_resume.py."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from prompt_db import postgres_database

from pipeline.config import GenerationConfig
from pipeline.errors import UserError
from pipeline.generation.batch import GeneratedBy, generate_shard, pending_prompts, resolve_version, shard_of
from pipeline.generation.gallery import write_gallery
from pipeline.generation.prompt_store import open_store, parse_prompt

SHAPE = "a red circle (large) in the center, on white"  # in the tiny model's data
OFF_DATA = "a dog on a beach at sunset"


pytestmark = pytest.mark.usefixtures("one_thread")  # 2 shared cores


def gen_config(tmp: Path, tracking: dict | None = None, coverage: dict | None = None, **generation) -> Path:
    cfg = {"generation": {"store_url": f"sqlite:///{tmp / 'prompts.db'}", "artifact_root": str(tmp / "out"),
                          "steps": 2, "batch_size": 8, "num_threads": 1, "retries": 0, "backoff_seconds": 0,
                          **generation},
           "tracking": tracking or {"enabled": False}}
    if coverage:
        cfg["coverage"] = coverage
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "gen.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def add(url: str, *records: dict, check: bool = True) -> list[int]:
    gc = GenerationConfig(steps=2)
    store = open_store(url)
    try:
        return store.add([parse_prompt(r, gc) for r in records], check=gc if check else None)
    finally:
        store.close()


def outputs(url: str, **kw) -> list[dict]:
    store = open_store(url)
    try:
        return [{"prompt_id": o.prompt_id, "seed": o.seed, "uri": o.image_uri, "sha256": o.sha256,
                 "coverage": o.coverage, "settings": o.settings, "run_id": o.run_id, "version": o.model_version,
                 "name": o.model_name} for o, _ in store.outputs(**kw)]
    finally:
        store.close()


def statuses(url: str) -> dict[int, tuple[str, str | None]]:
    store = open_store(url)
    try:
        return {p.id: (p.status, p.reason) for p in store.prompts()}
    finally:
        store.close()


def assert_objects_complete(rows: list[dict], read=lambda uri: Path(uri).read_bytes()) -> None:
    """Every output row points at an object whose bytes are the ones recorded."""
    for r in rows:
        assert hashlib.sha256(read(r["uri"])).hexdigest() == r["sha256"], r["uri"]


def test_generate_once_then_rerun_adds_nothing(trained_tiny, tmp_path):
    cfg = gen_config(tmp_path)
    url = yaml.safe_load(cfg.read_text())["generation"]["store_url"]
    a, b, c = add(url, {"text": SHAPE, "num_images": 3, "seed": 5}, {"text": OFF_DATA},
                  {"text": "a blue square (small) on the left, on black", "guidance": 2.0, "priority": 1})
    s = generate_shard(str(trained_tiny), config=cfg)
    assert (s.prompts, s.images, s.done, s.failed, s.groups) == (3, 5, 3, [], 2)
    assert s.batches == 2  # guidance 4 and guidance 2 cannot share a sampling call
    assert s.model.name == "local" and s.model.version.startswith("sha-")
    rows = outputs(url)
    assert sorted((r["prompt_id"], r["seed"]) for r in rows) == [(a, 5), (a, 6), (a, 7), (b, 0), (c, 0)]
    assert_objects_complete(rows)
    cov = {r["prompt_id"]: r["coverage"] for r in rows}
    assert cov[a] == "in_span" and cov[b] == "outside_span"  # flagged, still generated (policy flag)
    assert {r["settings"]["guidance"] for r in rows if r["prompt_id"] == c} == {2.0}
    assert all(v == ("done", None) for v in statuses(url).values())
    assert pending_prompts(url, "local", s.model.version) == []

    # the record: manifest, summary, gallery (thumbnails embedded, coverage flags shown)
    g = write_gallery(s.run_id, config=cfg, summaries=[s])
    manifest = [json.loads(x) for x in Path(g["manifest"]).read_text().splitlines()]
    assert len(manifest) == 5 and {m["seed"] for m in manifest if m["prompt_id"] == a} == {5, 6, 7}
    assert all(m["model_version"] == s.model.version and m["steps"] == 2 for m in manifest)
    page = Path(g["gallery"]).read_text()
    assert page.count("data:image/png;base64,") == 5 and "outside_span" in page and OFF_DATA in page
    assert g["mlflow"] == "skipped: tracking.enabled is false"
    from html.parser import HTMLParser

    links = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "a":
                links.append(dict(attrs)["href"])

    Links().feed(page)
    assert all((Path(g["gallery"]).parent / h).is_file() for h in links) and len(links) == 5

    mtimes = {r["uri"]: Path(r["uri"]).stat().st_mtime_ns for r in rows}
    again = generate_shard(str(trained_tiny), config=cfg)
    assert (again.prompts, again.images) == (0, 0)
    assert outputs(url) == rows
    assert {u: Path(u).stat().st_mtime_ns for u in mtimes} == mtimes  # nothing rewritten

    # a new prompt later: only it is generated
    (d,) = add(url, {"text": SHAPE, "seed": 99})
    third = generate_shard(str(trained_tiny), config=cfg)
    assert (third.prompts, third.images) == (1, 1) and len(outputs(url)) == 6
    assert [r["prompt_id"] for r in outputs(url, run_id=third.run_id)] == [d]


def test_bad_prompts_fail_alone_and_are_listed(trained_tiny, shapes_data, tmp_path):
    cfg = gen_config(tmp_path)
    url = yaml.safe_load(cfg.read_text())["generation"]["store_url"]
    (tmp_path / "garbage.png").write_bytes(b"this is not a PNG")
    good_init = str(shapes_data / "000000.png")
    ids = add(url, {"text": SHAPE, "num_images": 2},
              {"text": " ".join(["a red circle"] * 12)},  # longer than the model's 16 tokens
              {"text": SHAPE, "size": 30},  # the model makes sides that are multiples of 4
              {"text": SHAPE, "init_image": str(tmp_path / "garbage.png")},
              {"text": SHAPE, "init_image": str(tmp_path / "missing.png")},
              {"text": SHAPE, "init_image": good_init, "strength": 0.5})
    (empty,) = add(url, {"text": ""}, check=False)  # another writer (SQL, an API) may insert what the CLI refuses
    good, overlong, big, garbage, missing, img2img = ids
    r = run_cli("generate", "--model", str(trained_tiny), "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 1, r.stdout + r.stderr
    err = " ".join(r.stderr.split())
    for pid, why in ((overlong, "longer than the model's text encoder takes (16 tokens)"),
                     (big, "size 30: this model makes images whose side is a multiple of 4"),
                     (garbage, "not a readable image"),
                     (missing, "init image unreadable"), (empty, "empty prompt")):
        assert f"failed prompt {pid} (invalid): " in err and why in err, (pid, why, err)
    assert "Traceback" not in r.stderr and "5 prompts failed; the others are done" in err
    st = statuses(url)
    assert st[good] == ("done", None) and st[img2img] == ("done", None)
    assert st[big] == ("failed", "size 30: this model makes images whose side is a multiple of 4 (trained at 16x16)")
    rows = outputs(url)
    assert sorted((x["prompt_id"], x["seed"]) for x in rows) == [(good, 0), (good, 1), (img2img, 0)]
    assert [x["settings"]["init_image_uri"] for x in rows if x["prompt_id"] == img2img] == [good_init]
    assert_objects_complete(rows)
    gallery = next((tmp_path / "out" / "runs").iterdir()) / "gallery.html"
    assert "Not generated (5)" in gallery.read_text()

    # invalid prompts are not retried by every run (exit 0, nothing to do) -- until `prompts retry`
    again = generate_shard(str(trained_tiny), config=cfg)
    assert (again.prompts, again.failed) == (0, [])
    r = run_cli("prompts", "retry", str(big), "-c", str(cfg), cwd=tmp_path)
    assert r.returncode == 0 and "1 prompts are pending again" in r.stdout
    assert [f.prompt_id for f in generate_shard(str(trained_tiny), config=cfg).failed] == [big]


def test_shards_cover_everything_once_and_limit(trained_tiny, tmp_path):
    cfg = gen_config(tmp_path)
    url = yaml.safe_load(cfg.read_text())["generation"]["store_url"]
    ids = add(url, *({"text": SHAPE, "seed": k, "priority": k % 3} for k in range(9)))
    first = generate_shard(str(trained_tiny), "0/3", config=cfg, limit=1)
    shard0 = [i for i in ids if shard_of(i, 3) == 0]
    best = max(shard0, key=lambda i: ((i - ids[0]) % 3, -i))  # highest priority, then oldest
    assert (first.prompts, [r["prompt_id"] for r in outputs(url)]) == (1, [best])
    seen = {}
    for k in range(3):
        s = generate_shard(str(trained_tiny), f"{k}/3", config=cfg)
        for r in outputs(url, run_id=s.run_id):
            assert shard_of(r["prompt_id"], 3) == k
            seen.setdefault(r["prompt_id"], []).append(k)
    assert sorted(seen) == sorted(set(ids) - {best}) and all(len(v) == 1 for v in seen.values())
    assert sorted(r["prompt_id"] for r in outputs(url)) == sorted(ids)


def test_coverage_policy_skip_and_data_not_available(trained_tiny, tmp_path):
    cfg = gen_config(tmp_path, coverage_policy="skip")
    url = yaml.safe_load(cfg.read_text())["generation"]["store_url"]
    shape, dog = add(url, {"text": SHAPE}, {"text": OFF_DATA})
    s = generate_shard(str(trained_tiny), config=cfg)
    assert s.images == 1 and s.failed == [] and [x.prompt_id for x in s.skipped] == [dog]
    assert "outside the training data's span" in s.skipped[0].reason
    assert statuses(url)[dog][0] == "skipped" and statuses(url)[shape] == ("done", None)

    # the same weights, but its training data is elsewhere: coverage is recorded as not scored, never invented
    moved = tmp_path / "moved_model"
    shutil.copytree(trained_tiny, moved)
    tc = yaml.safe_load((moved / "train_config.yaml").read_text())
    tc["data"]["path"] = str(tmp_path / "not-here")
    (moved / "train_config.yaml").write_text(yaml.safe_dump(tc))
    cfg2 = gen_config(tmp_path / "b")
    url2 = yaml.safe_load(cfg2.read_text())["generation"]["store_url"]
    add(url2, {"text": OFF_DATA})
    s2 = generate_shard(str(moved), config=cfg2)
    assert s2.images == 1 and s2.coverage.unavailable.startswith("training data not available")
    (row,) = outputs(url2)
    assert row["coverage"].startswith("skipped: training data not available") and "not-here" in row["coverage"]


def test_s3_artifact_store_and_a_failing_store(trained_tiny, tmp_path, monkeypatch_s3_env):
    from pipeline import storage

    s3srv = monkeypatch_s3_env
    cfg = gen_config(tmp_path)
    url = yaml.safe_load(cfg.read_text())["generation"]["store_url"]
    a, b = add(url, {"text": SHAPE, "num_images": 2}, {"text": OFF_DATA})
    # a bucket that does not exist: every write fails, each prompt is recorded failed, nothing is recorded done
    bad = generate_shard(str(trained_tiny), config=cfg, artifact_root="s3://no-such-bucket/gen")
    assert bad.images == 0 and sorted(f.prompt_id for f in bad.failed) == [a, b]
    assert all(f.kind == "transient" and "bucket does not exist" in f.reason for f in bad.failed)
    assert outputs(url) == [] and statuses(url)[a][0] == "failed"
    # transient failures are retried by the next run
    root = f"s3://{s3srv.bucket}/gen"
    ok = generate_shard(str(trained_tiny), config=cfg, artifact_root=root)
    assert (ok.images, ok.failed) == (3, [])
    rows = outputs(url)
    assert all(r["uri"].startswith(root + "/images/local/sha-") for r in rows)
    assert_objects_complete(rows, read=storage.read_bytes)
    g = write_gallery(ok.run_id, config=cfg, artifact_root=root)
    assert g["gallery"] == f"{root}/runs/{ok.run_id}/gallery.html"
    page = storage.read_bytes(g["gallery"]).decode()
    assert page.count("data:image/png;base64,") == 3  # thumbnails read back from S3
    assert len(storage.read_bytes(g["manifest"]).decode().splitlines()) == 3
    assert not any(".tmp" in k for k in storage.list_files(root))


def test_postgres_store_end_to_end(trained_tiny, tmp_path):
    with postgres_database() as url:
        cfg = gen_config(tmp_path, store_url=url)
        ids = add(url, {"text": SHAPE, "num_images": 2}, {"text": OFF_DATA, "priority": 3})
        s = generate_shard(str(trained_tiny), config=cfg)
        assert (s.images, s.done) == (3, 2)
        assert generate_shard(str(trained_tiny), config=cfg).images == 0
        rows = outputs(url)
        assert sorted((r["prompt_id"], r["seed"]) for r in rows) == [(ids[0], 0), (ids[0], 1), (ids[1], 0)]
        assert_objects_complete(rows)
        assert len(Path(write_gallery(s.run_id, config=cfg)["manifest"]).read_text().splitlines()) == 3


def test_registry_alias_resolved_once_and_gallery_logged_to_mlflow(trained_tiny, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from pipeline.config import EvaluationConfig, PromotionConfig, TrackingConfig
    from pipeline.registry.versions import promote, register

    monkeypatch.chdir(tmp_path)  # the model cache (.cache/models) lands here
    tracking = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "artifact_location": (tmp_path / "mlruns").as_uri()}
    tc = TrackingConfig(**tracking)
    run_dir = tmp_path / "run"  # a copy: registering writes mlflow_run.json into the run
    shutil.copytree(trained_tiny, run_dir / "model")
    shutil.copy(trained_tiny.parent / "config.yaml", run_dir / "config.yaml")
    ec = EvaluationConfig(num_items=2, num_prompts=2, shapes_scorer="off", steps=2)
    assert register(run_dir, "tiny", tc, ec).version == "1"
    promote("tiny", tc, ec, PromotionConfig(), force=True)

    cfg = gen_config(tmp_path, tracking=tracking)
    url = yaml.safe_load(cfg.read_text())["generation"]["store_url"]
    add(url, {"text": SHAPE}, {"text": OFF_DATA})
    with pytest.raises(UserError, match=r"no alias 'nope'; aliases: @challenger -> v1, @champion -> v1"):
        generate_shard("models:/tiny@nope", config=cfg)
    assert resolve_version("models:/tiny@champion", str(cfg)) | {"run_id": None} == {
        "name": "tiny", "version": "1", "uri": "models:/tiny/1", "run_id": None}
    assert pending_prompts(url, "tiny", "1") == [1, 2]
    s = generate_shard("models:/tiny@champion", config=cfg)
    assert s.model == GeneratedBy("tiny", "1", "models:/tiny/1", "models:/tiny@champion")
    rows = outputs(url)
    assert {(r["name"], r["version"]) for r in rows} == {("tiny", "1")} and len(rows) == 2
    assert all("/images/tiny/v1/" in r["uri"] for r in rows)
    assert pending_prompts(url, "tiny", "1") == []

    g = write_gallery(s.run_id, config=cfg, summaries=[s])
    client = MlflowClient(tracking["uri"])
    run = client.get_run(g["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == "generation"
    assert run.data.tags["generation_run_id"] == s.run_id and run.data.params["model_version"] == "1"
    assert run.data.metrics["images"] == 2 and run.data.metrics["outside_span"] == 1
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id, "generation")) == [
        "generation/gallery.html", "generation/manifest.jsonl", "generation/summary.json"]
    # writing the gallery again (an Airflow retry) updates the same MLflow run
    assert write_gallery(s.run_id, config=cfg)["mlflow_run_id"] == g["mlflow_run_id"]


# ------------------------------------------------------------------ prompts with a doodle


def _sketch(path: Path, box: tuple[int, int, int, int]) -> Path:
    """A user's sketch at its own size (64 px; the model makes 16 px images): a black rectangle outline on white."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(im).rectangle(box, outline="black", width=3)
    im.save(path)
    return path


def _pixels(uri: str):
    import numpy as np
    from PIL import Image

    with Image.open(uri) as im:
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_doodle_prompts_are_generated_with_their_doodle_once(doodle_model, tmp_path):
    import numpy as np

    from pipeline.data.doodle import load_doodle
    from pipeline.images import condition_tensor, open_image
    from pipeline.model.sampling import generate

    cfg = gen_config(tmp_path, image_guidance=2.0)
    url = yaml.safe_load(cfg.read_text())["generation"]["store_url"]
    square = _sketch(tmp_path / "square.png", (8, 8, 56, 56))
    tall = _sketch(tmp_path / "tall.png", (24, 4, 40, 60))
    a, plain, c = add(url, {"text": SHAPE, "num_images": 2, "condition_image": str(square)}, {"text": SHAPE},
                      {"text": SHAPE, "condition_image": str(tall)})
    cond = condition_tensor(load_doodle(open_image(square), 16))
    square_sha = hashlib.sha256(square.read_bytes()).hexdigest()
    square.unlink()  # the stored bytes are what the run uses
    tall.unlink()
    s = generate_shard(str(doodle_model.path), config=cfg)
    assert (s.prompts, s.images, s.done, s.failed) == (3, 4, 3, [])
    assert (s.groups, s.batches) == (2, 2)  # with and without a doodle; both doodle prompts share a batch
    rows = outputs(url)
    assert sorted((r["prompt_id"], r["seed"]) for r in rows) == [(a, 0), (a, 1), (plain, 0), (c, 0)]
    assert_objects_complete(rows)
    by_id = {(r["prompt_id"], r["seed"]): r for r in rows}
    assert by_id[a, 0]["settings"]["doodle_sha256"] == square_sha and by_id[a, 0]["settings"]["image_guidance"] == 2.0
    assert by_id[c, 0]["settings"]["doodle_sha256"] != square_sha and "doodle_sha256" not in by_id[plain, 0]["settings"]

    # the image follows its doodle: it is the one sampled with that doodle (up to one intensity level, another batch
    # composition), and not the one sampled without it
    def sample(cond_images):
        return generate(doodle_model, [SHAPE], [0], steps=2, guidance=GenerationConfig().guidance,
                        cond_images=cond_images, image_guidance=2.0)[0].permute(1, 2, 0).numpy().astype(np.int16)

    made = _pixels(by_id[a, 0]["uri"])
    assert np.abs(made - sample(cond.unsqueeze(0))).max() <= 1
    assert np.abs(made - sample(None)).max() > 8

    assert generate_shard(str(doodle_model.path), config=cfg).images == 0  # exactly once
    g = write_gallery(s.run_id, config=cfg, summaries=[s])
    manifest = [json.loads(x) for x in Path(g["manifest"]).read_text().splitlines()]
    assert sorted(m["prompt_id"] for m in manifest if m.get("doodle_sha256")) == [a, a, c]
    assert f"doodle {square_sha[:12]}" in Path(g["gallery"]).read_text()


def test_a_doodle_prompt_fails_alone_on_a_text_only_model(trained_tiny, tmp_path):
    cfg = gen_config(tmp_path)
    url = yaml.safe_load(cfg.read_text())["generation"]["store_url"]
    doodled, plain = add(url, {"text": SHAPE, "condition_image": str(_sketch(tmp_path / "d.png", (8, 8, 56, 56)))},
                         {"text": SHAPE, "num_images": 2})
    s = generate_shard(str(trained_tiny), config=cfg)
    assert s.images == 2 and [(f.prompt_id, f.kind) for f in s.failed] == [(doodled, "invalid")]
    assert "trained without a condition image" in s.failed[0].reason
    st = statuses(url)
    assert st[plain] == ("done", None) and st[doodled][0] == "failed"
    assert "trained without a condition image" in st[doodled][1]
    assert sorted((r["prompt_id"], r["seed"]) for r in outputs(url)) == [(plain, 0), (plain, 1)]
    assert generate_shard(str(trained_tiny), config=cfg).prompts == 0  # blocking for this version: not retried
