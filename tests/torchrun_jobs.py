"""Processes started by the fault tests (test_faults.py, test_run_lock.py): torchrun and its workers, found in /proc,
watched until they end, their output kept in files; and the checks those tests share."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT

from gpt_residual import checkpoint

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


def launcher():
    """For a test's `jobs` fixture: start(kind, ...) launches a Job (kind "torchrun", or "cmd": any command); whatever
    is still running when the test ends is killed."""
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
