"""Evaluation protocol, registration, promotion gate, rollback, model resolution and the pyfunc, against a real
MLflow store (sqlite backend + local artifact folder)."""

from __future__ import annotations

import base64
import io
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import invoke
from PIL import Image
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTokenizer,
    CLIPVisionConfig,
)

from pipeline.config import EvaluationConfig
from pipeline.errors import UserError
from pipeline.evaluation.metrics import clip_score, copy_rate, fid_and_kid
from pipeline.evaluation.protocol import evaluate, load_eval_data_for
from tests.mlflow_support import EVALUATION, mlflow_store, tracking_section, train_run, write_yaml

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _work_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # default stores and caches (./mlflow.db, ./mlartifacts, .cache/models) land here
NAME = "tiny-shapes"



@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A real MLflow store and a config with its tracking/evaluation/promotion sections."""
    root = tmp_path_factory.mktemp("mlflow")
    config = write_yaml(root / "ops.yaml", {
        "tracking": tracking_section(root),
        "evaluation": EVALUATION,
        # tiny models do not draw shapes yet: the gate here is the denoising MSE (bar and margin) and copy rate
        "promotion": {"max_denoise_mse": 1.0, "min_adherence": None, "max_copy_rate": 0.5,
                      "margins": {"denoise_mse": 0.01}},
    })
    with mlflow_store(root) as uri:
        yield {"root": root, "config": config, "uri": uri}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shapes_data):
    """mid: 2 steps; bad: one step at a huge learning rate (garbage weights); good: 30 steps."""
    out = {}
    for name, train in {"mid": {"max_steps": 2}, "bad": {"max_steps": 1, "lr": 0.5, "warmup_steps": 0},
                        "good": {"max_steps": 30}}.items():
        out[name] = train_run(tmp_path_factory.mktemp(name), shapes_data, **train)
    return out


def _client(store):
    from mlflow import MlflowClient

    return MlflowClient(store["uri"])


def test_register_promote_reject_rollback(store, runs):
    cfg = str(store["config"])
    client = _client(store)

    # v1: the first version; no champion yet, the bars alone decide
    result = invoke("register", str(runs["mid"]), "--name", NAME, "--config", cfg)
    assert result.exit_code == 0 and "registered tiny-shapes version 1" in result.output, result.output
    again = invoke("register", str(runs["mid"]), "--name", NAME, "--config", cfg)
    assert again.exit_code == 0 and "already tiny-shapes version 1" in again.output
    assert len(client.search_model_versions(f"name='{NAME}'")) == 1  # same run twice: no second version
    v1 = client.get_model_version(NAME, "1")
    run = client.get_run(v1.run_id)
    assert v1.tags["dataset_version"] == run.data.tags["dataset_version"]
    assert v1.tags["git_commit"] == run.data.tags["git_commit"]
    assert float(v1.tags["eval.denoise_mse"]) == pytest.approx(run.data.metrics["eval/denoise_mse"])
    assert v1.tags["eval.skipped.fid"].startswith("skipped: weights not available")
    card = v1.description
    assert card.startswith(f"# {NAME} v1") and "## Known limits" in card and run.data.tags["dataset_version"] in card
    assert "red triangle" in card  # the concepts the data covers, held-out pairs included
    import mlflow

    full_card = mlflow.artifacts.load_text(f"runs:/{v1.run_id}/model_card/{NAME}-v1.md")
    assert full_card.startswith(card) and "![sample grid](data:image/png;base64," in full_card
    assert client.get_registered_model(NAME).aliases == {"challenger": 1}
    assert invoke("promote", NAME, "--config", cfg).exit_code == 0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"

    # v2: a worse challenger is rejected, the champion stays, the reasons are on the version
    assert invoke("register", str(runs["bad"]), "--name", NAME, "--config", cfg).exit_code == 0
    rejected = invoke("promote", NAME, "--config", cfg)
    assert rejected.exit_code == 1 and "rejected" in rejected.output
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    v2 = client.get_model_version(NAME, "2")
    assert v2.tags["promotion.decision"] == "rejected" and v2.tags["promotion.champion_before"] == "1"
    assert "denoise_mse" in v2.tags["promotion.reasons"] and "FAIL" in v2.tags["promotion.reasons"]

    # v3: a better challenger (lower held-out denoising MSE by the margin) is promoted
    assert invoke("register", str(runs["good"]), "--name", NAME, "--config", cfg).exit_code == 0
    promoted = invoke("promote", NAME, "--config", cfg)
    assert promoted.exit_code == 0 and "promoted" in promoted.output, promoted.output
    v3 = client.get_model_version(NAME, "3")
    assert v3.tags["promotion.decision"] == "promoted" and "vs champion" in v3.tags["promotion.reasons"]
    compared = json.loads(v3.tags["promotion.compared"])
    assert compared["denoise_mse"][0] < compared["denoise_mse"][1] - 0.01
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"

    # rollback restores the previous champion; --to picks one
    assert invoke("rollback", NAME, "--config", cfg).exit_code == 0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    assert invoke("rollback", NAME, "--to", "3", "--config", cfg).exit_code == 0
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    bad_target = invoke("rollback", NAME, "--to", "9", "--config", cfg)
    assert bad_target.exit_code == 2 and "versions: 1, 2, 3" in bad_target.output

    # --force promotes without the gate, and says so
    assert invoke("register", str(runs["bad"]), "--name", "forced", "--config", cfg).exit_code == 0
    forced = invoke("promote", "forced", "--force", "--config", cfg)
    assert forced.exit_code == 0 and "forced" in forced.output
    assert client.get_model_version("forced", "1").tags["promotion.decision"] == "forced"


def test_unknown_name_alias_or_version_lists_what_exists(store, runs):
    cfg = str(store["config"])
    if not _client(store).search_registered_models(f"name='{NAME}'"):
        assert invoke("register", str(runs["mid"]), "--name", NAME, "--config", cfg).exit_code == 0
    result = invoke("evaluate", "models:/no-such-model@champion", "--config", cfg)
    assert result.exit_code == 2 and "no registered model named 'no-such-model'" in result.output
    assert NAME in result.output
    result = invoke("evaluate", f"models:/{NAME}@nope", "--config", cfg)
    assert result.exit_code == 2 and "has no alias 'nope'" in result.output and "@challenger" in result.output
    result = invoke("promote", "no-such-model", "--config", cfg)
    assert result.exit_code == 2 and "registered models:" in result.output
    result = invoke("evaluate", "models:/bad uri", "--config", cfg)
    assert result.exit_code == 2


def test_resolve_model_downloads_a_registered_version(store, runs, tmp_path):
    from pipeline.model.folder import load_model
    from pipeline.registry.model_uri import resolve_model

    cfg = str(store["config"])
    assert invoke("register", str(runs["mid"]), "--name", "resolve-me", "--config", cfg).exit_code == 0
    resolved = resolve_model("models:/resolve-me@challenger", cache_dir=tmp_path)
    assert (resolved.name, resolved.version) == ("resolve-me", "1")
    assert resolved.run_id == json.loads((runs["mid"] / "mlflow_run.json").read_text())["run_id"]
    assert resolved.model_dir.is_relative_to(tmp_path) and load_model(resolved.model_dir).spec.resolution == 16
    assert resolve_model("models:/resolve-me/1", cache_dir=tmp_path).model_dir == resolved.model_dir
    local = resolve_model(str(runs["mid"]))  # a run directory works too
    assert local.name is None and local.model_dir == runs["mid"] / "model"


def test_missing_or_corrupt_artifacts_are_clear_errors(store, shapes_data, tmp_path):
    from mlflow import MlflowClient

    from pipeline.registry.model_uri import resolve_model

    cfg = str(store["config"])
    run_dir = train_run(tmp_path / "t", shapes_data, max_steps=1)
    assert invoke("register", str(run_dir), "--name", "broken", "--config", cfg).exit_code == 0
    model_id = json.loads((run_dir / "mlflow_run.json").read_text())["model_id"]
    assert MlflowClient(store["uri"]).get_model_version("broken", "1").source == f"models:/{model_id}"
    stored = sorted((store["root"] / "mlartifacts").rglob(f"{model_id}/artifacts/artifacts/model/unet"))
    assert len(stored) == 1, stored
    weights = next(stored[0].glob("*.safetensors"))
    weights.write_bytes(b"not a safetensors file")  # corrupt
    result = invoke("evaluate", "models:/broken/1", "--config", cfg)
    assert result.exit_code == 2 and "missing or corrupt" in result.output, result.output
    weights.unlink()  # missing
    with pytest.raises(UserError, match="missing or incomplete"):
        resolve_model("models:/broken/1", cache_dir=tmp_path / "fresh")
    shutil.rmtree(stored[0].parent)
    with pytest.raises(UserError, match="missing"):
        resolve_model("models:/broken/1", cache_dir=tmp_path / "fresh2")


def test_evaluate_cli_writes_json_and_logs_to_the_run(store, runs, tmp_path):
    cfg = str(store["config"])
    # the run must be in MLflow for the evaluation to be logged to it (whichever test ran before)
    assert invoke("train", "--log-only", str(runs["good"]), "--config", cfg).exit_code == 0
    out = tmp_path / "report.json"
    result = invoke("evaluate", str(runs["good"]), "--config", cfg, "--out", str(out))
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    m = report["metrics"]
    assert {"denoise_mse", "denoise_mse_t0000_0250", "denoise_mse_t0750_1000", "copy_rate", "adherence"} <= set(m)
    assert m["denoise_mse"] == pytest.approx(np.mean([v for k, v in m.items() if k.startswith("denoise_mse_t")]),
                                             abs=1e-5)
    assert report["protocol"]["heldout_rule"] == "manifest split == 'eval'"
    assert report["protocol"]["heldout_items"] > 0 and report["protocol"]["steps"] == EVALUATION["steps"]
    assert set(report["skipped"]) == {"fid", "kid", "clip_score"}
    assert all(v.startswith("skipped: weights not available") for v in report["skipped"].values())
    assert "fid" not in m and "clip_score" not in m  # never a number for a skipped metric
    # the same protocol on the same model gives the same numbers (fixed items, timesteps, noise, seeds)
    result = invoke("evaluate", str(runs["good"]), "--config", cfg, "--out", str(tmp_path / "again.json"))
    assert json.loads((tmp_path / "again.json").read_text())["metrics"] == m
    run_id = json.loads((runs["good"] / "mlflow_run.json").read_text())["run_id"]
    run = _client(store).get_run(run_id)
    assert run.data.metrics["eval/denoise_mse"] == pytest.approx(m["denoise_mse"])
    assert run.data.tags["eval.skipped.fid"].startswith("skipped: weights not available")


def test_pyfunc_serves_pngs_and_reports_bad_rows(store, runs, tmp_path):
    import mlflow.pyfunc
    import pandas as pd

    cfg = str(store["config"])
    assert invoke("register", str(runs["mid"]), "--name", "pyfunc", "--config", cfg).exit_code == 0
    model = mlflow.pyfunc.load_model("models:/pyfunc@challenger")
    init = io.BytesIO()
    Image.new("RGB", (40, 40), (200, 30, 30)).save(init, format="PNG")
    df = pd.DataFrame({
        "prompt": ["a small red circle in the center on a white background", "a blue square", "x"],
        "seed": [1, 2, 3], "steps": [3, 3, 3],
        "init_image": [None, base64.b64encode(init.getvalue()).decode(), "not base64 !!"],
        "strength": [None, 0.5, 0.5],
    })
    out = model.predict(df)
    assert list(out.columns) == ["image", "seed", "error"] and out["seed"].tolist() == [1, 2, 3]
    for b64 in out["image"][:2]:
        with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
            assert im.format == "PNG" and im.size == (16, 16)
    assert out["error"].tolist()[:2] == ["", ""]
    assert out["image"][2] == "" and "Error" in out["error"][2]  # the bad row only


def _tiny_clip(folder):
    """A tiny random CLIP saved like a real one (config, weights, processor, a byte-level vocabulary)."""
    folder.mkdir()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2, "red</w>": 3, "circle</w>": 4, "!": 5}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}), tokenizer=tok)
    text = CLIPTextConfig(vocab_size=6, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, max_position_embeddings=77, eos_token_id=1, bos_token_id=0,
                          pad_token_id=1)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=8)) \
        .save_pretrained(str(folder))
    proc.save_pretrained(str(folder))
    return folder


class _TinyFeatures(torch.nn.Module):
    """Stands in for the Inception TorchScript file: the mean colour of the image and of its top half."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.cat([x.mean(dim=(2, 3)), x[:, :, : x.shape[2] // 2].mean(dim=(2, 3))], dim=1) / 255.0


def test_fid_kid_and_clip_score_with_local_weights(store, runs, tmp_path):
    """With the weights present the metrics are computed, not skipped, and they measure what they should."""
    inception = tmp_path / "inception.pt"
    torch.jit.script(_TinyFeatures()).save(str(inception))
    clip = _tiny_clip(tmp_path / "clip")
    report = evaluate(runs["good"] / "model", EvaluationConfig(**EVALUATION, inception_path=inception,
                                                               clip_path=clip))
    assert {"fid", "kid", "clip_score"} <= set(report["metrics"]) and not report["skipped"].keys() & {"fid", "kid"}

    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8, generator=g)
    same = fid_and_kid(inception, real, real.clone(), seed=0)
    assert same["fid"] == pytest.approx(0, abs=1e-4) and abs(same["kid"]) < 1e-3
    brighter = fid_and_kid(inception, real, (real.int() + 60).clamp(max=255).to(torch.uint8), seed=0)
    assert brighter["fid"] > 100 * max(same["fid"], 1e-6) and brighter["kid"] > 1e-3
    assert fid_and_kid(inception, real, real // 2, seed=3)["fid"] > brighter["fid"]  # further away: larger

    # CLIP score: 100 x the cosine of CLIP's own image and text embeddings, clipped at 0 (the definition)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=g)
    prompts = ["a red circle", "a circle", "red", "a red"]
    model = CLIPModel.from_pretrained(str(clip)).eval()
    proc = CLIPProcessor.from_pretrained(str(clip))
    with torch.no_grad():
        out = model(**proc(text=prompts, images=list(images), return_tensors="pt", padding=True))
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
    assert clip_score(clip, images, prompts) == pytest.approx(float((100 * cos).clamp(min=0).mean()), abs=1e-3)


def test_copy_rate_finds_copies_of_training_images(runs):
    data = load_eval_data_for(runs["good"] / "model", EvaluationConfig(**EVALUATION))
    train = torch.from_numpy(data.dataset.images(data.train_rows[:6])).permute(0, 3, 1, 2)
    noise = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))

    def rate(images):
        return copy_rate(images, data.dataset, data.train_rows, data.resolution, 16, 0.02)["copy_rate"]

    assert rate(train) == 1.0
    assert rate(noise) == 0.0
    assert rate(torch.cat([train[:3], noise[:3]])) == 0.5
