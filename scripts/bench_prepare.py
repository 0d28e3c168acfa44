"""Data preparation side by side with nanoGPT's prepare scripts: wall time and peak memory, and whether both wrote
the same token files. bench.py's --prepare runs this:

    python -m scripts.bench --prepare --nanogpt=PATH/TO/nanoGPT                  # a 50 MB text, 3 runs of each side
    python -m scripts.bench --prepare --nanogpt=PATH --input=big.txt --repeats=5 --json=prepare.json

Each side is a fresh process running its own script as a user would (ours: data/shakespeare_char/prepare.py and
data/shakespeare/prepare.py; nanoGPT's: the same two files of its repository, each run from a temporary copy of
its folder beside the input, so the copy given is never written to). The sides alternate, one process at a time,
one thread each (OMP/MKL/OpenBLAS/Rayon set to 1); the table gives the median of each. Peak memory is the
process's maximum resident set (wait4's ru_maxrss). nanoGPT's BPE script (data/shakespeare/prepare.py) is run when
the copy has it; the copy in ../shared holds only the char one, and the table then says so.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from gpt_residual import config

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"char": "shakespeare_char", "gpt2": "shakespeare"}  # data/<folder>/prepare.py, ours and nanoGPT's
ONE_THREAD = {k: "1" for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS")}


def one_thread_env() -> dict:
    """This process's environment with one thread for every math library and unbuffered output: each side of a
    comparison runs in it."""
    return {**os.environ, **ONE_THREAD, "PYTHONUNBUFFERED": "1"}


@dataclass
class PrepareBenchOptions:
    prepare: bool = True  # the flag that brings bench.py here
    nanogpt: str = ""  # a copy of nanoGPT's repository, whose data/*/prepare.py run beside ours
    input: str = ""  # the text to prepare (default: TinyShakespeare repeated to --megabytes)
    megabytes: float = 50.0  # the size of the default input
    repeats: int = 3  # runs of each side, alternating; the table gives the medians
    tokenizers: str = "char,gpt2"  # which preparations to compare: char, gpt2 or both
    json: str = ""  # also write the figures to this file as JSON

    def __post_init__(self):
        if not self.nanogpt:
            raise config.ConfigError("say where nanoGPT is: --nanogpt=PATH (a copy of its repository)")
        char = Path(self.nanogpt).expanduser() / "data" / SCRIPTS["char"] / "prepare.py"
        if not char.is_file():
            raise config.ConfigError(f"--nanogpt={self.nanogpt}: no {char}; give a copy of nanoGPT's repository")
        if self.repeats < 1 or self.megabytes <= 0:
            raise config.ConfigError(f"need --repeats >= 1 and --megabytes > 0, got {self.repeats}, {self.megabytes}")
        if self.input and not Path(self.input).is_file():
            raise config.ConfigError(f"--input {self.input} is not a file; give a text file")
        self.kinds = [k.strip() for k in self.tokenizers.split(",") if k.strip()]
        if not self.kinds or any(k not in SCRIPTS for k in self.kinds):
            raise config.ConfigError(f"--tokenizers takes char, gpt2 or both, got {self.tokenizers!r}")


def default_input(folder: Path, megabytes: float) -> Path:
    """TinyShakespeare (data/shakespeare_char/input.txt, else ../shared's copy) repeated to about that size."""
    sources = [ROOT / "data/shakespeare_char/input.txt", ROOT.parent / "shared/data/tinyshakespeare.txt"]
    source = next((p for p in sources if p.is_file()), None)
    if source is None:
        raise config.ConfigError("no TinyShakespeare here to repeat: run data/shakespeare_char/prepare.py or --input")
    text = source.read_text(encoding="utf-8")
    path = folder / "input.txt"
    path.write_text(text * max(1, round(megabytes * 1e6 / len(text.encode()))), encoding="utf-8")
    return path


# Started by a small launcher process, not by this one: a fork of a large process counts that process's resident
# memory in the child's ru_maxrss (Linux keeps the high-water mark across exec).
LAUNCHER = """import os, sys, time
t = time.perf_counter()
pid = os.posix_spawn(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
open(sys.argv[1], "w").write(f"{time.perf_counter() - t} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one process, which must succeed."""
    env = one_thread_env()
    with tempfile.NamedTemporaryFile("r", suffix=".txt") as result:
        proc = subprocess.run([sys.executable, "-S", "-c", LAUNCHER, result.name, *cmd], cwd=cwd, env=env,
                              capture_output=True, text=True)  # fmt: skip
        wall, kib, code = result.read().split() or ("0", "0", str(proc.returncode or 1))
    if int(code) or proc.returncode:
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-3:]
        raise config.ConfigError(f"{' '.join(map(str, cmd))} failed (exit {code}): {' | '.join(tail)}")
    return float(wall), int(kib) / 1024  # ru_maxrss: KiB on Linux


def sides(kind: str, opts: PrepareBenchOptions, text: Path, work: Path) -> dict:
    """{side: (command, cwd, folder its token files land in)} for one tokenizer; nanoGPT's only if it has the file."""
    ours = work / f"ours-{kind}"
    cmds = {"this project": ([sys.executable, str(ROOT / "data" / SCRIPTS[kind] / "prepare.py"), "--input", str(text),
                              "--out_dir", str(ours)], ROOT, ours)}  # fmt: skip
    script = Path(opts.nanogpt).expanduser() / "data" / SCRIPTS[kind] / "prepare.py"
    if script.is_file():
        theirs = work / f"nanogpt-{kind}"
        theirs.mkdir()
        shutil.copy(script, theirs / "prepare.py")
        (theirs / "input.txt").symlink_to(text.resolve())
        cmds["nanoGPT"] = ([sys.executable, str(theirs / "prepare.py")], theirs, theirs)
    return cmds


def same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in ("train.bin", "val.bin"))


def compare(kind: str, opts: PrepareBenchOptions, text: Path, work: Path) -> tuple[list, dict]:
    """One tokenizer's rows of the table and its runs: both sides, alternating (drifting load hits both)."""
    cmds = sides(kind, opts, text, work)
    runs = {side: [] for side in cmds}
    for _ in range(opts.repeats):
        for side, (cmd, cwd, _) in cmds.items():
            runs[side].append(run(cmd, cwd))
    median = lambda i: [statistics.median(r[i] for r in runs[s]) if s in runs else None for s in LABELS]
    rows = [(f"{kind}: wall s", median(0)), (f"{kind}: peak MiB", median(1))]
    if "nanoGPT" in cmds:
        same = same_files(cmds["this project"][2], cmds["nanoGPT"][2])
        rows.append((f"{kind}: same train.bin, val.bin", ["yes" if same else "NO"] * 2))
    else:
        print(f"{kind}: {opts.nanogpt} has no data/{SCRIPTS[kind]}/prepare.py: nanoGPT's side not run")
    return rows, {side: [{"wall_s": w, "peak_mib": m} for w, m in r] for side, r in runs.items()}


LABELS = ["this project", "nanoGPT"]


def main(argv: list[str], print_table):
    """bench.py --prepare ...: parse the flags, measure, print the table with bench.py's print_table (and write
    --json)."""
    opts, rest = config.split_flags(PrepareBenchOptions, argv)
    if rest:
        raise config.ConfigError(f"--prepare takes only its own flags (see scripts/bench_prepare.py); got {rest}")
    rows, figures = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        text = Path(opts.input) if opts.input else default_input(Path(tmp), opts.megabytes)
        size = text.stat().st_size
        for kind in opts.kinds:
            kind_rows, figures[kind] = compare(kind, opts, text, Path(tmp))
            rows += kind_rows
    title = (f"data preparation of a {size / 1e6:.1f} MB text, median of {opts.repeats}, one thread each "
             "(ratio: nanoGPT / this project; above 1: this project is ahead)")  # fmt: skip
    print_table(title, LABELS, rows)
    if opts.json:
        record = {"mode": "prepare", "title": title, "input_bytes": size, "repeats": opts.repeats, "runs": figures}
        Path(opts.json).write_text(json.dumps(record, indent=1) + "\n")
