"""The training step side by side with nanoGPT's own train.py: the same model shape, batch and schedule, each side a
fresh process of its real training loop, one thread each, alternating. bench.py's --nanogpt runs this:

    python -m scripts.bench configs/nanogpt_cpu.py --nanogpt=PATH/TO/nanoGPT --steps=200 --repeats=3 \\
        --compile=True --compile_scope=model

nanoGPT runs its README's CPU command (config/train_shakespeare_char.py --device=cpu --compile=False ...) with the
config's shape, batch, learning rates and schedule, from a temporary copy of its code beside its char data (prepared
by its own prepare.py from our TinyShakespeare; the copy given is never written to). Ours runs train.py with the
config and any train.py flags given (--compile=True ...). Each side logs every step. An iteration's time is the
span from one step's start to the next's (ours: train.train_step's entry; nanoGPT: its loop's time.time()), on two
clocks: wall, and the CPU time of the process's one thread, which the other jobs of a shared machine disturb least.
The table gives the medians over steps after --warmup, then over the runs. The two sides draw their batches
differently (nanoGPT: torch.randint per batch; ours: a seeded sampler), so their per-step losses differ by batch
noise: the check is that the mean training loss of the last quarter of the steps agrees within LOSS_TOLERANCE.
"""

import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import fields
from pathlib import Path

from gpt_residual import config, dataset, runlog, runtime
from model import GPTConfig
from scripts.bench_prepare import one_thread_env

ROOT = Path(__file__).resolve().parents[1]
LOSS_TOLERANCE = 0.05  # nats: |mean loss of the last quarter, ours - nanoGPT's|; batch noise there is ~0.01
SHAPE = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "activation_checkpointing")
ITER = re.compile(r"^iter (\d+): loss ([0-9.]+)", re.MULTILINE)

# Our side: train.py as python train.py runs it; each train_step's entry is marked on both clocks.
OURS = """import json, sys, time
import train
from gpt_residual import config
marks, step = [], train.train_step
def marked(*args, **kwargs):
    marks.append((time.perf_counter(), time.thread_time()))
    return step(*args, **kwargs)
train.train_step = marked
result = train.train(config.parse_args(config.TrainConfig, sys.argv[1:]))
print("MARKS " + json.dumps({"marks": marks, "compile_s": result.get("compile_time")}))
"""

# nanoGPT's side: its train.py unchanged; each time.time() its loop calls is marked on both clocks too.
NANOGPT = """import json, runpy, sys, time
marks, real = [], time.time
def clock():
    if sys._getframe(1).f_code.co_filename.endswith("train.py"):
        marks.append((time.perf_counter(), time.thread_time()))
    return real()
time.time = clock
sys.argv, sys.path[0] = ["train.py", *sys.argv[1:]], "."
runpy.run_path("train.py", run_name="__main__")
print("MARKS " + json.dumps({"marks": marks}))
"""


class LossesDiffer(RuntimeError):
    """The two sides trained to different losses: they did not do the same work (exit 1)."""


def check_comparable(cfg: config.TrainConfig):
    """nanoGPT trains GPT-2's architecture with AdamW on one process: refuse a config it cannot run."""
    defaults = GPTConfig()
    for f in fields(GPTConfig):
        if f.name not in SHAPE and getattr(cfg, f.name) != getattr(defaults, f.name):
            raise config.ConfigError(f"--nanogpt compares GPT-2's architecture: {f.name} must be at its default here")
    checks = {
        "dataset": (cfg.dataset, "shakespeare_char"),
        "optimizer": (cfg.optimizer, "adamw"),
        "lr_schedule": (cfg.lr_schedule, "cosine"),
        "gradient_accumulation_steps": (cfg.gradient_accumulation_steps, 1),
        "device": (runtime.resolve_device(cfg.device), "cpu"),
        "dtype": (cfg.dtype if cfg.dtype != "auto" else "float32", "float32"),
    }
    for key, (value, needed) in checks.items():
        if value != needed:
            raise config.ConfigError(f"--nanogpt runs nanoGPT's CPU recipe: {key} must be {needed!r}, not {value!r}")


def nanogpt_args(cfg: config.TrainConfig, steps: int, out_dir: Path) -> list[str]:
    """nanoGPT's README CPU command with the config's shape, batch, schedule and optimizer settings."""
    keys = dict(device="cpu", compile=False, eval_iters=cfg.eval_iters, log_interval=1, block_size=cfg.block_size,
                batch_size=cfg.batch_size, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                dropout=cfg.dropout, bias=cfg.bias, learning_rate=cfg.learning_rate, min_lr=cfg.min_lr,
                warmup_iters=cfg.warmup_iters, lr_decay_iters=cfg.lr_decay_iters or cfg.max_iters,
                weight_decay=cfg.weight_decay, beta1=cfg.beta1, beta2=cfg.beta2, grad_clip=cfg.grad_clip,
                max_iters=steps, eval_interval=steps + 1, out_dir=str(out_dir), always_save_checkpoint=False)
    return ["config/train_shakespeare_char.py", *(f"--{k}={v}" for k, v in keys.items())]


def our_args(argv: list[str], cfg: config.TrainConfig, steps: int, out_dir: Path) -> list[str]:
    """train.py's arguments: the config and flags given, then the comparison's: as many steps, logged each."""
    decay = cfg.lr_decay_iters or cfg.max_iters  # the config's schedule, not one squeezed into the short run
    return [*argv, f"--max_iters={steps}", f"--lr_decay_iters={decay}", "--log_interval=1", f"--eval_interval={steps}",
            "--checkpoint_interval=0", f"--out_dir={out_dir}", "--overwrite=True"]


def copy_nanogpt(nanogpt: Path, cfg: config.TrainConfig, into: Path) -> Path:
    """nanoGPT's code in a folder of our own, its char data prepared there by its own script from our text."""
    for name in ("train.py", "model.py", "configurator.py"):
        if not (nanogpt / name).is_file():
            raise config.ConfigError(f"--nanogpt={nanogpt} has no {name}; give the folder of a copy of nanoGPT")
    code = into / "nanogpt"
    code.mkdir()
    for name in ("train.py", "model.py", "configurator.py"):
        shutil.copy(nanogpt / name, code / name)
    shutil.copytree(nanogpt / "config", code / "config")
    data = code / "data/shakespeare_char"
    data.mkdir(parents=True)
    shutil.copy(nanogpt / "data/shakespeare_char/prepare.py", data / "prepare.py")
    dataset.ensure_prepared(cfg.dataset, cfg.data_dir)
    shutil.copy(dataset.dataset_dir(cfg.dataset, cfg.data_dir) / "input.txt", data / "input.txt")
    subprocess.run([sys.executable, "prepare.py"], cwd=data, check=True, capture_output=True, env=one_thread_env())
    return code


def run_side(cmd: list[str], cwd: Path, log: Path) -> tuple[dict, str]:
    """Run one side; (its MARKS record, its stdout). A failure stops the comparison with its log's path."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=one_thread_env())
    log.write_text(proc.stdout + proc.stderr)
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("MARKS ")), None)
    if proc.returncode or line is None:
        raise config.ConfigError(f"{' '.join(cmd[:3])}... failed (exit {proc.returncode}); its output: {log}")
    return json.loads(line.removeprefix("MARKS ")), proc.stdout


def per_step(marks: list, warmup: int) -> dict:
    """Median ms per step on each clock, over the spans between consecutive marks after the first warmup."""
    spans = [(b[0] - a[0], b[1] - a[1]) for a, b in zip(marks, marks[1:])][warmup:]
    if not spans:
        raise config.ConfigError(f"--steps must exceed --warmup ({warmup}) by at least 2")
    return {"wall": statistics.median(s[0] for s in spans) * 1000, "cpu": statistics.median(s[1] for s in spans) * 1000}


def tail_mean(losses: list[float]) -> float:
    """The mean training loss of the last quarter of the steps (batch noise averages out)."""
    return statistics.fmean(losses[-max(1, len(losses) // 4) :])


def run(argv: list[str], cfg: config.TrainConfig, nanogpt: str, steps: int, warmup: int, repeats: int):
    """Alternate the sides repeats times: (title, labels, rows) for bench.print_table (ratio: nanoGPT / ours), and
    what is wrong with the losses (None: they agree)."""
    check_comparable(cfg)
    runs = {"ours": [], "nanogpt": []}
    with tempfile.TemporaryDirectory(prefix="bench-nanogpt-") as tmp:
        tmp = Path(tmp)
        code = copy_nanogpt(Path(nanogpt).resolve(), cfg, tmp)
        for i in range(repeats):  # ours first, then nanoGPT's, then again: drifting load hits both
            out = tmp / f"ours-{i}"
            record, _ = run_side([sys.executable, "-c", OURS, *our_args(argv, cfg, steps, out)], ROOT, tmp / "ours.log")
            losses = [r["loss"] for r in runlog.read(out) if "loss" in r]
            runs["ours"].append({**per_step(record["marks"], warmup), "loss": tail_mean(losses), "first": losses[0],
                                 "compile": record["compile_s"]})
            cmd = [sys.executable, "-c", NANOGPT, *nanogpt_args(cfg, steps, tmp / f"nanogpt-{i}")]
            record, stdout = run_side(cmd, code, tmp / "nanogpt.log")
            losses = [float(m.group(2)) for m in ITER.finditer(stdout)]
            runs["nanogpt"].append({**per_step(record["marks"], warmup), "loss": tail_mean(losses), "first": losses[0],
                                    "compile": None})
    return table(runs, cfg, steps, warmup)


def table(runs: dict, cfg: config.TrainConfig, steps: int, warmup: int):
    """The medians of each side, the median of the runs' own ratios, and the loss check."""
    med = lambda side, key: statistics.median(r[key] for r in runs[side])
    pairs = lambda key: statistics.median(n[key] / o[key] for o, n in zip(runs["ours"], runs["nanogpt"]))
    loss = {side: med(side, "loss") for side in runs}
    gap = abs(loss["ours"] - loss["nanogpt"])
    compile_s = [r["compile"] for r in runs["ours"] if r["compile"]]
    rows = [
        ("ms/step, wall", [med("ours", "wall"), med("nanogpt", "wall")]),
        ("ms/step, CPU time of the thread", [med("ours", "cpu"), med("nanogpt", "cpu")]),
        ("speed-up, median of the runs' ratios: wall", ["-", f"{pairs('wall'):.3f}"]),
        ("speed-up, median of the runs' ratios: CPU", ["-", f"{pairs('cpu'):.3f}"]),
        ("loss at the first step", [f"{med('ours', 'first'):.4f}", f"{med('nanogpt', 'first'):.4f}"]),
        (f"mean loss, last quarter of {steps} steps", [f"{loss['ours']:.4f}", f"{loss['nanogpt']:.4f}"]),
        ("compile s (before the first step)", [f"{statistics.median(compile_s):.1f}" if compile_s else "-", "-"]),
    ]
    title = (f"training step at {cfg.n_layer} x {cfg.n_embd}, T={cfg.block_size}, B={cfg.batch_size} vs nanoGPT's "
             f"train.py: one thread each, alternating, median over steps {warmup + 1}-{steps} and {len(runs['ours'])} "
             f"run(s); ratio = nanoGPT / ours (> 1: ours faster)")
    problem = None
    if gap > LOSS_TOLERANCE:
        problem = (f"the losses differ: mean of the last quarter {loss['ours']:.4f} (ours) vs {loss['nanogpt']:.4f} "
                   f"(nanoGPT), more than {LOSS_TOLERANCE} apart: the sides did not train the same model")
    return title, ["this project", "nanoGPT train.py"], rows, problem
