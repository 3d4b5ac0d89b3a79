"""Image-text sources for `diffuse data ingest`: what is in a source, item by item, before decoding.

A source is a local folder or file, or the same on S3 (`s3://BUCKET/PREFIX`), read through pipeline/storage.py:
    an imagefolder   metadata.jsonl (one JSON object per line: file_name + a caption column) beside the images
    a CSV            one row per image: a path column (file_name, path, image, file) + a caption column
    WebDataset       .tar shards: members grouped by key, an image plus a .txt or .json caption
Condition images (a sketch per item): a metadata/CSV column names each item's condition file
(`condition_column`, e.g. `conditioning_image` as in diffusers' ControlNet scripts).

An item that cannot even be read becomes a RawItem with `error` set; ingest quarantines it and goes on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import posixpath
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline import storage
from pipeline.errors import UserError

IMAGE_EXTS = {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"}
CAPTION_COLUMNS = ("text", "caption")  # tried in this order when no caption column is given
PATH_COLUMNS = ("file_name", "path", "image", "file")
SOURCE_FILES = (".csv", ".tar", ".jsonl")


@dataclass
class RawItem:
    """One source item before decoding. `error` set: the item could not even be read (kind, reason)."""

    key: str  # what the user sees: relative path, s3:// URI or archive.tar#member
    caption: object = None
    label: str | None = None
    data: bytes | None = None
    error: tuple[str, str] | None = None
    condition: bytes | None = None  # the condition image file's bytes, when the item names one
    condition_key: str | None = None  # ...and that file's label (relative path or s3:// URI)


class Quarantined(Exception):
    """An item that cannot be used: `kind` (e.g. missing_file, corrupt) and the reason, for quarantine.jsonl."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind = kind


class SourceFiles:
    """The files of a source: a local folder or an s3:// prefix. Names are relative to it and may not leave it
    (absolute names, .., symlinks pointing outside are refused)."""

    def __init__(self, root: str | Path):
        self.root = str(root).rstrip("/") if storage.is_s3(root) else str(root)
        self.is_s3 = storage.is_s3(root)
        self._real = None if self.is_s3 else Path(root).resolve()

    def label(self, name: str) -> str:
        """How the item is named in the manifest: the relative path (local) or the full s3:// URI."""
        return f"{self.root}/{name}" if self.is_s3 else name

    def read(self, name: str) -> bytes:
        if not name or os.path.isabs(name) or name.startswith(("/", "\\")):
            raise Quarantined("unsafe_path", f"file_name {name!r} is absolute; it must be relative to the dataset")
        norm = posixpath.normpath(name)
        outside = norm == ".." or norm.startswith("../")
        if not outside and not self.is_s3:
            outside = not (Path(self.root) / name).resolve().is_relative_to(self._real)
        if outside:
            raise Quarantined("unsafe_path", f"file_name {name!r} points outside the dataset root "
                                             "(.. or a symlink); copy the file into the dataset")
        try:
            return storage.read_bytes(storage.join(self.root, norm if self.is_s3 else name))
        except storage.NotFound as e:
            if str(e).endswith("is a directory, not a file"):
                raise Quarantined("missing_file", f"{name} is a directory, not an image file") from None
            raise Quarantined("missing_file", f"file not found: {name}") from None
        except storage.StorageError as e:
            raise Quarantined("unreadable_file", f"cannot read {name}: {e}") from None


def _pick_column(columns, wanted: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if wanted:
        if wanted not in columns:
            raise UserError(f"{where}: no '{wanted}' {what} column (columns: {', '.join(map(str, columns))})")
        return wanted
    for c in candidates:
        if c in columns:
            return c
    raise UserError(f"{where}: no {what} column; expected one of {', '.join(candidates)} "
                    f"(columns: {', '.join(map(str, columns))}); name it with --caption-column")


def read_condition(files, value) -> tuple[str | None, bytes | None]:
    """(label, bytes) of the condition image a metadata value names, read under the image path rules; (None,
    None) when the value is empty (the item has no condition). Quarantined (bad_condition_image) otherwise."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if not isinstance(value, str):
        raise Quarantined("bad_condition_image", f"condition image name is not text ({type(value).__name__} "
                                                  f"{value!r})")
    name = value.strip()
    try:
        return files.label(name), files.read(name)
    except Quarantined as q:
        raise Quarantined("bad_condition_image", f"condition image: {q}") from None


def imagefolder_items(meta: bytes, files, caption_column: str | None, label_column: str | None,
                      where: str, condition_column: str | None = None) -> Iterator[RawItem]:
    """HuggingFace imagefolder: one JSON object per line with file_name and a caption column."""
    for n, raw in enumerate(meta.split(b"\n"), 1):
        if not raw.strip():
            continue
        key = f"metadata.jsonl line {n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield RawItem(key, error=("bad_metadata", f"not UTF-8 text ({e.reason} at byte {e.start}); "
                                                      "re-save metadata.jsonl as UTF-8"))
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            yield RawItem(key, error=("bad_metadata", f"malformed JSON ({e.msg}, column {e.colno})"))
            continue
        if not isinstance(rec, dict) or not isinstance(rec.get("file_name"), str):
            yield RawItem(key, error=("bad_metadata", "expected a JSON object with a 'file_name' string"))
            continue
        col = caption_column or next((c for c in CAPTION_COLUMNS if c in rec), CAPTION_COLUMNS[0])
        name = rec["file_name"]
        label = rec.get(label_column) if label_column else None
        try:
            data = files.read(name)
            cond_key, cond = read_condition(files, rec.get(condition_column)) if condition_column else (None, None)
            yield RawItem(files.label(name), rec.get(col), None if label is None else str(label), data, None, cond,
                          cond_key)
        except Quarantined as q:
            yield RawItem(files.label(name), error=(q.kind, str(q)))


def csv_items(text: str, files, caption_column: str | None, label_column: str | None, where: str,
              condition_column: str | None = None):
    reader = csv.DictReader(io.StringIO(text))
    columns = reader.fieldnames or []
    path_col = _pick_column(columns, None, PATH_COLUMNS, "image path", where)
    cap_col = _pick_column(columns, caption_column, CAPTION_COLUMNS, "caption", where)
    if condition_column:
        _pick_column(columns, condition_column, (), "condition image", where)  # a clear error for a typo
    for n, row in enumerate(reader, 2):
        name = (row.get(path_col) or "").strip()
        if None in row:  # more fields than the header
            yield RawItem(f"{where} line {n}", error=("bad_metadata", "more fields than the header; quote captions "
                                                                      "that contain commas"))
            continue
        try:
            data = files.read(name)
            cond_key, cond = read_condition(files, row.get(condition_column)) if condition_column else (None, None)
            yield RawItem(files.label(name), row.get(cap_col), row.get(label_column) if label_column else None, data,
                          None, cond, cond_key)
        except Quarantined as q:
            yield RawItem(files.label(name) if name else f"{where} line {n}", error=(q.kind, str(q)))


def webdataset_items(stream, archive: str, caption_column: str | None) -> Iterator[RawItem]:
    """WebDataset: members grouped by key (name up to the first dot); an image plus .txt or .json caption."""

    def finish(key: str, parts: dict[str, bytes]) -> RawItem:
        label = f"{archive}#{key}"
        images = sorted(ext for ext in parts if ext.rsplit(".", 1)[-1].lower() in IMAGE_EXTS)
        caption = None
        if "txt" in parts:
            caption = parts["txt"].decode("utf-8", errors="strict") if _utf8(parts["txt"]) else b""
            if caption == b"":
                return RawItem(label, error=("bad_metadata", f"{key}.txt is not UTF-8 text"))
        elif "json" in parts:
            try:
                rec = json.loads(parts["json"].decode("utf-8"))
                col = caption_column or next((c for c in CAPTION_COLUMNS if c in rec), CAPTION_COLUMNS[0])
                caption = rec.get(col) if isinstance(rec, dict) else None
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                return RawItem(label, error=("bad_metadata", f"{key}.json is not valid UTF-8 JSON ({e})"))
        if not images:
            return RawItem(label, error=("missing_file", f"no image member for key {key} "
                                                         f"(found: {', '.join(sorted(parts))})"))
        return RawItem(f"{label}.{images[0]}", caption, None, parts[images[0]])

    try:
        tar = tarfile.open(fileobj=stream, mode="r|*")
        key, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            base = posixpath.basename(member.name)
            k, _, ext = base.partition(".")
            k = posixpath.join(posixpath.dirname(member.name), k)
            if key is not None and k != key:
                yield finish(key, parts)
                parts = {}
            key = k
            parts[ext.lower()] = tar.extractfile(member).read()
        if key is not None:
            yield finish(key, parts)
    except (tarfile.TarError, EOFError, OSError) as e:
        yield RawItem(archive, error=("corrupt_archive", f"tar archive unreadable from here on ({e}); items "
                                                         "before this point were kept"))


def _utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def source_items(source: str, caption_column: str | None, label_column: str | None,
                 condition_column: str | None = None) -> Iterator[RawItem]:
    """Dispatch on what SRC is: a .csv/.tar/.jsonl file, or a folder (local or s3:// prefix) holding
    metadata.jsonl, .tar shards or one .csv file."""
    source = str(source)
    if not storage.is_s3(source) and not Path(source).exists():
        raise UserError(f"source not found: {source}")
    if storage.exists(source):
        if not source.lower().endswith(SOURCE_FILES):
            raise UserError(f"{source}: unsupported source file; give a folder with metadata.jsonl, a .csv, "
                            "a .tar (WebDataset) or an s3:// prefix")
        root, files = _parent(source), [source]
    else:
        root = source.rstrip("/") if storage.is_s3(source) else source
        meta = storage.join(root, "metadata.jsonl")
        files = [meta] if storage.exists(meta) else storage.list_dir(root)
        if not files:
            raise UserError(f"{source}: no files in this folder or under this prefix")
    src = SourceFiles(root)
    meta = [f for f in files if f.endswith(".jsonl")]
    tars = [f for f in files if f.lower().endswith(".tar")]
    csvs = [f for f in files if f.lower().endswith(".csv")]
    if meta:
        yield from imagefolder_items(storage.read_bytes(meta[0]), src, caption_column, label_column,
                                     posixpath.basename(meta[0]), condition_column)
    elif tars:
        if condition_column:
            raise UserError(f"{source}: --condition-column works with imagefolder (metadata.jsonl) and CSV "
                            "sources, local or on S3, not WebDataset .tar shards; --doodles derives conditions "
                            "from any source")
        for t in tars:
            with storage.open_stream(t) as stream:
                yield from webdataset_items(stream, src.label(posixpath.basename(t)), caption_column)
    elif len(csvs) == 1:
        yield from csv_items(_read_text(csvs[0]), src, caption_column, label_column,
                             src.label(posixpath.basename(csvs[0])), condition_column)
    else:
        raise UserError(f"{source}: found no metadata.jsonl, .tar shards or a single .csv file; see "
                        "`diffuse data ingest --help` for the supported layouts")


def _parent(uri: str) -> str:
    return uri.rsplit("/", 1)[0] if storage.is_s3(uri) else str(Path(uri).parent)


def _read_text(uri: str) -> str:
    try:
        return storage.read_bytes(uri).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{uri}: not UTF-8 text ({e.reason} at byte {e.start}); re-save it as UTF-8") from None
