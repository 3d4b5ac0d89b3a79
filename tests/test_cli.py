"""Bad input gets a clear message and exit code 2, never a traceback."""

import shutil

import pytest
import yaml
from PIL import Image

from tests.conftest import invoke, run_cli, tiny_config, write_config

PROMPT = "a large red circle in the center on a white background"



@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"train": {"max_step": 5}}, "train.max_step: unknown key"),
        ({"train": {"lr": -1}}, "train.lr: Input should be greater than 0"),
        ({"model": {"attention_levels": [True]}}, "one entry per model.block_out_channels"),
        ({"train": {"restart_at": 10}}, "train.restart_at: use train.cycles"),
        ({"train": {"cycles": [{"steps": 5}], "max_steps": 6}}, "max_steps (6) is not the total of the cycles"),
        ({"data": {"resolution": 18}}, "must be divisible"),
        ({"context": {"encoder": "clip"}}, "needs context.clip_path"),
    ],
)
def test_config_errors_name_the_key(tmp_path, shapes_data, change, message):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, shapes_data, **change))
    result = invoke("train", "--config", str(cfg))
    assert result.exit_code == 2 and message in result.output, result.output


def test_missing_config_and_bad_yaml(tmp_path):
    result = invoke("train", "--config", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 2 and "config file not found" in result.output
    (tmp_path / "bad.yaml").write_text("data: [unclosed")
    result = invoke("train", "--config", str(tmp_path / "bad.yaml"))
    assert result.exit_code == 2 and "not valid YAML" in result.output
    result = invoke("train", "--config", str(tmp_path / "bad.yaml"), "--set", "nonsense")
    assert result.exit_code == 2 and "KEY=VALUE" in result.output


def test_dataset_without_metadata(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path, tmp_path / "empty"))
    result = invoke("train", "--config", str(cfg))
    assert result.exit_code == 2 and "no metadata.jsonl" in result.output


def test_sample_errors(tmp_path, trained_tiny):
    result = invoke("sample", "--model", str(tmp_path / "missing"), "--prompt", PROMPT)
    assert result.exit_code == 2 and "model directory not found" in result.output
    broken = tmp_path / "broken"
    shutil.copytree(trained_tiny, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    result = invoke("sample", "--model", str(broken), "--prompt", PROMPT)
    assert result.exit_code == 2 and "missing or corrupt" in result.output
    (tmp_path / "notes.png").write_text("this is text")
    result = invoke("sample", "--model", str(trained_tiny), "--prompt", PROMPT, "--init-image",
                    str(tmp_path / "notes.png"))
    assert result.exit_code == 2 and "not a readable image" in result.output
    result = invoke("sample", "--model", str(trained_tiny), "--prompt", PROMPT, "--init-image",
                    str(tmp_path / "absent.png"))
    assert result.exit_code == 2 and "init image not found" in result.output
    for flag, value, message in (("--strength", "1.5", "strength must be between 0 and 1"),
                                 ("--steps", "0", "steps must be between 1 and 1000"),
                                 ("--guidance", "-1", "guidance must be between 0 and 50"),
                                 ("--sampler", "euler", "unknown sampler")):
        args = ["sample", "--model", str(trained_tiny), "--prompt", PROMPT, flag, value, "--out", str(tmp_path)]
        if flag == "--strength":
            Image.new("RGB", (16, 16)).save(tmp_path / "init.png")
            args += ["--init-image", str(tmp_path / "init.png")]
        result = invoke(*args)
        assert result.exit_code == 2 and message in result.output, (flag, result.output)


def test_sample_resizes_init_image_truncates_long_prompts_and_allows_empty(tmp_path, trained_tiny, caplog):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "wide.png")
    result = invoke("sample", "--model", str(trained_tiny), "--prompt", PROMPT, "--init-image",
                    str(tmp_path / "wide.png"), "--strength", "0.5", "--steps", "4", "--num", "2",
                    "--out", str(tmp_path / "a"))
    assert result.exit_code == 0, result.output
    assert "resized and centre-cropped to 16x16" in result.output
    assert len(list((tmp_path / "a").glob("0*.png"))) == 2 and (tmp_path / "a" / "grid.png").exists()
    result = invoke("sample", "--model", str(trained_tiny), "--prompt", "red " * 40, "--prompt", "",
                    "--steps", "3", "--num", "1", "--out", str(tmp_path / "b"))
    assert result.exit_code == 0, result.output
    assert "truncated" in result.output + caplog.text
    assert len(list((tmp_path / "b").glob("0*.png"))) == 2


def test_resume_from_a_corrupt_checkpoint(tmp_path, shapes_data, embedding_cache):
    raw = tiny_config(tmp_path, shapes_data, train={"max_steps": 2, "checkpoint_every": 2},
                      context={"cache_dir": str(embedding_cache)})
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert invoke("train", "--config", str(cfg)).exit_code == 0
    (tmp_path / "run" / "checkpoints" / "step-0000002" / "state.pt").write_bytes(b"garbage")
    raw["train"]["max_steps"] = 4
    cfg.write_text(yaml.safe_dump(raw))
    result = invoke("train", "--config", str(cfg), "--resume")
    assert result.exit_code == 2 and "is corrupt" in result.output and "Delete this folder" in result.output


def test_real_process_exit_code_and_no_traceback(tmp_path):
    """The installed entry point, in its own process."""
    proc = run_cli("sample", "--model", str(tmp_path / "nothing"), "--prompt", "x")
    assert proc.returncode == 2
    assert "model directory not found" in proc.stderr and "Traceback" not in proc.stderr + proc.stdout


def test_a_second_fresh_run_needs_resume_or_overwrite(tmp_path, shapes_data, embedding_cache):
    raw = tiny_config(tmp_path, shapes_data, train={"max_steps": 2, "checkpoint_every": 1, "log_every": 1},
                      context={"cache_dir": str(embedding_cache)})
    cfg = write_config(tmp_path / "c.yaml", raw)
    assert invoke("train", "--config", str(cfg)).exit_code == 0
    result = invoke("train", "--config", str(cfg))
    assert result.exit_code == 2 and "--resume" in result.output and "--overwrite" in result.output
    assert invoke("train", "--config", str(cfg), "--overwrite").exit_code == 0
    steps = [line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(steps) == 2  # the earlier run's metrics went with its checkpoints
