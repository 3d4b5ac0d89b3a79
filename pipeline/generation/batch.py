"""Batch generation: every pending prompt of the store -> images from one model version, exactly once.

The functions Airflow tasks call (each takes and returns plain strings / JSON-able dicts):

    resolve_version(model_uri, config=None) -> {"name", "version", "uri", "run_id"}
    pending_prompts(store_url, model_name, version) -> [prompt id, ...]
    generate_shard(model_uri, shard="0/1", store_url=None, artifact_root=None, run_id=None, limit=None,
                   config=None, device="cpu") -> ShardSummary

and pipeline/generation/gallery.py writes the run's record: write_gallery(run_id, ...) -> {"manifest", "gallery", ...}

How "exactly once" holds: an image's object key is fixed by (model, version, prompt, seed); the PNG is written
completely first (pipeline/generation/artifacts.py), and only then is its output row inserted, unique on
(prompt, model name, model version, seed). A crash between the two leaves an object without a row: the rerun
writes the same key again (same seed -> the same image; at most one intensity level apart when the batch
composition differs) and inserts the row once, with the sha256 of the bytes now stored. Rows never point at
missing or partial objects.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import torch
from sqlalchemy.exc import OperationalError

from pipeline import storage
from pipeline.config import (
    CoverageConfig,
    GenerationConfig,
    TrackingConfig,
    load_section,
)
from pipeline.data.doodle import doodle_tensor
from pipeline.data.loader import open_training_data
from pipeline.data.report import CoverageIndex
from pipeline.errors import UserError
from pipeline.generation.artifacts import ArtifactStore, StorageUnavailable
from pipeline.generation.prompt_store import open_store, problems
from pipeline.generation.prompt_store import store_url as default_store
from pipeline.images import image_to_tensor, open_image, png_bytes
from pipeline.model.folder import load_model, read_train_config
from pipeline.model.network import size_multiple
from pipeline.model.sampling import encoder_for, generate
from pipeline.registry.client import tracking_uri
from pipeline.registry.model_uri import resolve_model, version_label

log = logging.getLogger(__name__)
LOCAL_MODEL_NAME = "local"


# ------------------------------------------------------------------ what a run reports


@dataclass(frozen=True)
class PromptFailure:
    prompt_id: int
    text: str  # the prompt, cut to 200 characters
    kind: str  # invalid | transient | error | skipped (by the coverage policy)
    reason: str


@dataclass(frozen=True)
class GeneratedBy:
    name: str  # registered model name, or "local" for a model directory
    version: str  # registry version, or the content hash of a local model
    uri: str  # what every shard of the run loads: models:/NAME/VERSION or the directory
    requested: str  # what was asked for, e.g. models:/NAME@champion


@dataclass(frozen=True)
class CoverageSummary:
    counts: dict[str, int]  # in_span / outside_span / not scored -> prompts
    threshold: float
    policy: str
    unavailable: str | None  # why prompts could not be scored, if they could not


@dataclass
class ShardSummary:
    run_id: str
    model: GeneratedBy
    shard: str  # I/N
    store: str
    artifact_root: str
    prompts: int = 0  # pending prompts of this shard taken in this run
    images: int = 0  # images made now
    images_already_done: int = 0  # images of those prompts a run before had made
    done: int = 0  # prompts with all their images now
    failed: list[PromptFailure] = field(default_factory=list)
    skipped: list[PromptFailure] = field(default_factory=list)
    coverage: CoverageSummary | None = None
    batches: int = 0
    groups: int = 0  # of compatible settings (one sampling call can serve each)
    seconds: float = 0.0
    sample_seconds: float = 0.0
    images_per_second: float = 0.0


# ------------------------------------------------------------------ model and shard


def parse_shard(shard: str | tuple[int, int]) -> tuple[int, int]:
    """'I/N' (0 <= I < N) -> (I, N)."""
    if isinstance(shard, tuple):
        i, n = shard
    else:
        try:
            i, n = (int(x) for x in str(shard).split("/"))
        except ValueError:
            raise UserError(f"--shard expects I/N with 0 <= I < N (e.g. 0/4), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {i}/{n}: needs N >= 1 and 0 <= I < N (shards are numbered from 0)")
    return i, n


def shard_of(prompt_id: int, num_shards: int) -> int:
    """The shard a prompt belongs to: a hash of its id, the same in every process and on every machine."""
    digest = hashlib.sha256(str(int(prompt_id)).encode()).digest()
    return int.from_bytes(digest[:8], "big") % num_shards


def _local_version(model_dir: Path) -> str:
    """A local model directory has no registry version: its content (weights + conditioning) names it."""
    h = hashlib.sha256()
    files = sorted(p for p in (model_dir / "unet").iterdir() if p.is_file()) + [model_dir / "conditioning.json"]
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha-" + h.hexdigest()[:16]


@dataclass(frozen=True)
class ModelRef:
    name: str
    version: str
    uri: str
    model_dir: Path
    run_id: str | None


def _tracking(config: str | Path | None) -> TrackingConfig:
    return load_section(Path(config) if config else None, "tracking", TrackingConfig)


def resolve(model_uri: str, config: str | Path | None = None) -> ModelRef:
    """models:/NAME@ALIAS -> the concrete version (once per run); a local model dir -> ('local', content hash)."""
    s = str(model_uri)
    r = resolve_model(s, tracking_uri(_tracking(config)) if s.startswith("models:/") else None)
    if r.name is None:
        return ModelRef(LOCAL_MODEL_NAME, _local_version(r.model_dir), str(r.model_dir.resolve()), r.model_dir, None)
    return ModelRef(r.name, str(r.version), f"models:/{r.name}/{r.version}", r.model_dir, r.run_id)


def resolve_version(model_uri: str, config: str | None = None) -> dict:
    """For a DAG's first task: pin the alias to one version, then hand `uri` (models:/NAME/VERSION) to every shard
    so a champion that moves mid-run does not split the run across versions."""
    m = resolve(model_uri, config)
    return {"name": m.name, "version": m.version, "uri": m.uri, "run_id": m.run_id}


def pending_prompts(store_url: str, model_name: str, version: str) -> list[int]:
    """Prompt ids that still lack images from (model_name, version), highest priority first."""
    store = open_store(store_url)
    try:
        return store.pending(model_name, str(version))
    finally:
        store.close()


def new_run_id() -> str:
    return f"gen-{datetime.now(UTC):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


# ------------------------------------------------------------------ coverage guard


@dataclass
class CoverageGuard:
    """Scores prompts against the training data of the model version; `unavailable` says why it cannot."""

    index: object | None
    unavailable: str | None

    def score(self, texts: list[str]) -> dict[str, tuple[float | None, str, str]]:
        """text -> (score, flag, nearest caption); flag is in_span, outside_span or 'skipped: why'."""
        if self.index is None:
            return {t: (None, f"skipped: {self.unavailable}", "") for t in texts}
        uniq = sorted(set(texts))
        return {c.prompt: (round(float(c.score), 4), "in_span" if c.in_span else "outside_span",
                           c.nearest[0][0] if c.nearest else "") for c in self.index.score(uniq, k=1)}


def coverage_guard(model_dir: Path, cov: CoverageConfig) -> CoverageGuard:
    """The CoverageIndex of the data this model was trained on (model_dir/train_config.yaml -> data.path, read the
    way the trainer read it). Data not available here -> no index and the reason (recorded, never faked)."""
    try:
        cfg = read_train_config(model_dir)
    except UserError as e:
        return CoverageGuard(None, f"training data not available (train_config.yaml unreadable: {str(e)[:200]})")
    if cfg is None:
        return CoverageGuard(None, "training data not available (the model has no train_config.yaml)")
    data_cfg, ingest_cfg, ctx_cfg = cfg.data, cfg.ingest, cfg.context
    if not Path(data_cfg.path).exists():
        return CoverageGuard(None, f"training data not available ({data_cfg.path} not found here)")
    if ctx_cfg.encoder == "category":
        return CoverageGuard(None, "class-label model: coverage needs a text encoder")
    try:
        td = open_training_data(data_cfg, ingest_cfg)
        return CoverageGuard(CoverageIndex.build(td.dataset, ctx_cfg, cov), None)
    except UserError as e:
        return CoverageGuard(None, f"training data not available ({str(e)[:200]})")


# ------------------------------------------------------------------ planning


@dataclass
class Job:
    """One prompt's work in this run."""

    prompt: object  # models.Prompt
    seeds: list[int]
    init: object | None = None  # (3, S, S) tensor for img2img (S: the prompt's size, default the model's)
    cond: object | None = None  # (3, S, S) condition image (the prompt's doodle) in [-1, 1]
    coverage: tuple[float | None, str, str] = (None, "skipped: not scored", "")
    remaining: set[int] = field(default_factory=set)
    failed: bool = False


def _group_key(p, resolution: int) -> tuple:
    """Requests that can share one sampling call: same sampler, steps, guidance, size, img2img or not with the
    same strength, and with a doodle or not (negative prompts, seeds, init images and doodles may differ per
    image)."""
    init = bool(p.init_image_uri)
    return (p.sampler, p.steps, float(p.guidance), p.size or resolution, init, float(p.strength) if init else None,
            p.condition_image is not None)


def _load_init(uri: str, resolution: int):
    """(tensor, None) or (None, (kind, reason)): an unreachable store is transient, anything else invalid."""
    try:
        image = open_image(storage.read_bytes(uri), f"init image {uri}")
    except storage.StorageError as e:
        return None, ("transient" if isinstance(e, storage.Unreachable) else "invalid", f"init image unreadable: {e}")
    except UserError as e:
        return None, ("invalid", str(e))
    return image_to_tensor(image, resolution), None


def _model_problem(p, loaded) -> str | None:
    spec = loaded.spec
    multiple = size_multiple(spec, loaded.unet)
    if p.size is not None and p.size % multiple:
        return f"size {p.size}: this model makes images whose side is a multiple of {multiple} (trained at " \
               f"{spec.resolution}x{spec.resolution})"
    if p.condition_image is not None and not spec.condition_channels:
        return ("the prompt has a doodle, but this model was trained without a condition image and cannot follow "
                "one (generate it with a model trained with context.image_condition)")
    enc = encoder_for(spec)
    if spec.encoder == "category":
        if p.text not in enc.index:
            return f"unknown category {p.text!r}; this model knows: {', '.join(enc.categories)}"
        return None
    for what, t in (("prompt", p.text), ("negative prompt", p.negative_prompt)):
        if t and enc.overlong(t):
            return f"{what} is longer than the model's text encoder takes ({spec.max_length} tokens)"
    return None


# ------------------------------------------------------------------ the run


def _key(model: ModelRef, prompt_id: int, seed: int) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model.name)
    return f"images/{safe}/{version_label(model.version)}/p{prompt_id}/s{seed}.png"


class _Run:
    def __init__(self, store, art, model: ModelRef, loaded, gc: GenerationConfig, run_id: str, device: str):
        self.store, self.art, self.model, self.loaded, self.gc = store, art, model, loaded, gc
        self.run_id, self.device = run_id, device
        self.failed: list[PromptFailure] = []
        self.skipped: list[PromptFailure] = []
        self.images = 0
        self.sample_seconds = 0.0

    def fail(self, job: Job, kind: str, reason: str) -> None:
        p = job.prompt
        blocking = kind in ("invalid", "skipped")
        self.store.record_failure(p.id, self.model.name, self.model.version, self.run_id, kind, reason, blocking)
        rec = PromptFailure(p.id, p.text[:200], kind, reason)
        (self.skipped if kind == "skipped" else self.failed).append(rec)
        job.failed = True
        log.warning("prompt %d %s: %s", p.id, "skipped" if kind == "skipped" else "failed", reason)

    def sample(self, key: tuple, items: list[tuple[Job, int]]):
        sampler, steps, guidance, size, init, strength, doodle = key
        p_list = [j.prompt for j, _ in items]
        inits = torch.stack([j.init for j, _ in items]) if init else None
        conds = torch.stack([j.cond for j, _ in items]) if doodle else None
        dtype = torch.bfloat16 if self.device.startswith("cuda") else None
        return generate(self.loaded, [p.text for p in p_list], [s for _, s in items], sampler=sampler, steps=steps,
                        guidance=guidance, negative_prompts=[p.negative_prompt or "" for p in p_list],
                        init_images=inits, strength=strength if init else 1.0, batch_size=len(items),
                        autocast_dtype=dtype, cond_images=conds, image_guidance=self.gc.image_guidance, width=size,
                        height=size)

    def batch(self, key: tuple, items: list[tuple[Job, int]]) -> None:
        items = [(j, s) for j, s in items if not j.failed]
        if not items:
            return
        t0 = time.perf_counter()
        try:
            images = self.sample(key, items)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as e:
            if len({id(j) for j, _ in items}) > 1:  # find the prompt that breaks the batch; the others go on
                log.warning("a batch of %d images failed (%s: %s); sampling its prompts one by one", len(items),
                            type(e).__name__, e)
                by_job: dict[int, list] = defaultdict(list)
                for j, s in items:
                    by_job[id(j)].append((j, s))
                for group in by_job.values():
                    self.batch(key, group)
                return
            self.fail(items[0][0], "error", f"sampling failed: {type(e).__name__}: {str(e)[:300]}")
            return
        per_image = (time.perf_counter() - t0) / len(items)
        self.sample_seconds += time.perf_counter() - t0
        rows = []
        for (job, seed), img in zip(items, images, strict=True):
            if job.failed:
                continue
            p = job.prompt
            settings = {"sampler": key[0], "steps": key[1], "guidance": key[2], "size": key[3],
                        "negative_prompt": p.negative_prompt or "", "init_image_uri": p.init_image_uri,
                        "strength": p.strength if p.init_image_uri else None, "model_uri": self.model.uri}
            if p.condition_sha256:  # which doodle (the bytes are in the prompt store) and how strongly it was followed
                settings |= {"doodle_sha256": p.condition_sha256, "image_guidance": self.gc.image_guidance}
            meta = {"prompt": p.text, "prompt_id": p.id, "seed": seed, "model": self.model.name,
                    "version": self.model.version, **settings}
            data = png_bytes(img, meta)
            t1 = time.perf_counter()
            try:
                uri = self.art.put(_key(self.model, p.id, seed), data)
            except StorageUnavailable as e:
                self.fail(job, "transient", str(e))
                continue
            score, flag, _ = job.coverage
            rows.append({"prompt_id": p.id, "model_name": self.model.name, "model_version": self.model.version,
                         "seed": seed, "image_uri": uri, "sha256": hashlib.sha256(data).hexdigest(),
                         "settings": settings, "generate_seconds": round(per_image, 4),
                         "write_seconds": round(time.perf_counter() - t1, 4), "coverage_score": score,
                         "coverage": flag, "run_id": self.run_id})
        # the objects above are complete: only now do their rows exist
        self._record(rows)
        done = []
        for r in rows:
            job = next(j for j, s in items if j.prompt.id == r["prompt_id"])
            job.remaining.discard(r["seed"])
            if not job.remaining and not job.failed:
                done.append(job.prompt.id)
        self.store.mark_done(sorted(set(done)), self.run_id)
        self.images += len(rows)

    def _record(self, rows: list[dict]) -> None:
        try:
            self.store.record_outputs(rows)
        except OperationalError as e:
            raise UserError(f"prompt store {self.store.url} failed while recording outputs: "
                            f"{str(e.orig).strip()[:300]} (written images are kept; rerun to record them)") from None


def generate_shard(model_uri: str, shard: str | tuple[int, int] = "0/1", *, store_url: str | None = None,
                   artifact_root: str | None = None, run_id: str | None = None, limit: int | None = None,
                   config: str | Path | None = None, device: str = "cpu") -> ShardSummary:
    """Generate the missing images of this shard's pending prompts with one model version; returns a summary.

    model_uri: models:/NAME@ALIAS (resolved here, once), models:/NAME/VERSION, or a local model directory.
    shard: 'I/N' -- this call takes the pending prompts with shard_of(id, N) == I.
    limit: at most this many prompts (highest priority first)."""
    cfg_path = Path(config) if config else None
    gc = load_section(cfg_path, "generation", GenerationConfig)
    cov_cfg = load_section(cfg_path, "coverage", CoverageConfig)
    i, n = parse_shard(shard)
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be at least 1, got {limit}")
    if gc.num_threads:
        torch.set_num_threads(gc.num_threads)
    run_id = run_id or new_run_id()
    t_start = time.perf_counter()
    store = open_store(default_store(gc, store_url))
    art = ArtifactStore(artifact_root or gc.artifact_root, gc.retries, gc.backoff_seconds)
    model = resolve(model_uri, config)
    summary = ShardSummary(run_id, GeneratedBy(model.name, model.version, model.uri, str(model_uri)), f"{i}/{n}",
                           store.url, art.root)
    ids = [pid for pid in store.pending(model.name, model.version) if shard_of(pid, n) == i]
    if limit is not None:
        ids = ids[:limit]
    summary.prompts = len(ids)
    if not ids:
        store.close()
        summary.seconds = round(time.perf_counter() - t_start, 2)
        return summary

    loaded = load_model(model.model_dir, device)
    run = _Run(store, art, model, loaded, gc, run_id, device)
    prompts = {p.id: p for p in store.prompts(ids)}
    have = store.done_seeds(ids, model.name, model.version)
    jobs: list[Job] = []
    for pid in ids:  # priority order
        p = prompts[pid]
        seeds = [s for s in p.seeds() if s not in have[pid]]
        summary.images_already_done += p.num_images - len(seeds)
        jobs.append(Job(p, seeds, remaining=set(seeds)))

    # bad prompts fail here, before any sampling; the rest go on
    ok: list[Job] = []
    for job in jobs:
        p = job.prompt
        why = problems({c: getattr(p, c) for c in ("text", "negative_prompt", "sampler", "steps", "guidance",
                                                     "size", "seed", "num_images", "init_image_uri", "strength")}, gc)
        why = why or _model_problem(p, loaded)
        if why:
            run.fail(job, "invalid", why)
            continue
        side = p.size or loaded.spec.resolution
        if p.init_image_uri:
            job.init, err = _load_init(p.init_image_uri, side)
            if err:
                run.fail(job, *err)
                continue
        if p.condition_image is not None:
            try:
                job.cond = doodle_tensor(p.condition_image, side)
            except UserError as e:  # written by another writer without the check `prompts add` makes
                run.fail(job, "invalid", str(e))
                continue
        ok.append(job)

    guard = coverage_guard(model.model_dir, cov_cfg)
    scores = guard.score([j.prompt.text for j in ok]) if ok else {}
    counts: dict[str, int] = defaultdict(int)
    todo: list[Job] = []
    for job in ok:
        job.coverage = scores[job.prompt.text]
        score, flag, nearest = job.coverage
        counts[flag if not flag.startswith("skipped") else "not scored"] += 1
        if flag == "outside_span" and gc.coverage_policy == "skip":
            run.fail(job, "skipped", f"outside the training data's span: coverage {score:.3f} < threshold "
                     f"{cov_cfg.threshold} (nearest caption: {nearest!r}); generation.coverage_policy is skip")
            continue
        todo.append(job)
    summary.coverage = CoverageSummary(dict(counts), cov_cfg.threshold, gc.coverage_policy, guard.unavailable)

    groups: dict[tuple, list[tuple[Job, int]]] = defaultdict(list)
    for job in todo:
        if not job.seeds:  # every image exists already (a killed run stopped before marking it done)
            store.mark_done([job.prompt.id], run_id)
            continue
        groups[_group_key(job.prompt, loaded.spec.resolution)].extend((job, s) for s in job.seeds)
    batches = [(k, items[b:b + gc.batch_size]) for k, items in groups.items()
               for b in range(0, len(items), gc.batch_size)]
    summary.batches, summary.groups = len(batches), len(groups)
    log.info("run %s: %d prompts, %d images to make in %d batches (%d groups of compatible settings)", run_id,
             len(todo), sum(len(b) for _, b in batches), len(batches), len(groups))
    for k, (key, items) in enumerate(batches, 1):
        t0 = time.perf_counter()
        run.batch(key, items)
        log.info("batch %d/%d: %d images in %.1f s", k, len(batches), len(items), time.perf_counter() - t0)

    store.close()
    elapsed = time.perf_counter() - t_start
    summary.images, summary.failed, summary.skipped = run.images, run.failed, run.skipped
    summary.done = sum(1 for j in todo if not j.failed and not j.remaining)
    summary.seconds, summary.sample_seconds = round(elapsed, 2), round(run.sample_seconds, 2)
    summary.images_per_second = round(run.images / elapsed, 3) if elapsed > 0 else 0.0
    return summary
