"""gpt_residual/errors.py: the errors a user can fix are listed once, and every command prints each of them as one
line on stderr (no traceback), whichever command's work raises it."""

import importlib
import inspect
import pkgutil

import pytest
from conftest import ROOT

import sample
import train
from gpt_residual import errors, hf_export
from scripts import bench
from scripts import eval as eval_command
from scripts import export as export_command
from scripts.study import runner

# each command's main, the argv it parses, and the function its work runs in (raising there = raising in the work)
COMMANDS = {
    "train.py": (train.main, [], train, "train"),
    "sample.py": (sample.main, [], sample, "sample"),
    "scripts.eval": (eval_command.main, [], eval_command, "run_eval"),
    "scripts.export": (export_command.main, ["--to=unused"], hf_export, "export"),
    "scripts.bench": (bench.main, [], bench, "run"),
    "scripts.study": (runner.main, ["configs/small.py"], runner, "plan"),
}


@pytest.mark.parametrize("error", errors.USER_ERRORS, ids=lambda e: e.__name__)
@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_prints_every_user_error_as_one_line(name, error, monkeypatch, capsys):
    main, argv, module, function = COMMANDS[name]

    def fail(*args, **kwargs):
        raise error("what to do, in one line")

    monkeypatch.setattr(module, function, fail)
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == (1 if error is errors.TrainingError and name == "train.py" else 2), (code, out, err)
    assert err == "error: what to do, in one line\n", err


def test_every_error_class_of_the_package_is_listed():
    """An ...Error class of gpt_residual/ is a user error: listed once, in errors.py (or it does not exist)."""
    found = set()
    for info in pkgutil.iter_modules([str(ROOT / "gpt_residual")]):
        module = importlib.import_module(f"gpt_residual.{info.name}")
        found |= {c for n, c in inspect.getmembers(module, inspect.isclass)
                  if issubclass(c, Exception) and n.endswith("Error") and c.__module__ == module.__name__}  # fmt: skip
    assert found == set(errors.USER_ERRORS)
