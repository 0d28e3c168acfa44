"""One run per out_dir, and init_from=auto: two runs started together into one out_dir (one trains, the other refuses
in one line naming it), a run under torchrun refusing a locked out_dir with one line from its ranks, a killed run's
lock gone with it, and init_from=auto starting a run, then resuming it.
"""

import fcntl
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ROOT, run
from torchrun_jobs import TINY, launcher, needs_proc, no_worker_tracebacks, saved_step

import train
from gpt_residual import config, run_dir


@pytest.fixture
def jobs():
    yield from launcher()


def test_init_from_auto_starts_then_resumes(tiny_cfg, capsys):
    first = train.train(tiny_cfg(init_from="auto", max_iters=10))
    assert "init_from=auto: a new run in" in capsys.readouterr().out and first["step"] == 10
    second = train.train(tiny_cfg(init_from="auto", max_iters=20))
    printed = capsys.readouterr().out
    assert "init_from=auto: resuming the run in" in printed and "resumed from" in printed and second["step"] == 20
    out = Path(tiny_cfg().out_dir)
    (out / "ckpt.pt").unlink()  # step files but no ckpt.pt: not a run to resume, nor one to overwrite unasked
    with pytest.raises(config.ConfigError, match="already holds a run"):
        train.train(tiny_cfg(init_from="auto", max_iters=30))


def cli(data: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "train.py", *TINY, f"--data_dir={data}", f"--out_dir={out}", "--log_interval=5", *extra]


def race(args: list[str]):
    """Two identical runs started together: one trains, the other refuses in one line naming the first."""
    procs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    winners = [r for r in results if r[0].returncode == 0]
    losers = [r for r in results if r[0].returncode != 0]
    assert len(winners) == len(losers) == 1, [(p.returncode, err[-500:]) for p, _, err in results]
    (winner, _, _), (loser, _, err) = winners[0], losers[0]
    lines = err.strip().splitlines()
    assert loser.returncode == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: out_dir") and "is in use by another run" in lines[0], lines[0]
    assert f"pid {winner.pid} on {socket.gethostname()}" in lines[0] and "python train.py" in lines[0], lines[0]


def test_two_runs_started_together_into_one_out_dir(char_data, tmp_path):
    out = tmp_path / "run"
    race(cli(char_data, out, "--max_iters=50", "--eval_interval=10"))
    race(cli(char_data, out, "--max_iters=100", "--eval_interval=10", "--init_from=resume"))
    record = json.loads((out / "config.json").read_text())
    assert [r["step"] for r in record["resumes"]] == [50]  # one resume went on from step 50, the other was refused
    assert saved_step(out) == 100


def test_a_refusal_names_a_holder_that_has_just_taken_the_lock(tmp_path):
    """The holder writes its record a moment after it takes the lock (as in a race, where CI once caught a refusal
    saying only "its details are not written yet"): the refused run waits for the record and names the holder."""
    out = tmp_path / "run"
    out.mkdir()
    holder = open(out / run_dir.LOCK, "a+")
    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the lock taken, its record not written yet
    record = {"pid": 4242, "host": "node7", "started": "2026-12-04 12:00:00", "command": "python train.py x"}
    late = threading.Timer(0.3, lambda: os.write(holder.fileno(), json.dumps(record).encode()))
    late.start()
    try:
        with pytest.raises(config.ConfigError, match=r"in use by another run \(pid 4242 on node7 since "):
            run_dir.lock_out_dir(out)
    finally:
        late.join()
        holder.close()


@needs_proc
def test_a_run_under_torchrun_refuses_a_locked_out_dir_in_one_line(char_data, tmp_path, jobs):
    """Rank 0 takes the lock and every rank learns the outcome: all of them refuse together, one line is printed."""
    out = tmp_path / "run"
    held = run_dir.lock_out_dir(out)  # as a run in progress holds it
    try:
        job = jobs("torchrun", [*TINY, f"--data_dir={Path(char_data)}", f"--out_dir={out}"], tmp_path, "j")
        job.workers()
        assert job.ended_within(120), job.output()[-3000:]
    finally:
        held.close()
    errors = [line for line in job.output().splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"is in use by another run (pid {os.getpid()}" in errors[0], job.output()[-3000:]
    no_worker_tracebacks(job.output())


def test_a_killed_runs_lock_does_not_block_the_next(char_data, tmp_path):
    out = tmp_path / "run"
    args = cli(char_data, out, "--max_iters=100000", "--eval_interval=20", "--checkpoint_interval=20")
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("step 20/"):
                break
        while not (out / "ckpt.pt").exists():
            time.sleep(0.01)
        with pytest.raises(config.ConfigError, match=f"in use by another run \\(pid {proc.pid} "):
            run_dir.lock_out_dir(out)  # held while the run lives
    finally:
        proc.kill()
        proc.communicate()
    r = run(cli(char_data, out, "--max_iters=25", "--eval_interval=20", "--init_from=auto")[1:])
    assert r.returncode == 0, r.stderr
    assert "init_from=auto: resuming the run in" in r.stdout and "done: step 25" in r.stdout
