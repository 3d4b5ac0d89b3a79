"""The package's shape: subpackages by concern, imports that go one way, no import cycle, and the optional extras
(Airflow, Great Expectations, DVC) out of what training, sampling and generation import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "pipeline"
# Lower layers never import higher ones (a module may import its own layer and the ones before it).
LAYERS = [
    {"errors", "config", "images", "storage"},
    {"model"},
    {"data"},
    {"training", "shapes"},
    {"evaluation"},
    {"registry"},
    {"generation"},
    {"orchestration"},
    {"cli"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """pipeline module -> the pipeline modules it imports (anywhere in the file)."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pipeline"):
                for alias in node.names:  # `from pipeline.shapes import dataset` imports pipeline.shapes.dataset
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("pipeline")}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _layer(module: str) -> int:
    part = module.split(".")[1] if module.count(".") else "cli"
    return next(i for i, layer in enumerate(LAYERS) if part in layer)


def test_the_import_graph_has_no_cycle():
    graph = _imports()
    assert len(graph) > 30  # the walk found the package
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_dependencies_go_one_way_between_subpackages():
    wrong = [f"{m} imports {d}" for m, deps in _imports().items() for d in deps
             if m != "pipeline" and d != "pipeline" and _layer(d) > _layer(m)]
    assert not wrong, "\n".join(wrong)


def test_top_level_holds_little_besides_the_subpackages():
    top = sorted(p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py")
    assert top == ["cli.py", "config.py", "errors.py", "images.py", "storage.py"]
    subpackages = sorted(p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file())
    assert subpackages == ["data", "evaluation", "generation", "model", "orchestration", "registry", "shapes",
                           "training"]


# Packages the `airflow` and `data` extras bring; a lean training/generation image has none of them.
EXTRAS = ("airflow", "great_expectations", "dvc", "docker", "kubernetes")
_BLOCKER = """
import sys
from importlib.abc import MetaPathFinder

class NotInstalled(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {extras!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, NotInstalled())
sys.argv = ["diffuse", *sys.argv[1:]]
from pipeline.cli import main
main()
"""


def lean(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """`diffuse ARGS` in a process where the extras' packages cannot be imported (as in a lean image)."""
    return subprocess.run([sys.executable, "-c", _BLOCKER.format(extras=EXTRAS), *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_train_sample_and_generate_run_without_the_extras(tmp_path, shapes_data):
    from tests.conftest import tiny_config, write_config

    cfg = tiny_config(tmp_path, shapes_data, train={"max_steps": 4, "checkpoint_every": 4},
                      tracking={"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "sample_every": 0},
                      generation={"store_url": f"sqlite:///{tmp_path / 'prompts.db'}",
                                  "artifact_root": str(tmp_path / "out"), "steps": 2})
    config = write_config(tmp_path / "c.yaml", cfg)
    r = lean("train", "--config", str(config), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    model = tmp_path / "run" / "model"
    r = lean("sample", "--model", str(model), "--prompt", "a red circle", "--num", "1", "--steps", "2",
             "--out", str(tmp_path / "samples"), cwd=tmp_path)
    assert r.returncode == 0 and (tmp_path / "samples" / "grid.png").is_file(), r.stderr
    assert lean("prompts", "add", "a red circle", "--config", str(config), cwd=tmp_path).returncode == 0
    r = lean("generate", "--model", str(model), "--config", str(config), cwd=tmp_path)
    assert r.returncode == 0 and list((tmp_path / "out" / "images").rglob("*.png")), r.stderr
    # the blocker works: a command that needs an extra says which one, and exits 2
    r = lean("data", "validate", str(tmp_path / "prepared"), cwd=tmp_path)
    assert r.returncode == 2 and "diffuse-pipeline[data]" in r.stderr and "Traceback" not in r.stderr, r.stderr
