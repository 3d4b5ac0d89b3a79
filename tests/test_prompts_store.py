"""The prompt store on SQLite and PostgreSQL: migrations, adding/importing prompts, what is pending, outputs unique,
failures, and the shard partition. No model needed: seconds."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import run_cli
from prompt_db import store_url  # noqa: F401  (fixture: sqlite and postgresql)

from pipeline.config import GenerationConfig
from pipeline.errors import UserError
from pipeline.generation.batch import parse_shard, shard_of
from pipeline.generation.prompt_store import import_file, open_store, parse_prompt, problems

GC = GenerationConfig(steps=7, guidance=3.0)


def _output(pid: int, seed: int, version: str = "1", name: str = "m") -> dict:
    return {"prompt_id": pid, "model_name": name, "model_version": version, "seed": seed,
            "image_uri": f"x/{pid}/{seed}", "sha256": "0" * 64, "settings": {"steps": 7}, "generate_seconds": 0.1,
            "write_seconds": 0.01, "coverage_score": 0.9, "coverage": "in_span", "run_id": "r1"}


def test_schema_is_migrated_and_matches_the_models(store_url):  # noqa: F811
    from alembic import command
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    from pipeline.generation.prompt_store.models import Base
    from pipeline.generation.prompt_store.store import alembic_config

    store = open_store(store_url)
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert ctx.get_current_revision() == head
        # the ORM models and what the migrations built agree (a model change without a migration fails here)
        assert compare_metadata(ctx, Base.metadata) == []
    # migrations are reversible: down to nothing and up again
    with store.engine.begin() as conn:
        command.downgrade(alembic_config(conn), "base")
    with store.engine.connect() as conn:
        assert MigrationContext.configure(conn).get_current_revision() is None
    store.close()
    store = open_store(store_url)  # opening upgrades again
    assert store.add([parse_prompt({"text": "a red circle"}, GC)]) == [1]
    store.close()


def test_concurrent_first_opens_migrate_once(store_url):  # noqa: F811
    code = "import sys; from pipeline.generation.prompt_store import open_store; open_store(sys.argv[1]).close()"
    procs = [subprocess.Popen([sys.executable, "-c", code, store_url], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors


def test_parse_defaults_and_problems():
    row = parse_prompt({"text": "a red circle", "guidance": "5"}, GC)
    assert (row["steps"], row["guidance"], row["sampler"], row["num_images"], row["seed"]) == (7, 5.0, "dpmpp", 1, 0)
    assert row["strength"] is None and problems(row, GC) is None
    init = parse_prompt({"text": "x", "init_image": "a.png"}, GC)
    assert init["strength"] == GC.strength and problems(init, GC) is None
    cases = {
        "empty prompt": {"text": "   "},
        "characters long": {"text": "x" * (GC.max_prompt_chars + 1)},
        "unknown sampler": {"text": "x", "sampler": "euler"},
        "steps must be": {"text": "x", "steps": 0},
        "guidance must be": {"text": "x", "guidance": 99},
        "num_images must be": {"text": "x", "num_images": GC.max_images_per_prompt + 1},
        "no init image": {"text": "x", "strength": 0.5},
        "strength must be": {"text": "x", "init_image": "a.png", "strength": 1.5},
    }
    for expected, raw in cases.items():
        assert expected in problems(parse_prompt(raw, GC), GC)
    with pytest.raises(UserError, match="unknown field"):
        parse_prompt({"text": "x", "colour": "red"}, GC)
    with pytest.raises(UserError, match="steps"):
        parse_prompt({"text": "x", "steps": "many"}, GC)


def test_add_import_and_pending(store_url, tmp_path):  # noqa: F811
    store = open_store(store_url)
    with pytest.raises(UserError, match="empty prompt"):
        store.add([parse_prompt({"text": ""}, GC)], check=GC)
    low, high = store.add([parse_prompt({"text": "low", "num_images": 2}, GC),
                           parse_prompt({"text": "high", "priority": 5}, GC)], check=GC)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text": "from jsonl", "steps": 3, "seed": 10, "num_images": 2}\n'
                     "not json\n\n"
                     '{"text": ""}\n'
                     '{"text": "bad", "sampler": "euler"}\n'
                     '["a list"]\n')
    r = import_file(store, jsonl, GC)
    assert r.added == 1
    assert [(x.line, x.reason.split(" (")[0]) for x in r.rejected] == [
        (2, "not JSON"), (4, "empty prompt"), (5, "unknown sampler 'euler': choose one of dpmpp, ddim, ddpm"),
        (6, "not a JSON object")]
    csv = tmp_path / "p.csv"
    csv.write_text("text,guidance,num_images,priority\nfrom csv,2.5,,1\n,4,1,0\n")
    r2 = import_file(store, csv, GC)
    assert r2.added == 1 and [x.line for x in r2.rejected] == [3]
    (jl,) = store.prompts(r.ids)
    assert (jl.steps, jl.seed, jl.num_images, jl.seeds()) == (3, 10, 2, [10, 11])
    (cs,) = store.prompts(r2.ids)
    assert (cs.guidance, cs.num_images, cs.priority, cs.steps) == (2.5, 1, 1, 7)

    # pending: highest priority first, then oldest
    assert store.pending("m", "1") == [high, cs.id, low, jl.id]
    assert store.record_outputs([_output(low, 0), _output(high, 0)]) == 2
    assert store.record_outputs([_output(low, 0)]) == 0  # (prompt, model, version, seed) exists: ignored
    assert store.pending("m", "1") == [cs.id, low, jl.id]  # low has 1 of 2 images
    assert store.done_seeds([low, high], "m", "1") == {low: {0}, high: {0}}
    assert store.pending("m", "2") == [high, cs.id, low, jl.id]  # another version starts from scratch
    assert len(store.outputs(model_name="m", model_version="1")) == 2

    # a transient failure does not keep a prompt out of the next run; a blocking one does, until retry
    store.record_failure(jl.id, "m", "1", "r1", "transient", "storage down", blocking=False)
    store.record_failure(cs.id, "m", "1", "r1", "invalid", "init image unreadable", blocking=True)
    assert store.pending("m", "1") == [low, jl.id]
    assert store.pending("m", "2") == [high, cs.id, low, jl.id]
    assert {p.id: (p.status, p.reason) for p in store.prompts(status="failed")} == {
        jl.id: ("failed", "storage down"), cs.id: ("failed", "init image unreadable")}
    assert [f.kind for f, _ in store.failures("r1")] == ["transient", "invalid"]
    assert store.retry([cs.id]) == 1
    assert store.pending("m", "1") == [cs.id, low, jl.id]
    store.mark_done([high], "r1")
    assert [p.id for p in store.prompts(status="done")] == [high]
    with pytest.raises(UserError, match="unknown status"):
        store.prompts(status="finished")
    store.close()


def test_unreachable_or_bad_store_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="unreachable"):
        open_store("postgresql+psycopg2://postgres@127.0.0.1:1/nothing?connect_timeout=2")
    with pytest.raises(UserError, match="not a database URL"):
        open_store("prompts.db")
    with pytest.raises(UserError, match="unsupported database"):
        open_store("nosuchdb://x/y")


def test_shard_partition_covers_every_prompt_exactly_once():
    ids = list(range(1, 1001))
    for n in (1, 2, 3, 8):
        shards = [[i for i in ids if shard_of(i, n) == k] for k in range(n)]
        assert sorted(sum(shards, [])) == ids  # every prompt in exactly one shard
        assert all(len(s) > 1000 / n * 0.7 for s in shards)  # and roughly balanced
    # the same partition in another process with another hash seed (not Python's randomized hash())
    code = "from pipeline.generation.batch import shard_of; print([shard_of(i, 8) for i in range(1, 1001)])"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": "/usr/bin:/bin"})
    assert json.loads(other.stdout) == [shard_of(i, 8) for i in ids]
    assert parse_shard("2/4") == (2, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(UserError, match="shard"):
            parse_shard(bad)


def _flat(text: str) -> str:
    return " ".join(text.split())  # rich wraps long lines


def test_prompts_cli(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    r = run_cli("prompts", "migrate", "--store", url)
    assert r.returncode == 0 and "schema at 0002 (was empty)" in _flat(r.stdout), r.stderr
    r = run_cli("prompts", "add", "a small blue square", "--guidance", "2", "-n", "3", "--priority", "2",
                "--store", url)
    assert r.returncode == 0 and "added prompt 1" in r.stdout, r.stderr
    r = run_cli("prompts", "add", "", "--store", url)
    assert r.returncode == 2 and "empty prompt" in r.stderr and "Traceback" not in r.stderr
    f = tmp_path / "p.jsonl"
    f.write_text('{"text": "a red circle"}\n{"text": "x", "steps": 0}\n')
    r = run_cli("prompts", "import", str(f), "--store", url)
    assert r.returncode == 1 and "added 1 prompts" in r.stdout and "line 2: steps must be" in _flat(r.stderr)
    r = run_cli("prompts", "list", "--json", "--store", url)
    rows = [json.loads(x) for x in r.stdout.splitlines()]
    assert [(x["id"], x["text"], x["guidance"], x["num_images"], x["status"]) for x in rows] == [
        (1, "a small blue square", 2.0, 3, "pending"), (2, "a red circle", 4.0, 1, "pending")]
    r = run_cli("prompts", "list", "--status", "nope", "--store", url)
    assert r.returncode == 2 and "unknown status" in r.stderr


# ------------------------------------------------------------------ prompts with a doodle (a condition image)


def write_doodle(path, box: tuple[int, int, int, int], size: int = 64):
    """A sketch file: a black rectangle outline on white (any size: the model's resolution is applied later)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).rectangle(box, outline="black", width=2)
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)
    return path


def test_doodle_bytes_round_trip_and_outlive_the_file(store_url, tmp_path):  # noqa: F811
    import hashlib

    a = write_doodle(tmp_path / "a.png", (10, 10, 50, 50))
    b = write_doodle(tmp_path / "b.png", (20, 5, 40, 60))
    a_bytes, b_bytes = a.read_bytes(), b.read_bytes()
    store = open_store(store_url)
    rows = [parse_prompt({"text": "a red square", **extra}, GC) for extra in (
        {"condition_image": str(a)}, {"condition_image": str(b)}, {"condition_image": str(a)}, {})]
    ids = store.add(rows, check=GC)
    store.close()
    a.unlink()  # a batch run months later must not need the file
    b.unlink()
    store = open_store(store_url)
    with_a, with_b, with_a_again, plain = store.prompts(ids)
    store.close()
    assert with_a.condition_image == a_bytes and with_b.condition_image == b_bytes  # exact bytes back
    assert with_a.condition_sha256 == hashlib.sha256(a_bytes).hexdigest()
    # the same text with another doodle is another request; with the same doodle, the same one
    assert with_a.condition_sha256 != with_b.condition_sha256
    assert with_a_again.condition_sha256 == with_a.condition_sha256
    assert plain.condition_image is None and plain.condition_sha256 is None
    assert with_b.params()["condition_sha256"] == hashlib.sha256(b_bytes).hexdigest()


def test_unreadable_doodle_is_a_user_error_at_parse_time(tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(UserError, match="doodle not found: .*missing.png"):
        parse_prompt({"text": "x", "condition_image": str(tmp_path / "missing.png")}, GC)
    with pytest.raises(UserError, match="notes.png is not a readable image"):
        parse_prompt({"text": "x", "condition_image": "notes.png"}, GC, base_dir=tmp_path)


def test_import_with_doodles_rejects_only_the_bad_records(store_url, tmp_path):  # noqa: F811
    d = tmp_path / "batch"
    write_doodle(d / "sketches" / "square.png", (10, 10, 50, 50))
    (d / "sketches" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    jsonl = d / "p.jsonl"
    jsonl.write_text('{"text": "a square", "condition_image": "sketches/square.png"}\n'
                     '{"text": "gone", "condition_image": "sketches/missing.png"}\n'
                     '{"text": "broken", "condition_image": "sketches/broken.png"}\n'
                     '{"text": "no doodle"}\n')
    store = open_store(store_url)
    r = import_file(store, jsonl, GC)
    assert r.added == 2
    assert [(x.line, x.reason.split(" (")[0]) for x in r.rejected] == [
        (2, f"doodle not found: {d / 'sketches' / 'missing.png'}"),
        (3, f"doodle {d / 'sketches' / 'broken.png'} is not a readable image")]
    square, plain = store.prompts(r.ids)
    assert square.condition_image == (d / "sketches" / "square.png").read_bytes() and plain.condition_image is None
    csv = d / "p.csv"
    csv.write_text("text,condition_image\nfrom csv,sketches/square.png\nplain csv,\n")
    r2 = import_file(store, csv, GC)
    assert r2.added == 2 and r2.rejected == []
    assert [p.condition_sha256 is not None for p in store.prompts(r2.ids)] == [True, False]
    store.close()


def test_an_existing_store_migrates_in_place_and_keeps_its_prompts(store_url, tmp_path):  # noqa: F811
    from sqlalchemy import text

    from pipeline.generation.prompt_store.store import _engine, migrate

    engine = _engine(store_url)
    assert migrate(engine, "0001") == (None, "0001")  # a store made before doodles existed
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO prompts (text, negative_prompt, sampler, steps, guidance, seed, num_images, "
                          "priority, status) VALUES ('an old prompt', '', 'dpmpp', 7, 3.0, 0, 1, 0, 'pending')"))
    engine.dispose()
    r = run_cli("prompts", "migrate", "--store", store_url)
    assert r.returncode == 0 and "schema at 0002 (was 0001)" in _flat(r.stdout), r.stderr
    store = open_store(store_url)
    (old,) = store.prompts()
    assert (old.text, old.steps, old.condition_image, old.condition_sha256) == ("an old prompt", 7, None, None)
    (new,) = store.add([parse_prompt({"text": "new", "condition_image": str(
        write_doodle(tmp_path / "d.png", (5, 5, 30, 30)))}, GC)])
    assert store.prompts([new])[0].condition_image == (tmp_path / "d.png").read_bytes()
    assert store.pending("m", "1") == [old.id, new]
    store.close()


def test_prompts_cli_with_a_doodle(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    (tmp_path / "sketch.txt").write_text("not an image")
    for bad, why in (("missing.png", "doodle not found"), ("sketch.txt", "is not a readable image")):
        r = run_cli("prompts", "add", "a red square", "--doodle", str(tmp_path / bad), "--store", url)
        assert r.returncode == 2 and why in _flat(r.stderr) and "Traceback" not in r.stderr, r.stderr
    doodle = write_doodle(tmp_path / "sketch.png", (10, 10, 50, 50))
    r = run_cli("prompts", "add", "a red square", "--doodle", str(doodle), "--store", url)
    assert r.returncode == 0 and "added prompt 1" in r.stdout, r.stderr  # the failed adds stored nothing
    r = run_cli("prompts", "add", "a blue circle", "--store", url)
    assert r.returncode == 0, r.stderr
    r = run_cli("prompts", "list", "--json", "--store", url)
    import hashlib

    sha = hashlib.sha256(doodle.read_bytes()).hexdigest()
    assert [(x["id"], x["condition_sha256"]) for x in map(json.loads, r.stdout.splitlines())] == [(1, sha), (2, None)]
    r = run_cli("prompts", "list", "--store", url, env={"COLUMNS": "200"})  # table cells unwrapped
    rows = {line.split("│")[2].strip(): line for line in r.stdout.splitlines() if line.count("│") > 2}
    assert f"doodle {sha[:12]}" in rows["a red square"] and "doodle" not in rows["a blue circle"]
