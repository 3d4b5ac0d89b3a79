"""The data gate: a Great Expectations suite over a prepared dataset, run before anything trains on it.

Two GX data assets: the manifest (one row per item) and one row of dataset-level statistics (quarantine and
duplicate rates, near-constant images, caption vocabulary, item count, image shape, shard layout). Each check is
hard (a failure fails the gate: `diffuse data validate` exits 1) or soft (a warning); thresholds and severities
come from the `validation:` config section (pipeline/config.py: ValidationConfig, VALIDATION_CHECKS). A bucketed
dataset (pipeline/data/buckets.py) passes image_shape when every shard holds one of dataset.json's buckets within
the pixel budget resolution^2, and shards_match_manifest when every item's shard holds images of its manifest
width and height.

Written next to the dataset, in DATASET.validation/ (outside the dataset folder: DVC forbids one stage's output
inside another's, and writing into the dataset would change the ingest stage's output):
    validation.json     success, statistics, one entry per check (a DVC metrics file; no timestamps, so the
                        same data gives the same file)
    docs/index.html     GX data docs of this run
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from rich.markup import escape
from rich.table import Table

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")  # read when GX is imported: no network calls from a run
import great_expectations as gx  # noqa: E402
import great_expectations.expectations as gxe  # noqa: E402
from great_expectations.data_context.types.base import (  # noqa: E402
    DataContextConfig,
    InMemoryStoreBackendDefaults,
    ProgressBarsConfig,
)
from great_expectations.expectations.metadata_types import FailureSeverity  # noqa: E402

from pipeline.config import ValidationConfig, load_section, read_yaml
from pipeline.data.prepared import (
    CONDITIONS_DIR,
    IMAGES_DIR,
    SHARD_PATTERN,
    SIZE_COLUMNS,
    PreparedDataset,
    open_prepared,
)
from pipeline.errors import UserError

REQUIRED_COLUMNS = ("id", "caption", "split", "sha256", "shard", "index", "pixel_std", "near_duplicate_of")
SHARDS_MATCH = "matches the manifest"
WORD = re.compile(r"[^\W\d_]+", re.UNICODE)  # words of letters: digits and punctuation do not widen a vocabulary


@dataclass
class CheckResult:
    name: str
    severity: str  # "hard" | "soft"
    success: bool
    expected: str
    observed: str


@dataclass
class ValidationResult:
    dataset: str
    version: str
    path: str  # the dataset folder
    statistics: dict
    checks: list[CheckResult]
    report: str = ""  # validation.json
    docs: str = ""  # data docs index.html
    skipped: list[str] = field(default_factory=list)  # checks turned off in the config

    @property
    def hard_failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success and c.severity == "hard"]

    @property
    def soft_failures(self) -> list[CheckResult]:
        return [c for c in self.checks if not c.success and c.severity == "soft"]

    @property
    def success(self) -> bool:
        """The gate passes when no hard check failed (soft failures only warn)."""
        return not self.hard_failures

    def to_dict(self) -> dict:
        return {"dataset": self.dataset, "version": self.version, "success": self.success,
                "hard_failures": len(self.hard_failures), "soft_failures": len(self.soft_failures),
                "statistics": self.statistics,
                "checks": {c.name: {k: v for k, v in asdict(c).items() if k != "name"} for c in self.checks},
                "skipped": self.skipped}


# ---------------------------------------------------------------- statistics


def _headers(ds: PreparedDataset, folder: str) -> list[tuple[int, ...] | str]:
    """Each shard's array shape in `folder` (from its .npy header: no pixels are read), or what is wrong with it."""
    out = []
    for i in range(int(ds.info.get("num_shards", 0))):
        f = ds.path / folder / SHARD_PATTERN.format(i)
        name = f"{folder}/{f.name}"
        try:
            arr = np.load(f, mmap_mode="r")
        except FileNotFoundError:
            out.append(f"missing {name}")
            continue
        except (OSError, ValueError) as e:
            out.append(f"unreadable {name} ({e})")
            continue
        ok = arr.ndim == 4 and arr.dtype == np.uint8 and arr.shape[-1] == 3
        out.append(arr.shape if ok else f"{name}: {arr.dtype} array of shape {arr.shape}, expected (n, H, W, 3) uint8")
    return out


def bucketed_shape(resolution: int) -> str:
    """The image_shape statistic of a good bucketed dataset."""
    return f"buckets within {resolution}x{resolution} px"


def _image_shape(ds: PreparedDataset, images: list, conditions: list, resolution: int) -> str:
    """The common image shape of all shards ("RxRx3"), or for a bucketed dataset whether every shard holds one of
    dataset.json's buckets within the pixel budget resolution^2; a missing, unreadable or odd shard is named, so
    the image_shape check fails with the reason. Condition shards, when the dataset has them, must match the
    image shards shard for shard (same rows, same shape)."""
    problems = [h for h in images + conditions if isinstance(h, str)]
    if problems:
        return problems[0]
    if not images:
        return "no shards"
    for i, (image, condition) in enumerate(zip(images, conditions, strict=False)):
        if condition != image:
            where = f"{CONDITIONS_DIR}/{SHARD_PATTERN.format(i)}"
            if condition[0] != image[0]:
                return f"{where}: {condition[0]} rows, its image shard {image[0]}"
            return f"{where}: {_shape(condition)} images, its image shard {_shape(image)}"
    if not ds.is_bucketed:
        shapes = sorted({_shape(h) for h in images})
        return shapes[0] if len(shapes) == 1 else "mixed: " + ", ".join(shapes)
    buckets = {tuple(b) for b in ds.info["buckets"]}
    for i, (_, height, width, _) in enumerate(images):
        name = f"{IMAGES_DIR}/{SHARD_PATTERN.format(i)}"
        if (width, height) not in buckets:
            return f"{name}: {width}x{height} images, not one of dataset.json's buckets"
        if width * height > resolution * resolution:
            return f"{name}: {width}x{height} images, over the pixel budget of {resolution}x{resolution}"
    return bucketed_shape(resolution)


def _shape(header: tuple[int, ...]) -> str:
    return "x".join(map(str, header[1:]))


def _shard_layout(m: pd.DataFrame, images: list) -> str:
    """SHARDS_MATCH when the image shards hold exactly the manifest's rows, each at its (shard, index) and, where
    the manifest records them (bucketed datasets), of its width x height; else the first mismatch found."""
    lengths = np.array([0 if isinstance(h, str) else h[0] for h in images] + [0], dtype=np.int64)
    if lengths.sum() != len(m):
        return f"{lengths.sum()} shard rows for {len(m)} manifest rows"
    shard = m["shard"].fillna(-1).to_numpy(dtype=np.int64)
    index = m["index"].fillna(-1).to_numpy(dtype=np.int64)
    shard = np.where((shard >= 0) & (shard < len(images)), shard, len(images))  # past the end: the 0-row entry
    outside = np.flatnonzero((index < 0) | (index >= lengths[shard]))
    if len(outside):
        r = outside[0]
        return (f"{len(outside)} manifest rows point outside the shards, e.g. row {r} at (shard "
                f"{m['shard'].iloc[r]}, index {m['index'].iloc[r]})")
    if set(SIZE_COLUMNS) <= set(m.columns):
        stored = np.array([(0, 0) if isinstance(h, str) else h[1:3] for h in images],
                          dtype=np.int64).reshape(-1, 2)[shard]
        given = m[["height", "width"]].fillna(-1).to_numpy(dtype=np.int64)
        differ = np.flatnonzero((stored != given).any(axis=1))
        if len(differ):
            r = differ[0]
            return (f"{len(differ)} manifest rows' width x height differ from their shard's images, e.g. row {r}: "
                    f"{given[r, 1]}x{given[r, 0]} in the manifest, {stored[r, 1]}x{stored[r, 0]} in "
                    f"{IMAGES_DIR}/{SHARD_PATTERN.format(shard[r])}")
    return SHARDS_MATCH


def dataset_statistics(ds: PreparedDataset, cfg: ValidationConfig) -> dict:
    m = ds.manifest
    missing = [c for c in REQUIRED_COLUMNS if c not in m.columns]
    if missing:
        raise UserError(f"{ds.path}/manifest.parquet lacks columns {missing}; re-create the dataset with "
                        "`diffuse data ingest`")
    quarantine = ds.quarantine()
    kinds = Counter(q.get("kind", "unusable") for q in quarantine)
    n = len(m)
    source_items = n + len(quarantine)
    # exact duplicates: quarantined by ingest, plus any repeated (image, caption) pair still in the manifest
    exact = kinds["duplicate"] + int(m.duplicated(["sha256", "caption"]).sum())
    # near duplicates: quarantined (policy "quarantine") or kept and flagged (policy "flag")
    near = kinds["near_duplicate"] + int(m["near_duplicate_of"].notna().sum())
    unusable = len(quarantine) - kinds["duplicate"] - kinds["near_duplicate"]
    vocab = {w for c in m["caption"].dropna().astype(str) for w in WORD.findall(c.lower())}
    images = _headers(ds, IMAGES_DIR)
    conditions = _headers(ds, CONDITIONS_DIR) if ds.has_conditions else []
    resolution = cfg.resolution or int(ds.info.get("resolution", -1))
    per = max(source_items, 1)
    return {
        "num_items": n,
        "shard_rows": sum(h[0] for h in images if not isinstance(h, str)),
        "shard_layout": _shard_layout(m, images),
        "num_quarantined": len(quarantine),
        "source_items": source_items,
        "num_train": int((m["split"] == "train").sum()),
        "num_eval": int((m["split"] == "eval").sum()),
        "distinct_images": int(m["sha256"].nunique()),
        "resolution": int(ds.info.get("resolution", -1)),
        "image_shape": _image_shape(ds, images, conditions, resolution),
        "quarantine_rate": round(unusable / per, 6),
        "exact_duplicate_rate": round(exact / per, 6),
        "near_duplicate_rate": round(near / per, 6),
        "near_constant_share": round(int((m["pixel_std"] < cfg.near_constant_std).sum()) / max(n, 1), 6),
        "caption_vocabulary": len(vocab),
    }


# ---------------------------------------------------------------- the suite


def _expectations(cfg: ValidationConfig, resolution: int, bucketed: bool):
    """(check name, frame "manifest" | "stats", GX expectation, readable expectation) for every check."""
    lo, hi = cfg.caption_min_chars, cfg.caption_max_chars
    shape = bucketed_shape(resolution) if bucketed else f"{resolution}x{resolution}x3"
    layout = "shard rows == manifest rows, each at its (shard, index)" + (" and width x height" if bucketed else "")
    return [
        ("ids_present", "manifest", gxe.ExpectColumnValuesToNotBeNull(column="id"), "every item has an id"),
        ("ids_unique", "manifest", gxe.ExpectColumnValuesToBeUnique(column="id"), "ids unique"),
        ("captions_present", "manifest", gxe.ExpectColumnValuesToNotBeNull(column="caption"), "no null caption"),
        ("captions_not_blank", "manifest", gxe.ExpectColumnValuesToMatchRegex(column="caption", regex=r"\S"),
         "no empty or whitespace-only caption"),
        ("caption_length", "manifest", gxe.ExpectColumnValueLengthsToBeBetween(column="caption", min_value=lo,
                                                                               max_value=hi),
         f"caption length {lo}..{hi} characters"),
        ("image_caption_pairs_unique", "manifest",
         gxe.ExpectCompoundColumnsToBeUnique(column_list=["sha256", "caption"]),
         "(image sha256, caption) pairs unique"),
        ("split_values", "manifest", gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["train", "eval"]),
         "split is train or eval"),
        ("shard_rows_unique", "manifest", gxe.ExpectCompoundColumnsToBeUnique(column_list=["shard", "index"]),
         "each shard row belongs to one item"),
        ("item_count", "stats", gxe.ExpectColumnValuesToBeBetween(column="num_items", min_value=cfg.min_items),
         f">= {cfg.min_items} items"),
        ("shards_match_manifest", "stats",
         gxe.ExpectColumnValuesToBeInSet(column="shard_layout", value_set=[SHARDS_MATCH]), layout),
        ("resolution", "stats", gxe.ExpectColumnValuesToBeInSet(column="resolution", value_set=[resolution]),
         f"{resolution} in dataset.json"),
        ("image_shape", "stats", gxe.ExpectColumnValuesToBeInSet(column="image_shape", value_set=[shape]),
         f"shard images of dataset.json's buckets, within {resolution}x{resolution} px" if bucketed
         else f"shard images {shape}"),
        ("quarantine_rate", "stats", _at_most(gxe, "quarantine_rate", cfg.max_quarantine_rate),
         f"<= {cfg.max_quarantine_rate}"),
        ("exact_duplicate_rate", "stats", _at_most(gxe, "exact_duplicate_rate", cfg.max_exact_duplicate_rate),
         f"<= {cfg.max_exact_duplicate_rate}"),
        ("near_duplicate_rate", "stats", _at_most(gxe, "near_duplicate_rate", cfg.max_near_duplicate_rate),
         f"<= {cfg.max_near_duplicate_rate}"),
        ("near_constant_share", "stats", _at_most(gxe, "near_constant_share", cfg.max_near_constant_share),
         f"<= {cfg.max_near_constant_share} (pixel std < {cfg.near_constant_std})"),
        ("caption_vocabulary", "stats",
         gxe.ExpectColumnValuesToBeBetween(column="caption_vocabulary", min_value=cfg.min_caption_vocabulary),
         f">= {cfg.min_caption_vocabulary} words"),
    ]


def _at_most(gxe, column: str, limit: float):
    return gxe.ExpectColumnValuesToBeBetween(column=column, min_value=0, max_value=limit)


def _context(docs_dir: Path):
    """An in-memory GX context whose only data docs site is docs_dir (no GX project files, no analytics)."""
    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
        data_docs_sites={"dataset": {"class_name": "SiteBuilder", "show_how_to_buttons": False,
                                     "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                                                       "base_directory": str(docs_dir.resolve())},
                                     "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"}}},
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False),
    )
    return gx.get_context(project_config=config, mode="ephemeral")


def _observed(result, frame: str, stats: dict) -> str:
    """What GX saw, in a line: the statistic itself, or how many rows failed and a few of them."""
    if result.exception_info and result.exception_info.get("raised_exception"):
        return f"error: {result.exception_info.get('exception_message')}"
    if frame == "stats":
        kw = result.expectation_config.kwargs
        return " vs ".join(str(stats.get(kw[k])) for k in ("column", "column_A", "column_B") if k in kw)
    r = result.result or {}
    bad = r.get("unexpected_count") or 0
    if not bad:
        return f"{r.get('element_count', '?')} rows ok"
    sample = (r.get("partial_unexpected_list") or [])[:3]
    return f"{bad} of {r.get('element_count', '?')} rows, e.g. {sample!r}"


def default_out_dir(dataset_path: Path) -> Path:
    return dataset_path.with_name(dataset_path.name + ".validation")


def validate_dataset(name_or_path: str | Path, cfg: ValidationConfig | None = None,
                     out_dir: Path | None = None) -> ValidationResult:
    """Run the suite over a prepared dataset; write validation.json and the data docs to out_dir
    (default DATASET.validation/ beside the dataset). Never raises for failed checks: see .success."""
    cfg = cfg or ValidationConfig()
    ds = open_prepared(name_or_path)
    stats = dataset_statistics(ds, cfg)
    resolution = cfg.resolution or stats["resolution"]
    out_dir = Path(out_dir) if out_dir else default_out_dir(ds.path)
    docs_dir = out_dir / "docs"
    shutil.rmtree(docs_dir, ignore_errors=True)  # the docs show this run only
    docs_dir.mkdir(parents=True)

    ctx = _context(docs_dir)
    source = ctx.data_sources.add_pandas("prepared")
    frames = {"manifest": ds.manifest, "stats": pd.DataFrame([stats])}
    suites, checks, skipped = {}, {}, []
    for name, frame, expectation, expected in _expectations(cfg, resolution, ds.is_bucketed):
        severity = cfg.severity_of(name)
        if severity == "off":
            skipped.append(name)
            continue
        expectation.severity = FailureSeverity.CRITICAL if severity == "hard" else FailureSeverity.WARNING
        expectation.meta = {"check": name, "gate": severity}
        if frame not in suites:
            suites[frame] = ctx.suites.add(gx.ExpectationSuite(name=f"{ds.name}.{frame}"))
        suites[frame].add_expectation(expectation)
        checks[name] = (frame, severity, expected)

    results: dict[str, CheckResult] = {}
    for frame, suite in suites.items():
        batch = source.add_dataframe_asset(frame).add_batch_definition_whole_dataframe("all")
        vd = ctx.validation_definitions.add(gx.ValidationDefinition(name=f"{ds.name}.{frame}", data=batch,
                                                                    suite=suite))
        run = vd.run(batch_parameters={"dataframe": frames[frame]}, result_format="SUMMARY")
        for r in run.results:
            name = r.expectation_config.meta["check"]
            _, severity, expected = checks[name]
            results[name] = CheckResult(name, severity, bool(r.success), expected, _observed(r, frame, stats))
    ctx.build_data_docs(site_names=["dataset"])

    result = ValidationResult(dataset=ds.name, version=ds.version, path=str(ds.path), statistics=stats,
                              checks=[results[n] for n in checks], skipped=skipped,
                              report=str(out_dir / "validation.json"), docs=str(docs_dir / "index.html"))
    Path(result.report).write_text(json.dumps(result.to_dict(), indent=2) + "\n")
    return result


def config_from_file(path: Path | None) -> ValidationConfig:
    """The `validation:` section of a config file; a training config's data.resolution is the expected
    resolution unless validation.resolution says otherwise (one file configures everything)."""
    cfg = load_section(path, "validation", ValidationConfig)
    if path is not None and cfg.resolution is None:
        data = read_yaml(path).get("data")
        if isinstance(data, dict) and isinstance(data.get("resolution"), int):
            cfg = cfg.model_copy(update={"resolution": data["resolution"]})
    return cfg


def summary_table(result: ValidationResult):
    status = "passed" if result.success else "FAILED"
    table = Table(title=f"validation of {result.dataset} ({result.version[:12]}): {status}", title_justify="left")
    for col in ("check", "gate", "result"):
        table.add_column(col, no_wrap=True)
    for col in ("expected", "observed"):
        table.add_column(col, overflow="fold")
    order = {False: 0, True: 1}  # failures first
    for c in sorted(result.checks, key=lambda c: (order[c.success], c.severity != "hard")):
        mark = "[green]ok[/]" if c.success else ("[bold red]FAIL[/]" if c.severity == "hard" else "[yellow]warn[/]")
        table.add_row(c.name, c.severity, mark, escape(c.expected), escape(c.observed))  # "[nan]" is no markup
    return table
