"""Faults as a cluster user meets them, with real processes (tests/torchrun_jobs.py): two ranks under torchrun (gloo on
the CPU) signalled at random instants, an error on every rank, a rank that fails alone, a worker killed with -9,
torchrun restarting a job, and the Slurm job script (scripts/slurm_train.sh) with stand-ins for srun and scontrol.

What must hold:
  (a) SIGTERM to the launcher, to every process (as Slurm sends it) or to one worker, at any instant, ends every
      process within seconds, with one checkpoint at a step every rank agreed on, no temporary file, the resume
      command, and a checkpoint the next run resumes from;
  (b) an error on any rank ends every rank at once, the error printed once in one line; a rank that fails alone
      (its disk full) does not leave the others waiting; the survivor of a killed worker says in one line what is
      saved and how to resume, without gloo's tracebacks;
  (c) with init_from=auto, torchrun --max-restarts and a requeued Slurm job go on by themselves, bit-identical to a
      run never interrupted.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from torchrun_jobs import DEADLINE, TINY, Job, free_port, launcher, needs_proc, no_worker_tracebacks, saved_step

from gpt_residual import checkpoint, runtime


@pytest.fixture
def jobs():
    yield from launcher()


# ----------------------------------------------------------------------------- (a) SIGTERM at random instants


def signal_job(job: Job, mode: str, rng: random.Random):
    """SIGTERM as a launcher or a scheduler sends it: to torchrun (which forwards it), to every process (Slurm; the
    workers first, torchrun's own copy a moment later), or to one worker."""
    workers = job.workers()
    if mode == "one":
        os.kill(rng.choice(workers), signal.SIGTERM)
        return
    if mode == "all":
        for pid in rng.sample(workers, len(workers)):
            os.kill(pid, signal.SIGTERM)
            time.sleep(rng.uniform(0, 0.05))
    os.kill(job.proc.pid, signal.SIGTERM)


def check_trial(job: Job, out: Path, before: int | None, mode: str) -> int | None:
    """One signalled run: a save at one agreed step (or nothing new, if it was still setting up), said in its last
    lines with the resume command, no temporary file, and a resume from the previous trial's checkpoint."""
    text, stdout = job.output(), job.stdout()
    no_worker_tracebacks(text)
    assert not list(out.glob(".ckpt*.tmp*")), "a checkpoint write was left unfinished"
    step = saved_step(out)
    lines = stdout.strip().splitlines()
    training = any(line.startswith("step ") and "/" in line.split()[1] for line in lines)
    if before is not None and "resumed from" not in stdout:
        assert not training, "trained without resuming"
    if any(line.startswith("stopped by SIGTERM at step") for line in lines):
        stopped = int(lines[-2].split(" at step ")[1].split(":")[0])
        assert lines[-2].startswith("stopped by SIGTERM at step"), lines[-3:]
        assert lines[-1].startswith("resume with: torchrun --standalone --nproc_per_node=2 train.py"), lines[-1]
        assert lines[-1].endswith("--init_from=auto"), lines[-1]
        assert step == stopped, f"stopped at step {stopped} but ckpt.pt is at step {step}"
        assert len(checkpoint.load(out / "ckpt.pt")["rng"]) == 2  # every rank's state, gathered at that step
    else:  # signalled while setting up: nothing new to save, said once (or the worker died in its imports)
        assert not training, f"trained, then stopped without saving ({mode})\n{text[-3000:]}"
        assert step == before
        assert stdout.count("before training began") <= 1
    if mode == "one":  # torchrun was not signalled: every worker exits 0, but one that the signal found still
        # importing torch, before train.py could set its handler, which the signal's default action ends at once
        importing = "config (all" not in stdout and "Signal 15 (SIGTERM) received by PID" in text
        assert job.proc.returncode == 0 or importing, text[-3000:]
    return step


@needs_proc
def test_sigterm_at_random_instants_ends_every_rank_with_one_agreed_save(char_data, tmp_path, jobs):
    """Trials until a time budget is spent, each resuming the last one's checkpoint (init_from=auto), signalled at a
    random instant: while setting up (a quarter of them), or while training, evaluating and saving (a checkpoint
    every 3 steps). The modes rotate: launcher, every process, one worker."""
    rng = random.Random(int(os.environ.get("FAULTS_SEED", time.time_ns() % 10_000)))
    out = tmp_path / "run"
    args = [*TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=100000", "--lr_decay_iters=1000"]
    args += ["--log_interval=1", "--eval_interval=10", "--checkpoint_interval=3", "--init_from=auto"]
    budget, trials, step = time.time() + 75, [], None
    while time.time() < budget or len(trials) < 4:
        mode = ("launcher", "all", "one")[len(trials) % 3]
        job = jobs("torchrun", args, tmp_path, f"trial{len(trials)}")
        job.workers()
        if rng.random() < 0.25:
            time.sleep(rng.uniform(0, 3))  # setting up: imports, data, model, the out_dir's lock
        else:
            job.wait_for("/100000 |")
            time.sleep(rng.uniform(0, 1.0))
        signal_job(job, mode, rng)
        assert job.ended_within(DEADLINE), f"trial {len(trials)} ({mode}) still running\n{job.output()[-3000:]}"
        step = check_trial(job, out, step, mode)
        trials.append((mode, step))
    assert sum(s is not None for _, s in trials) >= 2, trials


# ----------------------------------------------------------------------------- (b) an error on one rank


@needs_proc
def test_an_error_every_rank_finds_in_setup_is_one_line_and_ends_every_rank(char_data, tmp_path, jobs):
    """A sample prompt outside the char vocabulary: every rank checks it in setup, every rank raises, one prints."""
    args = [*TINY, f"--data_dir={char_data}", f"--out_dir={tmp_path / 'run'}", "--max_iters=20"]
    job = jobs("torchrun", [*args, "--eval_interval=10", "--sample_interval=10", "--sample_prompt=~"], tmp_path, "j")
    job.workers()
    assert job.ended_within(120), "the ranks hung\n" + job.output()[-3000:]
    text = job.output()
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "'~'" in errors[0], text[-3000:]
    assert job.proc.returncode != 0
    no_worker_tracebacks(text)


def mount_tmpfs(folder: Path, size: str):
    folder.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.decode().strip() or proc.returncode}): CI runs as root")


@needs_proc
def test_a_full_disk_on_rank_0_alone_ends_every_rank(char_data, tmp_path, jobs):
    """Only rank 0 writes: out_dir on a tmpfs with room for one checkpoint. Rank 0's second save fails; rank 1,
    already waiting for it in the next collective, must end too, and stay silent."""
    out = tmp_path / "small"
    mount_tmpfs(out, "600k")
    try:
        args = [*TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=100", "--log_interval=1"]
        job = jobs("torchrun", [*args, "--eval_interval=1000", "--checkpoint_interval=5"], tmp_path, "j")
        job.workers()
        assert job.ended_within(120), "rank 1 waits for rank 0 forever\n" + job.output()[-3000:]
        text = job.output()
        assert job.proc.returncode != 0 and "done:" not in text
        assert "[rank1]" not in text and "gloo" not in text, text[-3000:]
        assert saved_step(out) == 5  # the checkpoint that fitted is intact
    finally:
        subprocess.run(["umount", str(out)], check=False)


@needs_proc
def test_the_survivor_of_a_killed_rank_0_says_how_to_resume(char_data, tmp_path, jobs):
    """kill -9 of rank 0: rank 1, which prints nothing else, ends at once with one line (what is saved, the resume
    command); torchrun reports the kill. No gloo traceback. (A killed rank 1: the restart test below.)"""
    out = tmp_path / "run"
    args = [*TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--max_iters=100000", "--log_interval=1"]
    job = jobs("torchrun", [*args, "--eval_interval=1000", "--checkpoint_interval=5"], tmp_path, "j")
    workers = job.workers()
    job.wait_for("/100000 |")
    while not (out / "ckpt.pt").exists():
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.5))
    os.kill(workers[0], signal.SIGKILL)
    assert job.ended_within(DEADLINE), "the survivor did not end\n" + job.output()[-3000:]
    survivor_said_how_to_resume(job.output(), out, "--init_from=resume")


def survivor_said_how_to_resume(text: str, out: Path, again: str):
    errors = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, text[-3000:]
    assert "another process of this run ended" in errors[0] and f"{out / 'ckpt.pt'} is at step" in errors[0]
    assert "resume with: torchrun --standalone" in errors[0] and errors[0].endswith(again), errors[0]
    no_worker_tracebacks(text)


# ----------------------------------------------------------------------------- (c) init_from=auto restarts


@pytest.fixture(scope="module")
def straight(char_data, tmp_path_factory) -> tuple[list[str], dict]:
    """A 2-rank run of 60 steps never interrupted: its arguments (but out_dir) and its last checkpoint."""
    folder = tmp_path_factory.mktemp("straight")
    args = [*TINY, f"--data_dir={char_data}", "--max_iters=60", "--log_interval=1", "--eval_interval=20"]
    args += ["--checkpoint_interval=10", "--init_from=auto"]
    job = Job.torchrun([*args, f"--out_dir={folder / 'run'}"], folder, "straight")
    assert job.proc.wait(timeout=300) == 0, job.output()[-3000:]
    return args, checkpoint.load(folder / "run" / "ckpt.pt")


@needs_proc
def test_torchrun_restarts_a_killed_worker_and_the_run_resumes_by_itself(straight, tmp_path, jobs):
    """kill -9 of rank 1 at a random instant after the first checkpoint under torchrun --max-restarts=1: rank 0 says
    how to resume, torchrun starts the workers again with the same command, init_from=auto resumes, and the run ends
    bit-identical to one never interrupted."""
    args, want = straight
    out = tmp_path / "run"
    job = jobs("torchrun", [*args, f"--out_dir={out}"], tmp_path, "j", "--max-restarts=1")
    workers = job.workers()
    while not (out / "ckpt.pt").exists():
        assert job.proc.poll() is None, job.output()[-3000:]
        time.sleep(0.01)
    time.sleep(random.uniform(0, 0.3))
    os.kill(workers[1], signal.SIGKILL)
    assert job.proc.wait(timeout=300) == 0, job.output()[-3000:]
    survivor_said_how_to_resume(job.output(), out, "--init_from=auto")  # rank 0, before torchrun's restart
    text = job.stdout()
    assert "init_from=auto: resuming the run in" in text and "resumed from" in text, "torchrun's restart did not resume"
    got = checkpoint.load(out / "ckpt.pt")
    assert got["step"] == want["step"] == 60
    for key in want["model"]:
        assert torch.equal(got["model"][key], want["model"][key]), f"weights differ in {key}"
    for name, state in want["optimizer"]["state"].items():
        for k, v in state.items():
            assert torch.equal(got["optimizer"]["state"][name][k], v), f"optimizer state {name}.{k} differs"


STUBS = {  # stand-ins for Slurm's commands: srun runs its command here, scontrol names this host and notes a requeue
    "srun": 'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',
    "scontrol": 'case "$1" in show) echo localhost ;; requeue) echo "requeue $2" >> "$SLURM_STUB_LOG" ;; esac\n',
    "torchrun": f'exec {sys.executable} -m torch.distributed.run "$@"\n',
}


@needs_proc
def test_the_slurm_job_script_saves_requeues_and_resumes(char_data, tmp_path, jobs):
    """scripts/slurm_train.sh as Slurm runs it near the time limit (--signal=B:USR1): the script stops the training
    (SIGTERM through srun and torchrun), every rank saves, the job requeues itself; the requeued job (the same
    command) resumes and finishes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
        (bin_dir / name).chmod(0o755)
    log, out = tmp_path / "slurm.log", tmp_path / "run"
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_STUB_LOG": str(log), "SLURM_JOB_ID": "77",
           "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node1", "GPUS_PER_NODE": "2", "MASTER_PORT": str(free_port())}
    args = [*TINY, f"--data_dir={char_data}", f"--out_dir={out}", "--log_interval=1", "--eval_interval=1000"]
    script = ["bash", str(ROOT / "scripts" / "slurm_train.sh"), *args]
    job = jobs("cmd", [*script, "--max_iters=100000", "--checkpoint_interval=0"], tmp_path, "job", env=env)
    job.wait_for("/100000 |")
    job.proc.send_signal(signal.SIGUSR1)
    assert job.ended_within(DEADLINE), job.output()[-3000:]
    text = job.stdout()
    assert "requeueing job 77" in text and log.read_text() == "requeue 77\n", text[-3000:]
    stopped = saved_step(out)
    assert stopped and f"stopped by SIGTERM at step {stopped}:" in text
    env["MASTER_PORT"] = str(free_port())
    again = jobs("cmd", [*script, f"--max_iters={stopped + 5}"], tmp_path, "again", env=env)
    assert again.proc.wait(timeout=300) == 0, again.output()[-3000:]
    assert f"resumed from {out / 'ckpt.pt'} at step {stopped}" in again.stdout()
    assert f"done: step {stopped + 5}" in again.stdout() and log.read_text() == "requeue 77\n"


# ----------------------------------------------------------------------------- the stop flag itself


def fake_all_reduce(value: float, then_signal: int | None = None):
    """An all-reduce over a world of one where the peers' flag is value, and a signal lands just after it."""

    def all_reduce(tensor, op=None):
        tensor.fill_(max(tensor.item(), value))
        if then_signal:
            os.kill(os.getpid(), then_signal)

    return all_reduce


def ddp_stop() -> runtime.GracefulStop:
    return runtime.GracefulStop(runtime.Runtime(0, 0, 2, "cpu", torch.float32, True))


def test_the_ranks_act_on_the_agreed_flag_not_on_a_signal_after_it(monkeypatch):
    """A SIGTERM landing just after the all-reduce (the peer saw no stop) must not stop this rank alone."""
    stop = ddp_stop()
    try:
        monkeypatch.setattr(runtime.dist, "all_reduce", fake_all_reduce(0, signal.SIGTERM))
        assert stop.agreed() is False and stop.requested == "SIGTERM"  # the peers train on: so does this rank
        monkeypatch.setattr(runtime.dist, "all_reduce", fake_all_reduce(0))
        assert stop.agreed() is True and stop.stopped == "SIGTERM"  # ...and all stop at the next agreement
    finally:
        stop.restore()


def test_a_stop_learned_from_a_peer_leaves_the_own_first_sigterm_a_first(monkeypatch):
    stop = ddp_stop()
    try:
        monkeypatch.setattr(runtime.dist, "all_reduce", fake_all_reduce(signal.SIGTERM))
        assert stop.agreed() is True and stop.stopped == "SIGTERM" and stop.requested is None
        os.kill(os.getpid(), signal.SIGTERM)  # this rank's own copy (from Slurm, or from torchrun) comes later
        os.kill(os.getpid(), signal.SIGTERM)  # ...and torchrun's forwarded one: SIGTERM never insists
        assert stop.requested == "SIGTERM"
    finally:
        stop.restore()


def test_a_second_ctrl_c_waits_for_the_checkpoint_write():
    stop = runtime.GracefulStop(runtime.Runtime(0, 0, 1, "cpu", torch.float32, False))
    written = []
    try:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.agreed() and stop.stopped == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            with stop.shielded():
                os.kill(os.getpid(), signal.SIGINT)  # the user insists, in the middle of the write
                time.sleep(0.1)
                written.append(True)  # the write goes on to its end
        assert written == [True]
        with pytest.raises(KeyboardInterrupt):  # outside a write, at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
    finally:
        stop.restore()


def test_a_peer_loss_is_told_from_a_fault_of_this_rank():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [::1]:1")
    assert runtime.is_peer_loss(gloo) and runtime.is_peer_loss(torch.distributed.DistBackendError("NCCL"))
    assert not runtime.is_peer_loss(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))
    assert runtime.first_to_report("error", env={}) == (True, "error")  # one process: always its own report
