"""pip install -e . installs every top-level module; requirements*.txt, pyproject.toml, CI and README agree;
the suite collects on a machine with no network and no tokenizer cache."""

import re

import pytest
from conftest import ROOT, run

CORE = {"torch", "numpy", "tiktoken", "datasets", "tqdm"}  # what python train.py configs/small.py imports
EXTRAS = {"hf": {"transformers", "safetensors", "tokenizers"}, "plot": {"matplotlib"}, "wandb": {"wandb"}}
EXTRAS |= {"study": {"scipy"}}
DEV_TOOLS = {"pytest", "ruff", "scipy", "hyper-connections"}  # the tests compare with scipy and hyper-connections


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_lines(name: str) -> list[str]:
    """The requirement lines of a requirements file: comments and blank lines dropped, specifiers kept."""
    lines = (line.split("#")[0].strip() for line in (ROOT / name).read_text().splitlines())
    return [line for line in lines if line]


def package(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower()


def test_pyproject_lists_every_module_and_extra():
    project = pyproject()
    modules = set(project["tool"]["setuptools"]["py-modules"])
    assert modules == {p.stem for p in ROOT.glob("*.py")}, "a top-level module is missing from py-modules"
    packages = {str(p.parent.relative_to(ROOT)).replace("/", ".") for p in ROOT.glob("**/__init__.py")}
    packages = {p for p in packages if not p.startswith(("tests", "shared", "build"))}
    assert set(project["tool"]["setuptools"]["packages"]) == packages, "a package is missing from packages"
    readme = (ROOT / "README.md").read_text()
    assert "pip install -e ." in readme and ".[hf]" in readme


def test_core_requirements_are_pyproject_dependencies():
    """requirements.txt is the core install exactly: what training needs, with pyproject's own specifiers."""
    deps = pyproject()["project"]["dependencies"]
    assert sorted(requirement_lines("requirements.txt")) == sorted(deps)
    assert {package(d) for d in deps} == CORE


def test_dev_requirements_are_the_dev_extra():
    """requirements-dev.txt is requirements.txt plus pyproject's [dev] extra: pytest, ruff and every other extra."""
    extras = pyproject()["project"]["optional-dependencies"]
    dev = requirement_lines("requirements-dev.txt")
    assert dev[0] == "-r requirements.txt"
    assert sorted(dev[1:]) == sorted(extras["dev"])
    for name, packages in EXTRAS.items():
        assert {package(d) for d in extras[name]} == packages
        assert set(extras[name]) <= set(extras["dev"]), f"the [dev] extra lacks [{name}]'s {extras[name]}"
    assert {package(d) for d in extras["dev"]} == DEV_TOOLS | set().union(*EXTRAS.values())


def test_ci_and_readme_install_the_dev_requirements():
    """CI installs everything the tests use; README's set-up line installs what its train and test commands need."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install -q torch==2.13.0" in ci and "pip install -q -r requirements-dev.txt" in ci
    assert ci.index("torch==2.13.0") < ci.index("requirements-dev.txt")  # CPU torch first, or pip pulls CUDA
    assert ci.index("export LM_EVAL_PYTHON=") < ci.index("python -m pytest")  # the lm-eval test runs, never skips
    readme = (ROOT / "README.md").read_text()
    setup = next(line for line in readme.splitlines() if line.startswith("pip install torch"))
    assert "pip install -r requirements-dev.txt" in setup


def test_suite_collects_offline_without_tokenizer_cache(offline_env):
    """A first install on a machine with no network: no test module may reach tiktoken or the network at import."""
    proc = run(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"], env=offline_env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    counts = dict(re.findall(r"^tests/(test_\w+)\.py: (\d+)$", proc.stdout, re.M))
    modules = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    assert set(counts) == modules, f"modules collected no tests: {modules - set(counts)}"
