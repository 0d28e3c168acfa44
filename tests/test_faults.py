"""Faults as a cluster user meets them, with real processes: two ranks under torchrun (gloo on the CPU) signalled at
random instants, a rank that fails alone, a worker killed with -9, torchrun restarting a job, two runs into one
out_dir, and the Slurm job script (scripts/slurm_train.sh) with stand-ins for srun and scontrol.

What must hold:
  (a) SIGTERM to the launcher, to every process (as Slurm sends it) or to one worker, at any instant, ends every
      process within seconds, with one checkpoint at a step every rank agreed on, no temporary file, the resume
      command, and a checkpoint the next run resumes from;
  (b) an error on any rank ends every rank at once, the error printed once in one line; a rank that fails alone
      (its disk full) does not leave the others waiting; the survivors of a killed worker say in one line what is
      saved and how to resume, without gloo's tracebacks;
  (c) init_from=auto resumes the run in out_dir or starts one, so torchrun --max-restarts and a requeued Slurm job
      go on by themselves, bit-identical to a run never interrupted;
  (d) one run at a time writes into an out_dir; a killed run's lock is gone with it.
"""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, run

import train
from gpt_residual import checkpoint, config, run_dir, runtime

TINY = [
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--device=cpu",
    "--dtype=float32", "--compile=False", "--bias=False", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=5",
    "--eval_iters=2", "--dropout=0.1",
]  # fmt: skip
DEADLINE = 30  # seconds for every process to end after a signal or a failure (torchrun's own grace period is 30)
needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds torchrun's workers in /proc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(pid: int) -> list[int]:
    """The live child processes of pid (from /proc: torchrun starts its workers in their own sessions)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return sorted(found)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Job:
    """A launched command (torchrun or bash), its output in files, and the workers it started."""

    def __init__(self, cmd: list[str], folder: Path, name: str, env: dict | None = None):
        self.out, self.err = folder / f"{name}.out", folder / f"{name}.err"
        full = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        full.update({"OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TORCH_CPP_LOG_LEVEL": "ERROR", **(env or {})})
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err, env=full)
        self.seen: set[int] = set()

    @classmethod
    def torchrun(cls, args: list[str], folder: Path, name: str, *launcher: str) -> "Job":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *launcher]
        return cls([*cmd, "train.py", *args], folder, name)

    def workers(self, n: int = 2, timeout: float = 120) -> list[int]:
        """The n processes torchrun started (waits for them)."""
        deadline = time.time() + timeout
        while time.time() < deadline and self.proc.poll() is None:
            found = children(self.proc.pid)
            self.seen.update(found)
            if len(found) >= n:
                return found
            time.sleep(0.05)
        raise AssertionError(f"torchrun started no {n} workers\n{self.output()}")

    def stdout(self) -> str:
        return self.out.read_text()

    def output(self) -> str:
        return self.out.read_text() + self.err.read_text()

    def wait_for(self, text: str, timeout: float = 180):
        deadline = time.time() + timeout
        while text not in self.stdout():
            assert time.time() < deadline and self.proc.poll() is None, f"never printed {text!r}\n{self.output()}"
            time.sleep(0.02)

    def ended_within(self, seconds: float) -> bool:
        """Whether the launcher and every worker it started ended within seconds; if not, they are killed."""
        deadline = time.time() + seconds
        while time.time() < deadline:
            if self.proc.poll() is not None and not any(alive(p) for p in self.seen):
                return True
            time.sleep(0.05)
        self.kill()
        return False

    def kill(self):
        self.seen.update(children(self.proc.pid))  # a restart's workers too
        for pid in [self.proc.pid, *self.seen]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.proc.wait()


@pytest.fixture
def jobs():
    """Job launcher for a test; whatever is left running at its end is killed."""
    started: list[Job] = []

    def start(kind: str, *args, **kwargs) -> Job:
        job = getattr(Job, kind)(*args, **kwargs) if kind != "cmd" else Job(*args, **kwargs)
        started.append(job)
        return job

    yield start
    for job in started:
        job.kill()


def no_worker_tracebacks(text: str):
    """Nothing but one-line messages from the workers: no traceback of our code, no gloo error, no second Ctrl-C."""
    assert str(ROOT / "train.py") not in text and str(ROOT / "gpt_residual") not in text, text[-3000:]
    for needle in ("gloo", "[rank0]", "[rank1]", "KeyboardInterrupt", "\ninterrupted"):
        assert needle not in text, (needle, text[-3000:])


def saved_step(out: Path) -> int | None:
    return checkpoint.load(out / "ckpt.pt")["step"] if (out / "ckpt.pt").exists() else None


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


# ----------------------------------------------------------------------------- (c) init_from=auto


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


# ----------------------------------------------------------------------------- (d) one run per out_dir


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

