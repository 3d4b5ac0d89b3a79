"""Diversity report and coverage score on a small shapes dataset."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ContextConfig, IngestConfig, ReportConfig
from pipeline.data.ingest import ingest
from pipeline.data.report import build_report, coverage


@pytest.fixture(scope="module")
def prepared(shapes_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "shapes"
    ingest(str(shapes_data), out, 16, IngestConfig(workers=1, near_duplicates="flag"), progress=False)
    return out


def test_coverage_ranks_in_distribution_above_out_of_distribution(prepared):
    inside, held_out, outside = coverage(
        ["a small blue circle in the top left corner on a white background", "a red triangle in the center",
         "a photograph of a dog running on a beach"], prepared)
    assert inside.score > outside.score and held_out.score > outside.score
    assert inside.in_span and not outside.in_span
    assert inside.nearest[0][1] >= inside.nearest[-1][1]  # nearest first
    assert "circle" in inside.nearest[0][0]


def test_report_files_and_statistics(prepared):
    cfg = ReportConfig(attributes={"colour": ["red", "green", "blue", "yellow", "purple", "orange", "pink"],
                                   "shape": ["circle", "square", "triangle"]}, clusters=4, contact_sheet=16)
    r = build_report(prepared, ContextConfig(), cfg)
    out = prepared / "report"
    assert json.loads((out / "report.json").read_text())["dataset"]["version"] == r["dataset"]["version"]
    assert (out / "contact_sheet.png").stat().st_size > 0 and "<table>" in (out / "report.html").read_text()
    c = r["captions"]
    assert c["num_captions"] == r["dataset"]["items"] and 0 < c["vocabulary_size"] < 100
    assert dict(c["top_concepts"]).keys() & {"circle", "square", "triangle", "background"}
    colour = r["attributes"]["colour"]
    assert colour["missing"] == ["pink"] and 0 < colour["balance"] < 1
    assert r["attributes"]["shape"]["captions_without"] == 0
    assert sum(g["size"] for g in r["embeddings"]["clusters"]) == c["unique_captions"]
    assert len(r["embeddings"]["clusters"]) == 4


def test_cli_report_and_coverage(prepared):
    from conftest import run_cli

    r = run_cli("data", "coverage", str(prepared), "-p", "a large red circle", "-p", "a cat villain in a top hat")
    assert r.returncode == 0, r.stderr
    assert "in span" in r.stdout and "outside the data's span" in r.stdout
    r = run_cli("data", "report", str(prepared), "--config", "configs/shapes.yaml")
    assert r.returncode == 0, r.stderr
    assert "colour: balance" in r.stdout and "report.html" in r.stdout
    r = run_cli("data", "report", "no-such-dataset")
    assert r.returncode == 2 and "not a prepared dataset" in r.stderr
