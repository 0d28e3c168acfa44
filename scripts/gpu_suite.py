"""Every GPU figure in one command, side by side with nanoGPT's own code, in under 9 minutes on one H100.

    python -m scripts.bench --suite=gpu --nanogpt=PATH/TO/nanoGPT [--logs=DIR]

Each measurement runs in a process of its own (its own CUDA context and compile), one after the other:
  1. training throughput of configs/gpt2.py on synthetic tokens, at the config's micro-batch (bench.py),
     with the whole model compiled as one graph (the config's compile_scope) and with the blocks apart;
     ours and nanoGPT's bench.py at nanoGPT's shape (12 x 1024, bias=False), in the same call
  2. configs/shakespeare_char.py: wall seconds from process start to val loss <= 1.47, and nanoGPT's
     config/train_shakespeare_char.py timed the same way (each stopped once it crosses, or at its limit);
     ours once more uncompiled
  3. sampling GPT-2 124M and shakespeare_char's model: one sequence and a batch, with and without the cache
Every process's output is kept under --logs (default: $OUT when set, else gpu-suite/), and one table is
printed last (and kept in table.txt, written after each section too). nanoGPT is never copied into this
repository: give the path of a copy (its data/ folder gets TinyShakespeare from
data/shakespeare_char/input.txt, so nothing is downloaded).
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from gpt_residual import config

ROOT = Path(__file__).resolve().parents[1]  # the repo root
VAL_LOSS = re.compile(r"step (\d+): train loss [0-9.]+, val loss ([0-9]+\.[0-9]+)")
TARGET_LOSS = 1.47


class SuiteError(config.ConfigError):
    """The suite cannot run here (no GPU, a missing file); printed as one line."""


def run_logged(cmd: list[str], log: Path, cwd: Path = ROOT, timeout: float = 420) -> str:
    """Run cmd to the end; its stdout and stderr go to log and the stdout is returned."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  failed (rc {proc.returncode}): {tail}; see {log}", file=sys.stderr)
    return proc.stdout


def table_row(stdout: str, name: str) -> float | None:
    """The first number of a row of bench.py's table (the first column)."""
    for line in stdout.splitlines():
        cells = re.split(r"\s{2,}", line.strip())  # the table's columns are at least two spaces apart
        if cells[0].startswith(name) and len(cells) > 1:
            try:
                return float(cells[1])
            except ValueError:
                return None
    return None


def nanogpt_bench(stdout: str, tokens_per_iter: int) -> dict:
    """nanoGPT's bench.py prints 'time per iteration: 28.1ms, MFU: 38.2%'."""
    m = re.search(r"time per iteration: ([0-9.]+)ms, MFU: ([0-9.]+)%", stdout)
    if not m:
        return {}
    ms = float(m.group(1))
    return {"tokens/s": tokens_per_iter * 1000 / ms, "ms/step": ms, "MFU (%)": float(m.group(2))}


COMPILE_START = "compiling the model"  # what both trainers print when torch.compile begins


def time_to_loss(cmd: list[str], log: Path, cwd: Path = ROOT, target: float = TARGET_LOSS, limit: float = 150):
    """Wall seconds from starting cmd until it prints a val loss <= target (None if it never does within
    limit seconds); the process is stopped (SIGTERM, then SIGKILL) once it crosses. Returns (seconds, best,
    seconds until the compile began: what start-up costs before it; None if it never said so)."""
    t0, hit, best, setup = time.perf_counter(), None, float("inf"), None
    with open(log, "w") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        timer = threading.Timer(limit, stop, [proc])  # a run that goes quiet is stopped at the limit too
        timer.start()
        try:
            for line in proc.stdout:
                elapsed = time.perf_counter() - t0
                out.write(f"{elapsed:8.1f}s {line}")
                if setup is None and COMPILE_START in line:
                    setup = elapsed
                m = VAL_LOSS.search(line)
                if m:
                    best = min(best, float(m.group(2)))
                    if best <= target:
                        hit = elapsed
                        break
                if elapsed > limit:
                    break
        finally:
            timer.cancel()
            stop(proc)
    return hit, (best if best < float("inf") else None), setup


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def prepare_nanogpt(nanogpt: Path):
    """nanoGPT's char data from our copy of TinyShakespeare (its prepare.py would download it)."""
    ours = ROOT / "data/shakespeare_char/input.txt"
    folder = nanogpt / "data/shakespeare_char"
    if not (folder / "train.bin").exists():
        if not ours.exists():
            raise SuiteError(f"{ours} is missing: put TinyShakespeare there (prepare.py downloads it)")
        shutil.copyfile(ours, folder / "input.txt")
        subprocess.run([sys.executable, "prepare.py"], cwd=folder, check=True, capture_output=True)


def measure(nanogpt: Path | None, logs: Path) -> list[tuple[str, object, object, str]]:
    """(what, ours, nanoGPT's, target) rows."""
    py, rows = sys.executable, []
    bench = [py, "-m", "scripts.bench", "configs/gpt2.py", "--synthetic=True", "--steps=20", "--warmup=5"]
    print("1/3 training throughput, GPT-2 124M ...", flush=True)
    ours = run_logged([*bench, "--batch_tokens=65536"], logs / "gpt2-config.log")  # the config's micro-batch
    rows.append(("GPT-2 124M tokens/s, configs/gpt2.py micro-batch", table_row(ours, "tokens/s"), None, ">= 600k"))
    rows.append(("  MFU (%)", table_row(ours, "MFU (%)"), None, ">= 52"))
    rows.append(("  peak memory (MiB)", table_row(ours, "peak memory"), None, ""))
    rows.append(("  compile s", table_row(ours, "compile s"), None, ""))
    blocks = run_logged([*bench, "--batch_tokens=65536", "--compile_scope=blocks"], logs / "gpt2-compile-blocks.log")
    rows.append(("  ... compile_scope=blocks: tokens/s", table_row(blocks, "tokens/s"), None, ""))
    rows.append(("  ... compile_scope=blocks: compile s", table_row(blocks, "compile s"), None, ""))
    shape = ["--batch_size=12", "--batch_tokens=0", "--gradient_accumulation_steps=1"]
    ours12 = run_logged([*bench, *shape], logs / "gpt2-nanogpt-shape.log")
    theirs12 = {}
    if nanogpt:
        out = run_logged([py, "bench.py", "--real_data=False", "--batch_size=12"], logs / "nanogpt-bench.log", nanogpt)
        theirs12 = nanogpt_bench(out, 12 * 1024)
    for name in ("tokens/s", "MFU (%)"):
        what = f"GPT-2 124M {name}, 12 x 1024 (nanoGPT's bench)"
        rows.append((what, table_row(ours12, name), theirs12.get(name), ""))
    save_partial(rows, logs)
    print("2/3 time to val loss 1.47, shakespeare_char ...", flush=True)
    out_dir = logs / "out-shakespeare-char"
    cmd = [py, "train.py", "configs/shakespeare_char.py", f"--out_dir={out_dir}", "--overwrite=True"]
    ours = time_to_loss(cmd, logs / "shakespeare-char.log")
    theirs = (None, None, None)
    if nanogpt:
        prepare_nanogpt(nanogpt)
        theirs = time_to_loss([py, "train.py", "config/train_shakespeare_char.py"], logs / "nanogpt-sc.log", nanogpt)
    rows.append(("shakespeare_char: s from start to val <= 1.47", ours[0], theirs[0], "<= 25"))
    rows.append(("  best val loss seen", ours[1], theirs[1], ""))
    rows.append(("  s from start until the compile began", ours[2], theirs[2], ""))
    # uncompiled: no compile to wait for, slower steps (given up at 90 s: past that it is no lever)
    eager = time_to_loss([*cmd, "--compile=False"], logs / "shakespeare-char-eager.log", limit=90)
    rows.append(("  ... compile=False: s from start to val <= 1.47", eager[0], None, ""))
    save_partial(rows, logs)
    print("3/3 sampling ...", flush=True)
    rows += sampling_rows(logs)
    return rows


def save_partial(rows, logs: Path):
    """The rows so far into logs/table.txt: a suite stopped at a time limit still leaves its figures."""
    (logs / "table.txt").write_text(format_table(rows, "GPU suite, partial: the sections measured so far") + "\n")


def sampling_rows(logs: Path) -> list[tuple[str, object, object, str]]:
    """bench.py --sample on both models: one sequence and a batch of 64, cached and not, the engine's setup."""
    rows = []
    for file, name in (("configs/gpt2.py", "GPT-2 124M"), ("configs/shakespeare_char.py", "shakespeare_char")):
        cmd = [sys.executable, "-m", "scripts.bench", file, "--sample", "--synthetic=True", "--repeats=2", "--batch=64"]
        out = run_logged(cmd, logs / f"sample-{Path(file).stem}.log")
        gpt2 = name == "GPT-2 124M"
        for row, target in (
            ("tokens/s with KV cache", ">= 1,500"),
            ("tokens/s without", ""),
            ("speed-up", ">= 10"),
            ("batch of 64: tokens/s with KV cache", ">= 30,000"),
            ("batch of 64: tokens/s without", ""),
            ("engine setup s, one sequence", ""),
            ("engine setup s, batch of 64", ""),
        ):
            rows.append((f"{name} sampling: {row}", table_row(out, row), None, target if gpt2 else ""))
    return rows


def format_table(rows, header: str) -> str:
    from scripts.bench import fmt  # the same number format as bench.py's tables

    body = [(what, fmt(a), fmt(b), fmt(a / b) if isinstance(a, float) and isinstance(b, float) and b else "-", t)
            for what, a, b, t in rows]  # fmt: skip
    head = ("", "ours", "nanoGPT", "ratio", "target")
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [head, *body]]  # fmt: skip
    return "\n".join([header, *lines])


def main(nanogpt: str, logs: str):
    import torch

    if not torch.cuda.is_available():
        raise SuiteError("the GPU suite needs a CUDA GPU and none is visible; run it on a GPU machine")
    folder = Path(nanogpt).resolve() if nanogpt else None
    if folder is not None and not (folder / "bench.py").is_file():
        raise SuiteError(f"--nanogpt={nanogpt} has no bench.py; give the folder of a copy of nanoGPT")
    out = Path(logs or os.environ.get("OUT") or "gpu-suite").resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = measure(folder, out)
    gpu = torch.cuda.get_device_name()
    header = f"GPU suite: {gpu}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s; logs in {out}"
    table = format_table(rows, header)
    (out / "table.txt").write_text(table + "\n")
    print(f"\n{table}")
