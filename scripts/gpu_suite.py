"""Every GPU figure in one command, side by side with nanoGPT's own code, in under 9 minutes on one H100.

    python -m scripts.gpu_suite --nanogpt=PATH/TO/nanoGPT [--logs=DIR]

Each measurement runs in a process of its own (its own CUDA context and compile), one after the other;
ours are python -m scripts.bench runs, read back from the JSON each writes (--json), nanoGPT's from its
bench.py's and train.py's printed lines:
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

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from gpt_residual import config
from scripts.bench import fmt  # the same number format as bench's tables

ROOT = Path(__file__).resolve().parents[1]  # the repo root
VAL_LOSS = re.compile(r"step (\d+): train loss [0-9.]+, val loss ([0-9]+\.[0-9]+)")
TARGET_LOSS = 1.47


class SuiteError(config.ConfigError):
    """The suite cannot run here (no GPU, a missing file); printed as one line."""


@dataclass
class SuiteOptions:
    nanogpt: str = ""  # a copy of nanoGPT to measure side by side (e.g. ../shared/reference/nanoGPT); empty: ours only
    logs: str = ""  # where each measurement's output goes (default: $OUT when set, else gpu-suite/)


def run_logged(cmd: list[str], log: Path, cwd: Path = ROOT, timeout: float = 420) -> str:
    """Run cmd to the end; its stdout and stderr go to log and the stdout is returned."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"  failed (rc {proc.returncode}): {tail}; see {log}", file=sys.stderr)
    return proc.stdout


def bench(args: list[str], name: str, logs: Path) -> dict:
    """python -m scripts.bench *args, its output in logs/name.log and its figures in logs/name.json: the
    figures of its first config ({} if it failed; run_logged has said so)."""
    path = logs / f"{name}.json"
    path.unlink(missing_ok=True)  # never a stale file from an earlier suite
    run_logged([sys.executable, "-m", "scripts.bench", *args, f"--json={path}"], logs / f"{name}.log")
    return read_figures(path)


def read_figures(path: Path) -> dict:
    """The figures of the first config in a file that bench --json wrote; {} if there is none."""
    try:
        return json.loads(path.read_text())["configs"][0]["figures"]
    except (OSError, ValueError, KeyError, IndexError):
        return {}


def figure(figures: dict, key: str):
    """figures[key]; None when bench failed (no figures). A key bench does not write is the suite's bug."""
    if figures and key not in figures:
        raise SuiteError(f"bench's JSON has no {key!r} (it has {', '.join(figures)}): update scripts/gpu_suite.py")
    return figures.get(key)


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


Row = tuple[str, object, object, str]  # (what, ours, nanoGPT's, target)
GPT2_BENCH = ["configs/gpt2.py", "--synthetic=True", "--steps=20", "--warmup=5"]
SAMPLE_BATCH = 64


def measure(nanogpt: Path | None, logs: Path) -> list[Row]:
    """The three sections, table.txt rewritten after each."""
    print("1/3 training throughput, GPT-2 124M ...", flush=True)
    rows = throughput_section(nanogpt, logs)
    save_partial(rows, logs)
    print("2/3 time to val loss 1.47, shakespeare_char ...", flush=True)
    rows += time_to_loss_section(nanogpt, logs)
    save_partial(rows, logs)
    print("3/3 sampling ...", flush=True)
    for file, name in (("configs/gpt2.py", "GPT-2 124M"), ("configs/shakespeare_char.py", "shakespeare_char")):
        args = [file, "--sample", "--synthetic=True", "--repeats=2", f"--batch={SAMPLE_BATCH}"]
        rows += sampling_rows(name, bench(args, f"sample-{Path(file).stem}", logs), targets=name == "GPT-2 124M")
    return rows


def throughput_section(nanogpt: Path | None, logs: Path) -> list[Row]:
    """configs/gpt2.py at its micro-batch, whole and with the blocks compiled apart; ours and nanoGPT's bench.py
    at nanoGPT's shape."""
    ours = bench([*GPT2_BENCH, "--batch_tokens=65536"], "gpt2-config", logs)  # the config's micro-batch
    blocks = bench([*GPT2_BENCH, "--batch_tokens=65536", "--compile_scope=blocks"], "gpt2-compile-blocks", logs)
    shape = ["--batch_size=12", "--batch_tokens=0", "--gradient_accumulation_steps=1"]
    ours12 = bench([*GPT2_BENCH, *shape], "gpt2-nanogpt-shape", logs)
    theirs12 = {}
    if nanogpt:
        cmd = [sys.executable, "bench.py", "--real_data=False", "--batch_size=12"]
        theirs12 = nanogpt_bench(run_logged(cmd, logs / "nanogpt-bench.log", nanogpt), 12 * 1024)
    return throughput_rows(ours, blocks, ours12, theirs12)


def throughput_rows(ours: dict, blocks: dict, ours12: dict, theirs12: dict) -> list[Row]:
    """Section 1's rows from bench's figures (and nanoGPT's)."""
    rows = [
        ("GPT-2 124M tokens/s, configs/gpt2.py micro-batch", figure(ours, "tokens/s"), None, ">= 600k"),
        ("  MFU (%)", figure(ours, "MFU (%)"), None, ">= 52"),
        ("  peak memory (MiB)", figure(ours, "peak memory (MiB)"), None, ""),
        ("  compile s", figure(ours, "compile s"), None, ""),
        ("  ... compile_scope=blocks: tokens/s", figure(blocks, "tokens/s"), None, ""),
        ("  ... compile_scope=blocks: compile s", figure(blocks, "compile s"), None, ""),
    ]
    for name in ("tokens/s", "MFU (%)"):
        rows.append((f"GPT-2 124M {name}, 12 x 1024 (nanoGPT's bench)", figure(ours12, name), theirs12.get(name), ""))
    return rows


def time_to_loss_section(nanogpt: Path | None, logs: Path) -> list[Row]:
    """shakespeare_char from process start to val loss 1.47: ours, nanoGPT's, ours uncompiled."""
    out_dir = logs / "out-shakespeare-char"
    cmd = [sys.executable, "train.py", "configs/shakespeare_char.py", f"--out_dir={out_dir}", "--overwrite=True"]
    ours = time_to_loss(cmd, logs / "shakespeare-char.log")
    theirs = (None, None, None)
    if nanogpt:
        prepare_nanogpt(nanogpt)
        nano_cmd = [sys.executable, "train.py", "config/train_shakespeare_char.py"]
        theirs = time_to_loss(nano_cmd, logs / "nanogpt-sc.log", nanogpt)
    # uncompiled: no compile to wait for, slower steps (given up at 90 s: past that it is no lever)
    eager = time_to_loss([*cmd, "--compile=False"], logs / "shakespeare-char-eager.log", limit=90)
    return [
        ("shakespeare_char: s from start to val <= 1.47", ours[0], theirs[0], "<= 25"),
        ("  best val loss seen", ours[1], theirs[1], ""),
        ("  s from start until the compile began", ours[2], theirs[2], ""),
        ("  ... compile=False: s from start to val <= 1.47", eager[0], None, ""),
    ]


def save_partial(rows, logs: Path):
    """The rows so far into logs/table.txt: a suite stopped at a time limit still leaves its figures."""
    (logs / "table.txt").write_text(format_table(rows, "GPU suite, partial: the sections measured so far") + "\n")


def sampling_rows(name: str, figures: dict, targets: bool) -> list[Row]:
    """Section 3's rows of one model from bench --sample's figures: one sequence and a batch, cached and not,
    the engine's setup (targets: GPT-2's)."""
    b = f"batch of {SAMPLE_BATCH}"
    rows = []
    for what, key, target in (
        ("tokens/s with KV cache", "tokens/s with KV cache", ">= 1,500"),
        ("tokens/s without", "tokens/s without", ""),
        ("speed-up", "speed-up", ">= 10"),
        (f"{b}: tokens/s with KV cache", f"{b}: tokens/s with KV cache", ">= 30,000"),
        (f"{b}: tokens/s without", f"{b}: tokens/s without", ""),
        ("engine setup s, one sequence", "engine setup s, one sequence (once)", ""),
        (f"engine setup s, {b}", f"engine setup s, {b} (once)", ""),
    ):
        rows.append((f"{name} sampling: {what}", figure(figures, key), None, target if targets else ""))
    return rows


def format_table(rows, header: str) -> str:
    body = [(what, fmt(a), fmt(b), fmt(a / b) if isinstance(a, float) and isinstance(b, float) and b else "-", t)
            for what, a, b, t in rows]  # fmt: skip
    head = ("", "ours", "nanoGPT", "ratio", "target")
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(5)]
    lines = ["  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [head, *body]]  # fmt: skip
    return "\n".join([header, *lines])


def suite(opts: SuiteOptions):
    import torch

    if not torch.cuda.is_available():
        raise SuiteError("the GPU suite needs a CUDA GPU and none is visible; run it on a GPU machine")
    folder = Path(opts.nanogpt).resolve() if opts.nanogpt else None
    if folder is not None and not (folder / "bench.py").is_file():
        raise SuiteError(f"--nanogpt={opts.nanogpt} has no bench.py; give the folder of a copy of nanoGPT")
    out = Path(opts.logs or os.environ.get("OUT") or "gpu-suite").resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    rows = measure(folder, out)
    gpu = torch.cuda.get_device_name()
    header = f"GPU suite: {gpu}, torch {torch.__version__}, {time.perf_counter() - t0:.0f} s; logs in {out}"
    table = format_table(rows, header)
    (out / "table.txt").write_text(table + "\n")
    print(f"\n{table}")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(config.help_text(SuiteOptions, __doc__.strip()))
        return 0
    try:
        suite(config.parse_args(SuiteOptions, argv, allow_file=False))
    except config.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
