"""bench.py --nanogpt (scripts/bench_nanogpt.py): the training step beside nanoGPT's train.py. A stand-in for nanoGPT
(a train.py that logs as nanoGPT's does) takes the place of its code, so the test needs no copy of it: our side is
the real train.py. Timings are noise here; what is checked is that both sides run, alternate, are timed on both
clocks, and that losses that disagree fail the command while losses that agree pass it."""

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from gpt_residual import config
from scripts import bench, bench_nanogpt

TINY = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--device=cpu",
        "--dtype=float32", "--compile=False", "--eval_iters=2"]  # fmt: skip

STAND_IN = """import sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--"))
assert args["device"] == "cpu" and args["n_layer"] == "2" and args["lr_decay_iters"] == "2000", args
t0 = time.time()
for it in range(int(args["max_iters"]) + 1):  # nanoGPT's loop: one time.time() per iteration, a line per iteration
    sum(range(20000))
    t1 = time.time()
    print(f"iter {it}: loss {LOSS + 0.5 * 0.5 ** it:.4f}, time {(t1 - t0) * 1000:.2f}ms, mfu -100.00%")
    t0 = t1
"""


def stand_in(folder, loss: float):
    """A folder laid out as nanoGPT's, whose train.py logs losses settling at loss."""
    (folder / "config").mkdir(parents=True, exist_ok=True)
    (folder / "data/shakespeare_char").mkdir(parents=True, exist_ok=True)
    (folder / "train.py").write_text(f"LOSS = {loss}\n" + STAND_IN)
    for name in ("model.py", "configurator.py", "config/train_shakespeare_char.py"):
        (folder / name).write_text("")
    prepare = "from pathlib import Path\nassert Path('input.txt').stat().st_size > 1000\n"  # our text reached it
    (folder / "data/shakespeare_char/prepare.py").write_text(prepare)
    return folder


def bench_py(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "scripts.bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)  # fmt: skip


def cells(stdout: str, name: str) -> list[str]:
    lines = [line for line in stdout.splitlines() if line.startswith(name + "  ")]
    assert len(lines) == 1, (name, stdout[-2000:])
    return lines[0][len(name) :].split()


def test_losses_that_disagree_fail_and_losses_that_agree_pass(char_data, tmp_path):
    common = [*TINY, f"--data_dir={char_data}", "--steps=12", "--warmup=2", "--repeats=2"]
    far = bench_py(*common, f"--nanogpt={stand_in(tmp_path / 'far', 9.0)}")
    assert far.returncode == 1, far.stdout[-2000:] + far.stderr[-2000:]
    assert far.stderr.strip().startswith("error: the losses differ") and len(far.stderr.strip().splitlines()) == 1
    ours, theirs, _ = cells(far.stdout, "mean loss, last quarter of 12 steps")  # no ratio of losses: "-"
    ours, theirs = float(ours), float(theirs)
    assert theirs == pytest.approx(9.0, abs=0.01) and 2.0 < ours < 4.5  # our tiny model's, from the real train.py
    close = bench_py(*common, f"--nanogpt={stand_in(tmp_path / 'close', round(ours, 4))}")
    assert close.returncode == 0, close.stdout[-2000:] + close.stderr[-2000:]
    for clock in ("ms/step, wall", "ms/step, CPU time of the thread"):
        mine, stand, ratio = map(float, cells(close.stdout, clock))
        assert mine > 0 and stand > 0 and ratio == pytest.approx(stand / mine, rel=0.01)
    assert "2 run(s)" in close.stdout and "steps 3-12" in close.stdout


def test_the_nanogpt_command_keeps_the_configs_schedule(tmp_path):
    cfg = config.parse_args(config.TrainConfig, [str(ROOT / "configs/nanogpt_cpu.py")])
    theirs = bench_nanogpt.nanogpt_args(cfg, 200, tmp_path)
    for flag in ("--n_layer=4", "--n_embd=128", "--block_size=64", "--batch_size=12", "--learning_rate=0.001",
                 "--min_lr=0.0001", "--warmup_iters=100", "--lr_decay_iters=2000", "--max_iters=200", "--beta2=0.99",
                 "--bias=False", "--dropout=0.0", "--compile=False", "--device=cpu"):  # fmt: skip
        assert flag in theirs, (flag, theirs)
    ours = bench_nanogpt.our_args(["configs/nanogpt_cpu.py"], cfg, 200, tmp_path)
    assert "--max_iters=200" in ours and "--lr_decay_iters=2000" in ours  # the 2000-step cosine, not a 200-step one


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--positions=rope"], "positions must be at its default"),
        (["--optimizer=muon"], "optimizer must be 'adamw'"),
        (["--gradient_accumulation_steps=2"], "gradient_accumulation_steps must be 1"),
        ([], "/nonexistent/nanoGPT has no train.py"),
        (["--time_to_loss"], "leave out --time_to_loss"),
    ],
)
def test_what_nanogpt_cannot_run_is_one_line(capsys, char_data, args, needle):
    argv = ["configs/nanogpt_cpu.py", f"--data_dir={char_data}", "--nanogpt=/nonexistent/nanoGPT", *args]
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_per_step_spans_skip_the_warmup():
    marks = [(0.0, 0.0), (1.0, 0.5), (1.1, 0.55), (1.3, 0.65), (1.4, 0.7)]  # spans 1000, 100, 200, 100 ms (wall)
    assert bench_nanogpt.per_step(marks, 1) == pytest.approx({"wall": 100.0, "cpu": 50.0})
    with pytest.raises(config.ConfigError, match="--steps must exceed --warmup"):
        bench_nanogpt.per_step(marks, 4)
