"""pip install -e . installs every top-level module, the core dependencies and the extras README lists."""

import tomllib
from conftest import ROOT


def test_pyproject_lists_every_module_and_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    modules = set(project["tool"]["setuptools"]["py-modules"])
    assert modules == {p.stem for p in ROOT.glob("*.py")}, "a top-level module is missing from py-modules"
    deps = " ".join(project["project"]["dependencies"])
    for name in ("torch", "numpy", "tiktoken", "datasets", "tqdm"):
        assert name in deps
    extras = project["project"]["optional-dependencies"]
    assert {"dev", "hf", "plot", "wandb"} <= extras.keys()
    assert any(d.startswith("transformers") for d in extras["hf"])
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e ." in readme and ".[hf]" in readme
