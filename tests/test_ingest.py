"""Ingest: every kind of bad item is quarantined or handled with a reason, every good item is kept, output is
deterministic, and the imagefolder / CSV / WebDataset / S3 sources give the same prepared data."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.config import IngestConfig
from pipeline.data.ingest import ingest
from pipeline.data.prepared import open_prepared

CFG = IngestConfig(workers=2, chunk_size=7)  # small chunks: exercise the chunked parallel path


def noise_png(seed: int, size=(40, 40), mode="RGB") -> bytes:
    rng = np.random.default_rng(seed)
    # blocky noise: distinct images whose perceptual hashes are far apart
    small = rng.integers(0, 256, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.NEAREST).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def good_items() -> dict[str, tuple[bytes, str]]:
    """file name -> (bytes, caption) for items that must be kept (several need conversion, each noted)."""
    base = Image.open(io.BytesIO(noise_png(100, (64, 48))))
    halves = Image.new("RGB", (40, 20), "red")
    halves.paste((0, 0, 255), (20, 0, 40, 20))  # left red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    frames = [Image.open(io.BytesIO(noise_png(60 + k, (32, 32)))) for k in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100)
    pal = Image.open(io.BytesIO(noise_png(7))).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    sixteen = Image.fromarray((np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 28).astype(np.uint16))
    return {
        **{f"good{i}.png": (noise_png(i), f"a picture number {i}") for i in range(5)},
        "good_jpeg.jpg": (encode(base, "JPEG", quality=92), "a jpeg picture"),
        "cmyk.jpg": (encode(Image.open(io.BytesIO(noise_png(11))).convert("CMYK"), "JPEG"), "a cmyk picture"),
        "sixteen_bit.png": (encode(sixteen, "PNG"), "a 16 bit gradient"),
        "palette_alpha.png": (encode(pal, "PNG", transparency=0), "a palette picture with transparency"),
        "animated.gif": (gif.getvalue(), "an animated picture"),
        "rotated.jpg": (encode(halves, "JPEG", exif=exif, quality=95), "a rotated picture"),
        "same_image_other_caption.png": (noise_png(0), "the first picture described differently"),
    }


def bad_corpus(root: Path) -> dict[str, str]:
    """Writes an imagefolder with good and bad items; returns {item label: expected quarantine kind}."""
    root.mkdir(parents=True)
    lines: list[bytes] = []

    def add(name: str, data: bytes | None, caption="a caption", **extra):
        if data is not None:
            (root / name).write_bytes(data)
        rec = {"file_name": name, **({"text": caption} if caption is not ... else {}), **extra}
        lines.append(json.dumps(rec).encode())

    for name, (data, caption) in good_items().items():
        add(name, data, caption)
    bomb = encode(Image.new("1", (10000, 10000)), "PNG")  # 100 M pixels in a few kB
    png = bytearray(noise_png(50, (64, 64)))
    png[200:400] = os.urandom(200)  # a valid header, a damaged body
    add("corrupt.png", bytes(png), "corrupt bytes")
    add("truncated.jpg", encode(Image.open(io.BytesIO(noise_png(3, (256, 256)))), "JPEG")[:900], "cut short")
    add("empty.png", b"", "zero bytes")
    add("text.jpg", b"this is a text file, not an image\n" * 20, "a text file")
    add("bomb.png", bomb, "a decompression bomb")
    add("tiny.png", encode(Image.new("RGB", (1, 1), "red"), "PNG"), "one pixel")
    add("no_caption.png", noise_png(20), ...)
    add("empty_caption.png", noise_png(21), "")
    add("space_caption.png", noise_png(22), "   \n\t ")
    add("long_caption.png", noise_png(23), "word " * 300)
    add("number_caption.png", noise_png(24), 42)
    add("exact_dup.png", noise_png(1), "a picture number 1")  # same bytes and caption as good1.png
    near = Image.open(io.BytesIO(noise_png(2))).resize((64, 64))
    add("near_dup.jpg", encode(near, "JPEG", quality=95), "a resized, re-encoded copy of picture two")
    add("missing.png", None, "not on disk")
    add("../outside.png", None, "escapes with ..")
    add("/etc/hostname", None, "an absolute path")
    outside = root.parent / "secret.png"
    outside.write_bytes(noise_png(30))
    (root / "link.png").symlink_to(outside)
    add("link.png", None, "a symlink out of the dataset")
    lines.append(b'{"file_name": "latin1.png", "text": "caf\xe9"}')  # not UTF-8
    lines.append(b'{"file_name": "broken.png", "text": ')  # malformed JSON
    lines.append(b'["not", "an", "object"]')
    (root / "metadata.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    n = len(good_items())
    return {
        "corrupt.png": "corrupt", "truncated.jpg": "corrupt", "empty.png": "empty_file", "text.jpg": "not_an_image",
        "bomb.png": "too_large", "tiny.png": "too_small", "no_caption.png": "missing_caption",
        "empty_caption.png": "empty_caption", "space_caption.png": "empty_caption",
        "long_caption.png": "long_caption", "number_caption.png": "missing_caption", "exact_dup.png": "duplicate",
        "near_dup.jpg": "near_duplicate", "missing.png": "missing_file", "../outside.png": "unsafe_path",
        "/etc/hostname": "unsafe_path", "link.png": "unsafe_path",
        f"metadata.jsonl line {n + 18}": "bad_metadata", f"metadata.jsonl line {n + 19}": "bad_metadata",
        f"metadata.jsonl line {n + 20}": "bad_metadata",
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("corpus") / "images"
    return root, bad_corpus(root)


@pytest.fixture(scope="module")
def ingested(corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared") / "bad"
    ingest(str(corpus[0]), out, 32, CFG, progress=False)
    return out


def test_bad_corpus_every_item_handled(corpus, ingested):
    _, expected = corpus
    ds = open_prepared(ingested)
    q = {r["item"]: r for r in ds.quarantine()}
    assert {k: q[k]["kind"] if k in q else None for k in expected} == expected
    assert all(r["reason"] for r in q.values())
    assert len(q) == len(expected)
    kept = set(ds.manifest["source_uri"])
    assert kept == set(good_items())
    assert ds.info["num_items"] == len(good_items()) and ds.info["num_quarantined"] == len(expected)


def test_conversions_are_applied_and_noted(ingested):
    ds = open_prepared(ingested)
    m = ds.manifest.set_index("source_uri")
    assert "first of 3 frames" in m.loc["animated.gif", "note"]
    assert "EXIF orientation 6" in m.loc["rotated.jpg", "note"]
    assert "scaled to 8-bit" in m.loc["sixteen_bit.png", "note"]
    assert "transparency" in m.loc["palette_alpha.png", "note"]
    assert "CMYK" in m.loc["cmyk.jpg", "note"]
    assert m.loc["rotated.jpg", "orig_width"] == 40 and m.loc["rotated.jpg", "orig_height"] == 20
    rows = {uri: i for i, uri in enumerate(ds.manifest["source_uri"])}
    rot = ds.images([rows["rotated.jpg"]])[0].astype(int)
    # displayed upright the red half is on top: rows near the top are red, near the bottom blue
    assert rot[2, 16, 0] > 200 and rot[2, 16, 2] < 60
    assert rot[29, 16, 2] > 200 and rot[29, 16, 0] < 60
    gif = ds.images([rows["animated.gif"]])[0].astype(int)
    frames = [np.asarray(Image.open(io.BytesIO(noise_png(60 + k, (32, 32)))), dtype=int) for k in range(3)]
    errors = [np.abs(gif - f).mean() for f in frames]
    assert errors[0] < 10 < min(errors[1:])  # the first frame
    sixteen = ds.images([rows["sixteen_bit.png"]])[0]
    assert sixteen.max() > 200 and sixteen.min() < 60  # a gradient, not saturated white
    # the same image with another caption is a second caption, kept and not a near duplicate
    assert m.loc["same_image_other_caption.png", "sha256"] == m.loc["good0.png", "sha256"]
    assert pd.isna(m.loc["same_image_other_caption.png", "near_duplicate_of"])


def test_shards_and_manifest_layout(ingested):
    ds = open_prepared(ingested)
    assert ds.resolution == 32 and len(ds) == len(ds.manifest)
    imgs = ds.images(np.arange(len(ds)))
    assert imgs.shape == (len(ds), 32, 32, 3) and imgs.dtype == np.uint8
    assert ds.manifest["id"].is_unique
    assert set(ds.manifest["split"]) <= {"train", "eval"}
    assert ds.version == ds.info["version"] and len(ds.version) == 64


def test_ingest_is_deterministic(corpus, ingested, tmp_path):
    again = tmp_path / "bad"
    ingest(str(corpus[0]), again, 32, IngestConfig(workers=1), progress=False)
    files = sorted(p.relative_to(ingested) for p in ingested.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for f in files:
        assert (ingested / f).read_bytes() == (again / f).read_bytes(), f


def test_near_duplicates_can_be_kept_flagged(corpus, tmp_path):
    info = ingest(str(corpus[0]), tmp_path / "flag", 32, IngestConfig(workers=1, near_duplicates="flag"),
                  progress=False)
    m = open_prepared(tmp_path / "flag").manifest.set_index("source_uri")
    good2_id = m.loc["good2.png", "id"]
    assert m.loc["near_dup.jpg", "near_duplicate_of"] == good2_id
    assert info["near_duplicates"] == 1 and "near_duplicate" not in info["quarantined_by_kind"]


def _small_set(root: Path) -> dict[str, tuple[bytes, str]]:
    items = {f"img{i}.png": (noise_png(40 + i), f"caption {i}") for i in range(6)}
    for name, (data, _) in items.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return items


def _content(path: Path) -> list[tuple[str, bytes]]:
    ds = open_prepared(path)
    return sorted((c, ds.images([i])[0].tobytes()) for i, c in enumerate(ds.captions))


def test_csv_and_webdataset_sources_match_imagefolder(tmp_path):
    folder = tmp_path / "folder"
    items = _small_set(folder)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n"
                                                  for n, (_, c) in items.items()))
    csv_dir = tmp_path / "csv"
    _small_set(csv_dir / "imgs")
    rows = ["path,caption"] + [f"imgs/{n},\"{c}, with a comma\"" for n, (_, c) in items.items()]
    (csv_dir / "data.csv").write_text("\n".join(rows) + "\n")
    wds = tmp_path / "wds"
    wds.mkdir()
    names = list(items)
    for part, chunk in enumerate((names[:3], names[3:])):
        with tarfile.open(wds / f"part-{part:03d}.tar", "w") as tar:
            for n in chunk:
                key = n.removesuffix(".png")
                for ext, payload in (("png", items[n][0]), ("json" if part else "txt",
                                     json.dumps({"caption": items[n][1]}).encode() if part else items[n][1].encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    for src in (folder, csv_dir / "data.csv", wds):
        ingest(str(src), tmp_path / "out" / src.name, 32, IngestConfig(workers=1), progress=False)
    ref = _content(tmp_path / "out" / "folder")
    assert len(ref) == 6
    csv_content = _content(tmp_path / "out" / "data.csv")
    assert [(c.removesuffix(", with a comma"), b) for c, b in csv_content] == ref
    assert _content(tmp_path / "out" / "wds") == ref


def test_s3_prefix_source(tmp_path, monkeypatch_s3_env):
    from pipeline import storage

    folder = tmp_path / "folder"
    items = _small_set(folder)
    meta = "".join(json.dumps({"file_name": n, "text": c}) + "\n" for n, (_, c) in items.items())
    meta += json.dumps({"file_name": "../../escape.png", "text": "x"}) + "\n"
    meta += json.dumps({"file_name": "gone.png", "text": "x"}) + "\n"
    (folder / "metadata.jsonl").write_text(meta)
    ingest(str(folder), tmp_path / "local", 32, IngestConfig(workers=1), progress=False)
    for f in folder.iterdir():
        storage.upload_file(f, f"s3://test-bucket/sets/shapes/{f.name}")
    ingest("s3://test-bucket/sets/shapes", tmp_path / "from_s3", 32, IngestConfig(workers=1), progress=False)
    assert _content(tmp_path / "from_s3") == _content(tmp_path / "local")
    kinds = sorted(r["kind"] for r in open_prepared(tmp_path / "from_s3").quarantine())
    assert kinds == ["missing_file", "unsafe_path"]
    assert open_prepared(tmp_path / "from_s3").manifest["source_uri"].str.startswith("s3://test-bucket/sets/").all()


def test_cli_ingest_summary_and_clear_errors(corpus, tmp_path):
    from conftest import run_cli

    env = {"DIFFUSE_DATA_ROOT": str(tmp_path / "prepared")}
    r = run_cli("data", "ingest", str(corpus[0]), "--name", "demo", "--resolution", "32", "--workers", "1", env=env)
    assert r.returncode == 0, r.stderr
    assert "quarantined" in r.stdout and "unsafe_path" in r.stdout and (tmp_path / "prepared/demo").is_dir()
    r = run_cli("data", "ingest", str(tmp_path / "nowhere"), "--name", "x", env=env)
    assert r.returncode == 2 and "source not found" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    r = run_cli("data", "ingest", str(empty), "--name", "e", env=env)
    assert r.returncode == 2 and "no usable items" in r.stderr and "a.png" in r.stderr
    shutil.rmtree(tmp_path / "prepared")


# ---------------------------------------------------------------- condition images (sketch-conditioned models)

COND = "conditioning_image"


def condition_corpus(root: Path) -> dict[str, str | None]:
    """An imagefolder whose items name condition images (some bad, some absent); returns {image file: what its
    condition column should become} with "bad" for items quarantined for their condition image."""
    (root / "cond").mkdir(parents=True)
    lines, expected = [], {}
    for i in range(10):
        name = f"img{i}.png"
        (root / name).write_bytes(noise_png(70 + i))
        cond = f"cond/c{i}.png"
        if i < 4:
            (root / cond).write_bytes(noise_png(200 + i, (48, 48)))  # another size: prepared like the image
            expected[name] = cond
        rec = {"file_name": name, "text": f"item {i}", COND: cond}
        if i == 4:
            (root / cond).write_bytes(b"not an image at all")
        if i in (4, 5, 8, 9):  # corrupt, missing, outside the dataset, not a file name
            expected[name] = "bad"
        if i == 6:
            rec[COND] = None
        if i == 7:
            rec[COND] = "  "
        if i in (6, 7):
            expected[name] = None
        if i == 8:
            rec[COND] = "../elsewhere.png"
        if i == 9:
            rec[COND] = 42
        lines.append(json.dumps(rec))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return expected


def conditions_by_item(ds) -> dict[str, str | None]:
    """source_uri -> manifest column `condition` (None where null), in manifest order."""
    return {u: None if pd.isna(c) else c for u, c in zip(ds.manifest["source_uri"], ds.manifest["condition"],
                                                         strict=True)}


def test_condition_column_prepares_condition_images_and_quarantines_bad_ones(tmp_path):
    from pipeline.data.ingest import prepare_image
    from pipeline.data.prepared import compute_version
    from pipeline.errors import UserError

    expected = condition_corpus(tmp_path / "src")
    info = ingest(str(tmp_path / "src"), tmp_path / "out", 32, IngestConfig(workers=2, chunk_size=3),
                  condition_column=COND, progress=False)
    ds = open_prepared(tmp_path / "out")
    q = {r["item"]: r for r in ds.quarantine()}
    assert {k: v["kind"] for k, v in q.items()} == {k: "bad_condition_image" for k, v in expected.items()
                                                     if v == "bad"}
    assert "cond/c4.png" in q["img4.png"]["reason"] and "not an image" in q["img4.png"]["reason"]
    assert "not found" in q["img5.png"]["reason"] and "outside" in q["img8.png"]["reason"]
    kept = conditions_by_item(ds)
    assert kept == {k: v for k, v in expected.items() if v != "bad"}
    assert ds.has_conditions and info["num_conditions"] == 4 and ds.info["num_conditions"] == 4
    cfg = IngestConfig()
    for row, (uri, cond) in enumerate(kept.items()):
        got = ds.conditions([row])[0]
        if cond is None:
            assert (got == 255).all()  # no condition image: a blank page
        else:
            want = prepare_image((tmp_path / "src" / cond).read_bytes(), 32, cfg)[0]
            assert np.array_equal(got, want), uri
        assert np.array_equal(ds.images([row])[0], prepare_image((tmp_path / "src" / uri).read_bytes(), 32, cfg)[0])
    assert np.array_equal(ds.conditions(np.arange(len(ds)))[2], ds.conditions([2])[0])
    # the version covers the condition images
    shard = tmp_path / "out" / "conditions" / "shard-00000.npy"
    arr = np.load(shard)
    arr[0, 0, 0, 0] ^= 1
    np.save(shard, arr)
    assert compute_version(tmp_path / "out") != ds.version
    # no item names a condition in that column: most likely a typo, said so
    with pytest.raises(UserError, match="no item names a condition image in 'sketch'"):
        ingest(str(tmp_path / "src"), tmp_path / "typo", 32, IngestConfig(workers=1), condition_column="sketch",
               progress=False)


def test_doodles_fill_missing_conditions_deterministically(tmp_path):
    from pipeline.data.doodle import doodle_from_image

    condition_corpus(tmp_path / "src")
    one, two = tmp_path / "one" / "ds", tmp_path / "two" / "ds"
    ingest(str(tmp_path / "src"), one, 32, IngestConfig(workers=1, doodles=True), condition_column=COND,
           progress=False)
    ingest(str(tmp_path / "src"), two, 32, IngestConfig(workers=2, chunk_size=3, doodles=True),
           condition_column=COND, progress=False)
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert Path("conditions/shard-00000.npy") in files
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    for f in files:
        assert (one / f).read_bytes() == (two / f).read_bytes(), f
    ds = open_prepared(one)
    m = ds.manifest.set_index("source_uri")
    assert m.loc["img0.png", "condition"] == "cond/c0.png"  # its own condition image wins
    assert m.loc["img6.png", "condition"] == m.loc["img7.png", "condition"] == "doodle"
    assert ds.info["num_conditions"] == len(ds) == 6
    row = list(m.index).index("img6.png")
    seed = int(m.loc["img6.png", "id"], 16)  # the item id: the same doodle on every run
    assert np.array_equal(ds.conditions([row])[0], doodle_from_image(ds.images([row])[0], seed))


def test_doodles_for_a_plain_image_text_set(tmp_path):
    folder = tmp_path / "folder"
    items = _small_set(folder)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": c}) + "\n"
                                                  for n, (_, c) in items.items()))
    plain = ingest(str(folder), tmp_path / "plain", 32, IngestConfig(workers=1), progress=False)
    info = ingest(str(folder), tmp_path / "doodled", 32, IngestConfig(workers=1, doodles=True), progress=False)
    ds = open_prepared(tmp_path / "doodled")
    assert info["num_conditions"] == info["num_items"] == 6 and (ds.manifest["condition"] == "doodle").all()
    doodles = ds.conditions(np.arange(6))
    assert ((doodles == 0) | (doodles == 255)).all() and (doodles == 0).any()
    assert info["version"] != plain["version"] and _content(tmp_path / "doodled") == _content(tmp_path / "plain")


def test_datasets_without_conditions_still_open(ingested, tmp_path):
    import pyarrow.parquet as pq

    from pipeline.errors import UserError

    ds = open_prepared(ingested)
    assert not ds.has_conditions and ds.info["num_conditions"] == 0 and not (ingested / "conditions").exists()
    assert ds.manifest["condition"].isna().all()
    with pytest.raises(UserError, match="no condition images"):
        ds.conditions([0])
    # a dataset written before condition images existed: no manifest column, no dataset.json count
    old = Path(shutil.copytree(ingested, tmp_path / "old"))
    pq.write_table(pq.read_table(old / "manifest.parquet").drop_columns(["condition"]), old / "manifest.parquet")
    info = json.loads((old / "dataset.json").read_text())
    del info["num_conditions"]
    (old / "dataset.json").write_text(json.dumps(info))
    old_ds = open_prepared(old)
    assert not old_ds.has_conditions and "condition" not in old_ds.manifest.columns
    assert np.array_equal(old_ds.images([0, 3]), ds.images([0, 3]))


def test_condition_column_sources_and_clear_errors(tmp_path, monkeypatch):
    from conftest import invoke

    from pipeline.errors import UserError

    expected = condition_corpus(tmp_path / "src")
    rows = ["file_name,text,sketch"] + [f"{n},a caption {n},{v or ''}" for n, v in expected.items() if v != "bad"]
    (tmp_path / "src" / "data.csv").write_text("\n".join(rows) + "\n")
    ingest(str(tmp_path / "src" / "data.csv"), tmp_path / "csv", 32, IngestConfig(workers=1),
           condition_column="sketch", progress=False)
    assert conditions_by_item(open_prepared(tmp_path / "csv")) == {k: v for k, v in expected.items() if v != "bad"}
    with pytest.raises(UserError, match="no 'sketchy' condition image column"):
        ingest(str(tmp_path / "src" / "data.csv"), tmp_path / "x", 32, IngestConfig(workers=1),
               condition_column="sketchy", progress=False)
    with tarfile.open(tmp_path / "part.tar", "w") as tar:
        tar.add(tmp_path / "src" / "img0.png", "a.png")
    with pytest.raises(UserError, match="--condition-column works with imagefolder"):
        ingest(str(tmp_path / "part.tar"), tmp_path / "x", 32, IngestConfig(workers=1), condition_column=COND,
               progress=False)
    monkeypatch.setenv("DIFFUSE_DATA_ROOT", str(tmp_path / "prepared"))
    r = invoke("data", "ingest", str(tmp_path / "src"), "--name", "c", "--resolution", "16", "--workers", "1",
               "--condition-column", COND, "--doodles")
    assert r.exit_code == 0, r.output
    assert "condition images" in r.output and "bad_condition_image" in r.output
    ds = open_prepared(tmp_path / "prepared" / "c")
    assert ds.info["num_conditions"] == 6 and ds.info["ingest"]["doodles"] is True
