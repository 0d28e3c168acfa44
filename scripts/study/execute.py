"""Running the study's jobs: each a `python train.py` subprocess (and, for the runs a question looks inside,
a `python -m scripts.inspect` of the trained run), several at once, one progress line each.

A run's folder keeps its records (metrics.jsonl, config.json, train.log, study.json, inspect.json), not its
weights: the checkpoints are deleted once the run is measured (a 24-layer GPT-2-wide run holds gigabytes,
and nothing in the report reads them). Each CPU run gets OMP_NUM_THREADS=1 unless it is set: runs
at once on one core each, and the same thread count on every rerun, so that a rerun reproduces its numbers.
"""

import importlib.util
import json
import os
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from scripts.study.job import Job

ROOT = Path(__file__).resolve().parents[2]  # the repo root


class StudyError(ValueError):
    """A run that failed on its configuration, data or device; printed as one line, exit 2."""


def slots(device: str, n_jobs: int) -> list[str | None]:
    """Where runs go at once: one per GPU when there are several, else n_jobs on the CPU (or one GPU)."""
    import torch

    if device not in ("auto", "cuda") or torch.cuda.device_count() < 2:
        return [None] * n_jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def check_instruments(jobs: list[Job]):
    """Before anything runs: the report's statistics need scipy; the runs to be inspected need python -m
    scripts.inspect (the instruments)."""
    if importlib.util.find_spec("scipy") is None:
        raise StudyError(
            "the study's statistics need scipy (Welch's t-test): pip install scipy, or pip install -e .[study]"
        )
    needs = [j.name for j in jobs if j.inspect]
    if needs and importlib.util.find_spec("scripts.inspect") is None:
        raise StudyError(
            f"{needs[0]} and {len(needs) - 1} more runs are measured by python -m scripts.inspect, "
            "which this checkout lacks; leave out --questions=10 or update the checkout"
        )


def last_line(proc: subprocess.CompletedProcess) -> str:
    return (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1] if proc.returncode else ""


def inspect(job: Job, out: Path, env: dict) -> dict:
    """python -m scripts.inspect on the trained run: its outcome, for study.json (the numbers: inspect.json)."""
    cmd = [sys.executable, "-m", "scripts.inspect", f"--out_dir={out}", f"--json={out / 'inspect.json'}"]
    cmd += [f"--png={out / 'inspect.png'}", f"--batches={job.inspect}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    (out / "inspect.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
    return dict(inspect_rc=proc.returncode, inspect_error=last_line(proc))


def run_job(job: Job, runs: Path, gpu: str | None, reuse: bool):
    """One `python train.py` subprocess (unless reused), its inspection, then its outcome and records. A run
    whose inspection failed keeps its checkpoint, so that --reuse can inspect it again."""
    out, done = runs / job.name, runs / job.name / "study.json"
    result = json.loads(done.read_text()) if reuse and done.exists() else {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})}
    env.setdefault("OMP_NUM_THREADS", "1")
    t0, ran = time.perf_counter(), False
    if result.get("resolved") != job.resolved:
        ran = True
        shutil.rmtree(out, ignore_errors=True)  # start clean: nothing of an earlier run
        out.mkdir(parents=True)
        cmd = [sys.executable, str(ROOT / "train.py"), *job.args, f"--out_dir={out}"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        (out / "train.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        result = dict(resolved=job.resolved, rc=proc.returncode, error=last_line(proc), wall=0.0)
    if job.inspect and result["rc"] == 0 and result.get("inspect_rc") != 0 and (out / "ckpt.pt").exists():
        ran, result = True, result | inspect(job, out, env)
    if not job.inspect or result.get("inspect_rc") == 0:
        for ckpt in out.glob("*.pt"):
            ckpt.unlink()
    if ran:  # a reused run keeps its time and load
        result |= dict(wall=result["wall"] + time.perf_counter() - t0, load=os.getloadavg()[0])
        done.write_text(json.dumps(result))
    job.read(out)


def run_all(jobs: list[Job], runs: Path, reuse: bool, where: list[str | None]):
    """Every job, len(where) at a time, one progress line each; a configuration error stops the rest."""
    done, free = [0], queue.Queue()
    for slot in where:
        free.put(slot)

    def one(job: Job):
        slot = free.get()
        try:
            run_job(job, runs, slot, reuse)
        finally:
            free.put(slot)
        done[0] += 1
        print(f"[{done[0]}/{len(jobs)}] {job.describe()} ({job.wall:.0f} s)", flush=True)
        if job.rc == 2:  # a config, data or device error: every other run would fail the same way
            raise StudyError(f"{job.name}: {job.error.removeprefix('error: ')} (see {runs / job.name})")

    if len(where) == 1:
        for job in jobs:
            one(job)
        return
    with ThreadPoolExecutor(len(where)) as ex:
        futures = [ex.submit(one, job) for job in jobs]
        try:
            for future in futures:
                future.result()
        finally:  # after an error, start no more runs
            ex.shutdown(cancel_futures=True)
