"""The MLflow pyfunc with a condition image (a doodle): a doodle model logged with the project's own helper
(registry.log_pyfunc), loaded back with mlflow.pyfunc.load_model, and asked for rows with, without and with a
broken doodle; a text-only model refuses only its doodle rows."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from tests.mlflow_support import mlflow_store

PROMPT = "a small red circle in the center on a white background"


pytestmark = pytest.mark.usefixtures("one_thread")  # 2 shared cores


@pytest.fixture(scope="module")
def mlflow_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow_doodle")
    with mlflow_store(root):
        import mlflow

        # artifacts under the test's folder: the default experiment would put them in ./mlruns of the checkout
        exp = mlflow.create_experiment("doodle-serving", artifact_location=(root / "mlartifacts").as_uri())
        mlflow.set_experiment(experiment_id=exp)
        yield root


def served(model_dir):
    """model_dir logged as a pyfunc in a new MLflow run, then loaded the way `mlflow models serve` loads it."""
    import mlflow

    from pipeline.registry.pyfunc import log_pyfunc

    with mlflow.start_run() as run:
        pass
    model_id = log_pyfunc(run.info.run_id, model_dir)
    return mlflow.pyfunc.load_model(f"models:/{model_id}")


def sketch_b64(box: tuple[int, int, int, int], size: int = 48) -> str:
    """A sketch at its own size (not the model's 16 px) as a client sends it: a black outline on white."""
    im = Image.new("RGB", (size, size), "white")
    ImageDraw.Draw(im).rectangle(box, outline="black", width=3)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def pixels(b64: str) -> np.ndarray:
    with Image.open(io.BytesIO(base64.b64decode(b64))) as im:
        assert im.format == "PNG" and im.size == (16, 16)
        return np.asarray(im.convert("RGB"), dtype=np.int16)


def test_pyfunc_follows_a_doodle_and_reports_bad_doodle_rows(doodle_model, mlflow_root):
    import pandas as pd

    model = served(doodle_model.path)
    doodle = sketch_b64((6, 6, 42, 42))
    df = pd.DataFrame({
        "prompt": [PROMPT] * 5,
        "seed": [1, 1, 1, 1, 3],
        "steps": [3] * 5,
        "condition_image": [doodle, None, doodle, "not base64 !!", base64.b64encode(b"no image").decode()],
        "image_guidance": [None, None, 3.0, None, None],  # row 0: the default, 1.5
    })
    out = model.predict(df)
    assert list(out.columns) == ["image", "seed", "error"] and out["seed"].tolist() == [1, 1, 1, 1, 3]
    assert out["error"].tolist()[:3] == ["", "", ""]
    with_doodle, without, stronger = (pixels(b64) for b64 in out["image"][:3])
    # same prompt and seed: the doodle and its guidance scale are what change the image
    assert np.abs(with_doodle - without).max() > 8 and np.abs(with_doodle - stronger).max() > 8
    assert out["image"][3] == "" and "Error" in out["error"][3]  # undecodable base64: that row only
    assert out["image"][4] == "" and "not a readable image" in out["error"][4]


def test_pyfunc_of_a_text_only_model_refuses_only_doodle_rows(trained_tiny, mlflow_root):
    import pandas as pd

    model = served(trained_tiny)
    df = pd.DataFrame({"prompt": [PROMPT, PROMPT], "steps": [2, 2],
                       "condition_image": [sketch_b64((6, 6, 42, 42)), None]})
    out = model.predict(df)
    assert out["image"][0] == "" and "trained without a condition image" in out["error"][0]
    assert out["error"][1] == "" and pixels(out["image"][1]).shape == (16, 16, 3)


def test_signature_lists_the_doodle_columns():
    from pipeline.registry.pyfunc import DEFAULTS, INPUT_COLUMNS, signature

    inputs = {c.name: (c.type.name, c.required) for c in signature().inputs.inputs}
    assert inputs["condition_image"] == ("string", False) and inputs["image_guidance"] == ("double", False)
    assert {"condition_image", "image_guidance"} <= set(INPUT_COLUMNS) and DEFAULTS["image_guidance"] == 1.5
