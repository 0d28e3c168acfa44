"""Running the study's jobs (execute.py): a rerun reproduces its numbers, a run keeps its records and not its
checkpoints, and an inspected run keeps its checkpoint until its inspection succeeds."""

import json

import pytest
from conftest import ROOT, metrics_records
from test_study import TINY, row

from scripts.study import execute
from scripts.study import runner as study
from scripts.study.job import Job
from scripts.study.runner import main as study_main


@pytest.fixture(autouse=True)
def at_the_root(monkeypatch):
    """study.main runs in this process from the repo root, like the subprocesses, on one thread each."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)


def test_a_rerun_reproduces_its_numbers_and_keeps_records_not_checkpoints(tmp_path, char_data, capsys):
    """The same study twice on this machine: the same losses to the last digit (CPU runs, one thread each)."""
    argv = ["configs/small.py", f"--data_dir={char_data}", f"--study_dir={tmp_path}", *TINY, "--n_layer=1"]
    argv += ["--variants=pre_ln", "--seeds=2", "--questions=none", "--max_iters=12", "--jobs=2"]
    assert study_main([*argv, "--name=a"]) == 0 and study_main([*argv, "--name=b"]) == 0
    capsys.readouterr()
    reports = [(tmp_path / f"{name}/report.md").read_text() for name in "ab"]
    assert row(reports[0], "pre_ln")[1:4] == row(reports[1], "pre_ln")[1:4] and "±" in row(reports[0], "pre_ln")[2]
    for seed in ("s1337", "s1338"):
        first, again = (
            [r for r in metrics_records(tmp_path / f"{n}/runs/pre_ln-{seed}") if "val_loss" in r] for n in "ab"
        )
        assert [r["val_loss"] for r in first] == [r["val_loss"] for r in again] and len(first) >= 2
    runs = tmp_path / "a/runs/pre_ln-s1337"
    assert not list(runs.glob("*.pt")) and {"metrics.jsonl", "config.json", "train.log", "study.json"} <= {
        p.name for p in runs.iterdir()
    }


def test_an_inspected_run_keeps_its_checkpoint_until_the_inspection_succeeds(tmp_path, char_data, monkeypatch):
    """A run a question looks inside: trained once, inspected; a failed inspection keeps the checkpoint, and
    --reuse inspects it again without training again, then deletes it."""
    calls = []

    def fake_inspect(job, out, env):  # python -m scripts.inspect's part: it reads the run's checkpoint
        calls.append((out / "ckpt.pt").exists())
        ok = len(calls) > 1
        if ok:
            (out / "inspect.json").write_text(json.dumps({"layers": [{"block": 0, "skip_loss_delta": 0.1}]}))
        return dict(inspect_rc=0 if ok else 1, inspect_error="" if ok else "error: no instruments")

    monkeypatch.setattr(execute, "inspect", fake_inspect)
    args = ["configs/small.py", f"--data_dir={char_data}", *TINY, "--n_layer=1", "--max_iters=6", "--seed=1"]
    resolved = study.resolve(args)
    job = Job("q-d1-s1", "q", 1, args, resolved, inspect=2)
    execute.run_job(job, tmp_path, None, reuse=False)
    out = tmp_path / "q-d1-s1"
    assert job.status == "ok" and job.inspection is None and job.inspect_error == "error: no instruments"
    assert calls == [True] and (out / "ckpt.pt").exists()
    trained = (out / "train.log").stat().st_mtime_ns
    again = Job("q-d1-s1", "q", 1, args, resolved, inspect=2)
    execute.run_job(again, tmp_path, None, reuse=True)
    assert calls == [True, True] and again.inspection["layers"][0]["skip_loss_delta"] == 0.1
    assert (out / "train.log").stat().st_mtime_ns == trained and not list(out.glob("*.pt"))
