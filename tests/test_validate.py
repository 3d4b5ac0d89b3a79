"""The Great Expectations gate (`diffuse data validate`): a good prepared dataset passes; each kind of bad one
fails the right hard check with exit code 1 and a readable table; a soft failure only warns (exit 0)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import IngestConfig, ValidationConfig
from pipeline.data.validation import validate_dataset


@pytest.fixture(scope="module")
def good_dataset(tmp_path_factory) -> Path:
    """64 shapes images (16 px) through the real ingest: the reference a broken copy is made from."""
    from pipeline.data.ingest import ingest
    from pipeline.shapes import dataset as shapes

    tmp = tmp_path_factory.mktemp("validate")
    shapes.make_dataset(tmp / "src", 64, resolution=16, seed=0)
    out = tmp / "prepared" / "good"
    ingest(str(tmp / "src"), out, 16, IngestConfig(workers=1), progress=False)
    return out


@pytest.fixture
def dataset(good_dataset, tmp_path) -> Path:
    """A private copy to break."""
    return Path(shutil.copytree(good_dataset, tmp_path / "ds"))


def edit_manifest(path: Path, change) -> None:
    f = path / "manifest.parquet"
    schema = pq.read_schema(f)
    df = pq.read_table(f).to_pandas()
    df = change(df)
    pq.write_table(pa.Table.from_pandas(df, schema=schema, preserve_index=False), f)


def cli(*args: str):
    return CliRunner().invoke(app, ["data", "validate", *args])


def checks(path: Path) -> dict:
    return json.loads((path.with_name(path.name + ".validation") / "validation.json").read_text())


def failed(path: Path) -> set[str]:
    return {k for k, v in checks(path)["checks"].items() if not v["success"]}


def test_good_dataset_passes_and_writes_report_and_docs(dataset):
    res = cli(str(dataset))
    assert res.exit_code == 0, res.output
    assert "passed" in res.output and "FAIL" not in res.output
    report = checks(dataset)
    assert report["success"] is True and report["hard_failures"] == 0 and report["soft_failures"] == 0
    assert failed(dataset) == set()
    assert report["statistics"]["num_items"] == report["statistics"]["shard_rows"] > 50
    docs = dataset.with_name("ds.validation") / "docs"
    assert (docs / "index.html").is_file()
    assert len(list((docs / "validations").rglob("*.html"))) == 2  # manifest and statistics runs
    # same data, same report: validation.json is a stable DVC metrics file
    before = (dataset.with_name("ds.validation") / "validation.json").read_bytes()
    assert cli(str(dataset)).exit_code == 0
    assert (dataset.with_name("ds.validation") / "validation.json").read_bytes() == before


def _null_caption(df):
    df.loc[3, "caption"] = None
    return df


def _blank_captions(df):
    df.loc[1, "caption"] = ""
    df.loc[2, "caption"] = "   "
    return df


def _duplicate_pair(df):
    df.loc[5, ["sha256", "caption"]] = df.loc[4, ["sha256", "caption"]].values
    return df


@pytest.mark.parametrize("change, expected", [
    (_null_caption, {"captions_present"}),
    (_blank_captions, {"captions_not_blank", "caption_length"}),
    (_duplicate_pair, {"image_caption_pairs_unique"}),
])
def test_bad_manifest_fails_the_right_hard_check(dataset, change, expected):
    edit_manifest(dataset, change)
    res = cli(str(dataset))
    assert res.exit_code == 1, res.output
    assert failed(dataset) == expected
    assert "FAILED" in res.output and "validation failed" in res.output
    for name in expected:
        assert name in res.output


def test_same_image_with_another_caption_is_legitimate(dataset):
    def second_caption(df):
        df.loc[5, "sha256"] = df.loc[4, "sha256"]
        df.loc[5, "caption"] = df.loc[4, "caption"] + " (another description)"
        return df

    edit_manifest(dataset, second_caption)
    assert cli(str(dataset)).exit_code == 0
    assert failed(dataset) == set()


def test_too_many_quarantined_fails(dataset):
    with (dataset / "quarantine.jsonl").open("a") as f:
        for i in range(10):
            f.write(json.dumps({"item": f"broken{i}.png", "kind": "decode", "reason": "truncated"}) + "\n")
    res = cli(str(dataset))
    assert res.exit_code == 1
    assert failed(dataset) == {"quarantine_rate"}
    assert checks(dataset)["statistics"]["quarantine_rate"] > 0.05


def test_wrong_resolution_from_training_config_fails(dataset, tmp_path):
    # one file configures everything: the training config's data.resolution is the expected one
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"path": str(dataset), "resolution": 32}}))
    res = cli(str(dataset), "--config", str(cfg))
    assert res.exit_code == 1
    assert failed(dataset) == {"resolution", "image_shape"}
    assert "32x32x3" in res.output and "16x16x3" in res.output
    # --resolution (what dvc.yaml passes from params.yaml) overrides the config file
    assert cli(str(dataset), "--config", str(cfg), "--resolution", "16").exit_code == 0


def test_shards_out_of_step_with_manifest_fails(dataset):
    import numpy as np

    shard = dataset / "shards" / "shard-00000.npy"
    np.save(shard, np.load(shard)[:-3])
    assert cli(str(dataset)).exit_code == 1
    assert failed(dataset) == {"shards_match_manifest"}


def test_soft_failure_only_warns(dataset, tmp_path):
    cfg = tmp_path / "v.yaml"
    cfg.write_text(yaml.safe_dump({"validation": {"min_caption_vocabulary": 10_000}}))
    res = cli(str(dataset), "--config", str(cfg))
    assert res.exit_code == 0, res.output
    assert "warning: caption_vocabulary" in res.output and "passed" in res.output
    report = checks(dataset)
    assert report["success"] is True and report["soft_failures"] == 1


def test_severity_is_configurable(dataset):
    hard = validate_dataset(dataset, ValidationConfig(min_caption_vocabulary=10_000,
                                                      severity={"caption_vocabulary": "hard"}))
    assert not hard.success and [c.name for c in hard.hard_failures] == ["caption_vocabulary"]
    off = validate_dataset(dataset, ValidationConfig(min_caption_vocabulary=10_000,
                                                     severity={"caption_vocabulary": "off"}))
    assert off.success and off.skipped == ["caption_vocabulary"]
    assert "caption_vocabulary" not in {c.name for c in off.checks}


def test_user_mistakes_exit_2(dataset, tmp_path):
    res = cli(str(tmp_path / "nope"))
    assert res.exit_code == 2 and "not a prepared dataset" in res.output
    cfg = tmp_path / "v.yaml"
    cfg.write_text(yaml.safe_dump({"validation": {"severity": {"caption_colour": "soft"}}}))
    res = cli(str(dataset), "--config", str(cfg))
    assert res.exit_code == 2 and "unknown checks" in res.output and "Traceback" not in res.output


def test_condition_shards_are_checked_with_the_image_shards(tmp_path):
    import numpy as np

    from pipeline.data.ingest import ingest
    from pipeline.shapes import dataset as shapes

    shapes.make_dataset(tmp_path / "src", 24, resolution=16, seed=0, doodles=True)
    out = tmp_path / "prepared" / "sketches"
    ingest(str(tmp_path / "src"), out, 16, IngestConfig(workers=1), condition_column="conditioning_image",
           progress=False)
    assert cli(str(out)).exit_code == 0 and failed(out) == set()
    shard = out / "conditions" / "shard-00000.npy"
    np.save(shard, np.load(shard)[:-2])  # condition rows out of step with the images
    res = cli(str(out))
    assert res.exit_code == 1 and failed(out) == {"image_shape"}
    assert "conditions/shard-00000.npy" in checks(out)["checks"]["image_shape"]["observed"]
