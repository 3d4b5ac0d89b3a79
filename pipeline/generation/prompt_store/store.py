"""Opening, migrating, filling and querying the prompt store."""

from __future__ import annotations

import csv
import fcntl
import hashlib
import io
import json
import logging
import os
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import import_module
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlalchemy import create_engine, delete, event, func, select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import sessionmaker

from pipeline.config import SAMPLERS, GenerationConfig
from pipeline.errors import UserError
from pipeline.generation.prompt_store.models import DONE, FAILED, PENDING, SKIPPED, STATUSES, Failure, Output, Prompt
from pipeline.images import open_image

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"
DEFAULT_URL = "sqlite:///prompts.db"
MAX_SEED = 2**63 - 1
MAX_DOODLE_BYTES = 16 * 2**20  # stored in every prompt row that uses it


def store_url(gc: GenerationConfig | None = None, override: str | None = None) -> str:
    """--store, else generation.store_url, else $DIFFUSE_PROMPT_STORE, else sqlite:///prompts.db."""
    return override or (gc.store_url if gc else None) or os.environ.get("DIFFUSE_PROMPT_STORE") or DEFAULT_URL


# ------------------------------------------------------------------ what a prompt may ask for


class PromptIn(BaseModel):
    """One prompt as given to `prompts add` / `prompts import`; unset parameters take the generation defaults."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    text: str
    negative_prompt: str | None = None
    sampler: str | None = None
    steps: int | None = None
    guidance: float | None = None
    size: int | None = None
    seed: int | None = None
    num_images: int | None = None
    init_image: str | None = Field(None, alias="init_image_uri")
    strength: float | None = None
    condition_image: str | None = None  # a doodle file: its bytes are stored, so the file may go afterwards
    priority: int = 0


def parse_prompt(raw: dict, gc: GenerationConfig, base_dir: Path | None = None) -> dict:
    """A raw record -> the prompts-table columns with defaults filled in; UserError when the record is malformed.
    A `condition_image` (a path, relative to base_dir if given) is read here and must be a readable image."""
    # CSV cells are strings and an empty cell means "not given"
    raw = {k: (None if isinstance(v, str) and v == "" and k != "text" else v) for k, v in raw.items() if k}
    try:
        p = PromptIn.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "record"
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise UserError(f"{where}: {msg}") from None
    init = p.init_image or None
    doodle, doodle_sha = read_doodle(Path(base_dir or ".") / p.condition_image) if p.condition_image else (None, None)
    return {"text": p.text, "negative_prompt": p.negative_prompt or "", "sampler": p.sampler or gc.sampler,
            "steps": gc.steps if p.steps is None else p.steps,
            "guidance": gc.guidance if p.guidance is None else p.guidance, "size": p.size,
            "seed": gc.seed if p.seed is None else p.seed,
            "num_images": gc.num_images if p.num_images is None else p.num_images,
            "init_image_uri": init, "strength": (gc.strength if p.strength is None else p.strength) if init else
            p.strength, "condition_image": doodle, "condition_sha256": doodle_sha, "priority": p.priority}


def read_doodle(path: Path) -> tuple[bytes, str]:
    """A doodle file's bytes and their sha256, checked to be a readable image of a storable size."""
    try:
        size = path.stat().st_size
        if size > MAX_DOODLE_BYTES:
            raise UserError(f"doodle {path} is {size / 2**20:.1f} MiB; the limit is {MAX_DOODLE_BYTES // 2**20} MiB "
                            "(a sketch needs far less: save it as a PNG at a few hundred px)")
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise UserError(f"doodle not found: {path}") from None
    except OSError as e:
        raise UserError(f"doodle {path} cannot be read: {e.strerror or e}") from None

    open_image(data, f"doodle {path}")
    return data, hashlib.sha256(data).hexdigest()


def problems(p: dict, gc: GenerationConfig) -> str | None:
    """Why these prompt columns cannot be generated (independent of any model), or None. Checked when a prompt is
    added and again when it is generated (rows may come from other writers)."""
    text = p.get("text") or ""
    if not text.strip():
        return "empty prompt"
    if len(text) > gc.max_prompt_chars:
        return (f"prompt is {len(text)} characters long; the limit is {gc.max_prompt_chars} "
                "(generation.max_prompt_chars)")
    if len(p.get("negative_prompt") or "") > gc.max_prompt_chars:
        return f"negative prompt is longer than {gc.max_prompt_chars} characters"
    if p["sampler"] not in SAMPLERS:
        return f"unknown sampler {p['sampler']!r}: choose one of {', '.join(SAMPLERS)}"
    if not 1 <= p["steps"] <= 1000:
        return f"steps must be between 1 and 1000, got {p['steps']}"
    if not 0 <= p["guidance"] <= 50:
        return f"guidance must be between 0 and 50, got {p['guidance']}"
    if p.get("size") is not None and not 8 <= p["size"] <= 4096:
        return f"size must be between 8 and 4096 px, got {p['size']}"
    if not 1 <= p["num_images"] <= gc.max_images_per_prompt:
        return f"num_images must be between 1 and {gc.max_images_per_prompt}, got {p['num_images']}"
    if not 0 <= p["seed"] <= MAX_SEED - p["num_images"]:
        return f"seed must be between 0 and 2^63-1 minus num_images, got {p['seed']}"
    if p.get("init_image_uri"):
        if p.get("strength") is None or not 0 <= p["strength"] <= 1:
            return f"strength must be between 0 and 1, got {p.get('strength')}"
    elif p.get("strength") is not None:
        return "strength is set but there is no init image"
    return None


# ------------------------------------------------------------------ engine and migrations


def alembic_config(connection=None):
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def _safe(url) -> str:
    return url.render_as_string(hide_password=True)


def _engine(url: str):
    try:
        u = make_url(url)
    except ArgumentError:
        raise UserError(f"prompt store URL {url!r} is not a database URL (e.g. sqlite:///prompts.db or "
                        "postgresql://USER@HOST/DB)") from None
    kwargs: dict = {"pool_pre_ping": True}
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:":
            Path(u.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"timeout": 60}  # concurrent shards wait for the write lock
    try:
        engine = create_engine(u, **kwargs)
    except NoSuchModuleError:
        raise UserError(f"prompt store URL {_safe(u)}: unsupported database (use sqlite or postgresql)") from None
    except ImportError as e:
        raise UserError(f"prompt store URL {_safe(u)}: the database driver is not installed ({e})") from None
    if u.get_backend_name() == "sqlite":
        @event.listens_for(engine, "connect")
        def _pragmas(dbapi_conn, _):
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")  # readers (prompts list, the gallery) do not block the writer
            cur.close()
    return engine


@contextmanager
def _migration_lock(engine):
    """SQLite: concurrent first openers of one file take turns (Postgres locks inside env.py)."""
    db = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if not db or db == ":memory:":
        yield
        return
    with open(f"{db}.migrate.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def migrate(engine, revision: str = "head") -> tuple[str | None, str | None]:
    """Upgrade the schema to `revision` (default: the newest). Returns (revision before, revision after)."""
    script = ScriptDirectory.from_config(alembic_config())
    target = script.get_current_head() if revision == "head" else revision

    def current() -> str | None:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    before = _connect_checked(engine, current)
    if before == target:
        return before, before
    if before is not None and before not in {s.revision for s in script.walk_revisions()}:
        raise UserError(f"the prompt store {_safe(engine.url)} is at schema revision {before}, which this version "
                        "of diffuse does not know: it was migrated by a newer version; upgrade diffuse")
    with _migration_lock(engine):
        try:
            with engine.begin() as conn:
                command.upgrade(alembic_config(conn), revision)
        except CommandError as e:
            raise UserError(f"prompt store {_safe(engine.url)}: migration failed: {e}") from None
    after = current()
    if before != after:
        log.info("prompt store %s migrated: %s -> %s", _safe(engine.url), before or "empty", after)
    return before, after


def _connect_checked(engine, fn):
    try:
        return fn()
    except OperationalError as e:
        raise UserError(f"prompt store {_safe(engine.url)} is unreachable: {str(e.orig).strip()[:300]}") from None


def open_store(url: str, upgrade: bool = True) -> PromptStore:
    """The store at URL, its schema upgraded to the newest migration (upgrade=False: as it is)."""
    engine = _engine(url)
    if upgrade:
        migrate(engine)
    return PromptStore(engine)


# ------------------------------------------------------------------ the store


def _now() -> datetime:
    return datetime.now(UTC)


class PromptStore:
    def __init__(self, engine):
        self.engine = engine
        self.Session = sessionmaker(engine, expire_on_commit=False)

    @property
    def url(self) -> str:
        return _safe(self.engine.url)

    def close(self) -> None:
        self.engine.dispose()

    # ---- prompts

    def add(self, records: Iterable[dict], check: GenerationConfig | None = None) -> list[int]:
        """Insert prompt rows (already parsed: parse_prompt); with `check`, a record with problems is a UserError
        and nothing is inserted. Returns the new ids."""
        rows = list(records)
        if check is not None:
            for i, r in enumerate(rows):
                why = problems(r, check)
                if why:
                    raise UserError(why if len(rows) == 1 else f"prompt {i + 1} ({r.get('text', '')[:40]!r}): {why}")
        with self.Session.begin() as s:
            objs = [Prompt(status=PENDING, **r) for r in rows]
            s.add_all(objs)
            s.flush()
            return [o.id for o in objs]

    def prompts(self, ids: Iterable[int] | None = None, status: str | None = None, limit: int | None = None,
                ) -> list[Prompt]:
        if status is not None and status not in STATUSES:
            raise UserError(f"unknown status {status!r}: choose one of {', '.join(STATUSES)}")
        q = select(Prompt).order_by(Prompt.id)
        if ids is not None:
            q = q.where(Prompt.id.in_(list(ids)))
        if status is not None:
            q = q.where(Prompt.status == status)
        if limit is not None:
            q = q.limit(limit)
        with self.Session() as s:
            return list(s.scalars(q))

    def pending(self, model_name: str, model_version: str) -> list[int]:
        """Prompts with fewer outputs for (model_name, model_version) than images asked for, and no blocking
        failure for that version; highest priority first, then oldest."""
        done = (select(Output.prompt_id, func.count().label("n"))
                .where(Output.model_name == model_name, Output.model_version == model_version)
                .group_by(Output.prompt_id).subquery())
        blocked = (select(Failure.id).where(Failure.prompt_id == Prompt.id, Failure.model_name == model_name,
                                            Failure.model_version == model_version, Failure.blocking))
        q = (select(Prompt.id).outerjoin(done, done.c.prompt_id == Prompt.id)
             .where(func.coalesce(done.c.n, 0) < Prompt.num_images, ~blocked.exists())
             .order_by(Prompt.priority.desc(), Prompt.id))
        with self.Session() as s:
            return list(s.scalars(q))

    def done_seeds(self, prompt_ids: list[int], model_name: str, model_version: str) -> dict[int, set[int]]:
        out: dict[int, set[int]] = {i: set() for i in prompt_ids}
        with self.Session() as s:
            for chunk in _chunks(prompt_ids, 500):
                q = select(Output.prompt_id, Output.seed).where(
                    Output.prompt_id.in_(chunk), Output.model_name == model_name,
                    Output.model_version == model_version)
                for pid, seed in s.execute(q):
                    out[pid].add(seed)
        return out

    # ---- results

    def record_outputs(self, rows: list[dict]) -> int:
        """Insert output rows in one transaction; a row whose (prompt, model, version, seed) exists is ignored
        (another worker finished it first). Call only after the image objects are completely written.
        Returns how many rows were new."""
        if not rows:
            return 0
        dialect = self.engine.dialect.name
        if dialect in ("sqlite", "postgresql"):
            insert = import_module(f"sqlalchemy.dialects.{dialect}").insert
            stmt = insert(Output).on_conflict_do_nothing(
                index_elements=["prompt_id", "model_name", "model_version", "seed"])
            with self.engine.begin() as conn:
                return sum(conn.execute(stmt, [r]).rowcount for r in rows)

        n = 0
        for r in rows:  # other databases: one transaction per row
            try:
                with self.Session.begin() as s:
                    s.add(Output(**r))
                n += 1
            except IntegrityError:
                pass
        return n

    def record_failure(self, prompt_id: int, model_name: str, model_version: str, run_id: str, kind: str,
                       reason: str, blocking: bool) -> None:
        with self.Session.begin() as s:
            s.add(Failure(prompt_id=prompt_id, model_name=model_name, model_version=model_version, run_id=run_id,
                          kind=kind, reason=reason[:4000], blocking=blocking))
            p = s.get(Prompt, prompt_id)
            if p is not None:
                p.status, p.reason = (SKIPPED if kind == "skipped" else FAILED), reason[:4000]
                p.last_run_id, p.updated_at = run_id, _now()

    def mark_done(self, prompt_ids: list[int], run_id: str) -> None:
        if not prompt_ids:
            return
        with self.Session.begin() as s:
            for chunk in _chunks(prompt_ids, 500):
                s.execute(update(Prompt).where(Prompt.id.in_(chunk))
                          .values(status=DONE, reason=None, last_run_id=run_id, updated_at=_now()))

    def retry(self, ids: list[int] | None = None) -> int:
        """Clear the blocking failures of these prompts (all failed/skipped prompts when ids is None) so the next
        run tries them again. Returns how many prompts were reset."""
        with self.Session.begin() as s:
            q = select(Prompt.id).where(Prompt.status.in_([FAILED, SKIPPED]))
            if ids is not None:
                q = select(Prompt.id).where(Prompt.id.in_(ids))
            target = list(s.scalars(q))
            for chunk in _chunks(target, 500):
                s.execute(delete(Failure).where(Failure.prompt_id.in_(chunk), Failure.blocking))
                s.execute(update(Prompt).where(Prompt.id.in_(chunk)).values(status=PENDING, reason=None))
        return len(target)

    def outputs(self, run_id: str | None = None, model_name: str | None = None,
                model_version: str | None = None) -> list[tuple[Output, Prompt]]:
        q = select(Output, Prompt).join(Prompt, Prompt.id == Output.prompt_id).order_by(Output.prompt_id,
                                                                                         Output.seed)
        if run_id is not None:
            q = q.where(Output.run_id == run_id)
        if model_name is not None:
            q = q.where(Output.model_name == model_name, Output.model_version == model_version)
        with self.Session() as s:
            return [tuple(r) for r in s.execute(q)]

    def failures(self, run_id: str) -> list[tuple[Failure, Prompt]]:
        q = (select(Failure, Prompt).join(Prompt, Prompt.id == Failure.prompt_id).where(Failure.run_id == run_id)
             .order_by(Failure.prompt_id, Failure.id))
        with self.Session() as s:
            return [tuple(r) for r in s.execute(q)]


def _chunks(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


# ------------------------------------------------------------------ import


def _read_records(path: Path) -> list[tuple[int, dict | str]]:
    """(line number, record) per line of a .jsonl / .csv file; a string instead of a record says what is wrong."""
    if not path.is_file():
        raise UserError(f"prompt file not found: {path}")
    text = path.read_text(encoding="utf-8-sig")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        out: list[tuple[int, dict | str]] = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                out.append((n, f"not JSON ({e.msg})"))
                continue
            out.append((n, rec if isinstance(rec, dict) else "not a JSON object"))
        return out
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        if not reader.fieldnames or "text" not in reader.fieldnames:
            raise UserError(f"{path}: a CSV of prompts needs a header row with a `text` column "
                            f"(found: {', '.join(reader.fieldnames or []) or 'no header'})")
        rows: list[tuple[int, dict | str]] = []
        for rec in reader:
            if None in rec:
                rows.append((reader.line_num, "more cells than header columns"))
            else:
                rows.append((reader.line_num, rec))
        return rows
    raise UserError(f"{path}: unknown prompt file type {suffix or '(none)'}; use .jsonl or .csv")


@dataclass(frozen=True)
class Rejected:
    line: int  # in the file (the CSV header is line 1)
    reason: str


@dataclass(frozen=True)
class ImportResult:
    ids: list[int]  # of the prompts added, in file order
    rejected: list[Rejected]

    @property
    def added(self) -> int:
        return len(self.ids)


def import_file(store: PromptStore, path: Path, gc: GenerationConfig) -> dict:
    """Add every good record of a JSONL/CSV file (fields: see PromptIn; a condition_image path is relative to the
    file); a bad record (an unreadable doodle too) is reported with its line number and left out, the rest are
    added."""
    good, rejected = [], []
    for line, rec in _read_records(Path(path)):
        if isinstance(rec, str):
            rejected.append(Rejected(line, rec))
            continue
        try:
            row = parse_prompt(rec, gc, base_dir=Path(path).parent)  # doodle paths are relative to the file
        except UserError as e:
            rejected.append(Rejected(line, str(e)))
            continue
        why = problems(row, gc)
        if why:
            rejected.append(Rejected(line, why))
        else:
            good.append(row)
    ids = store.add(good) if good else []
    return ImportResult(ids, rejected)
