"""bench.py as a user runs it: throughput, time to loss, sampling speed, and one-line errors.
Timings on a shared CPU are noise; only that they are measured and printed is checked."""

import json
import math
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

from scripts import bench

TINY = [
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--device=cpu",
    "--dtype=float32", "--compile=False",
]  # fmt: skip


def bench_py(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "scripts.bench", *args], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


def row(stdout: str, name: str) -> list[str]:
    """The cells after a row's name in the printed table."""
    lines = [line for line in stdout.splitlines() if line.startswith(name + "  ")]
    assert len(lines) == 1, (name, stdout[-2000:])
    return lines[0][len(name) :].split()


def number(cell: str) -> float:
    assert re.fullmatch(r"-?\d+(\.\d+)?", cell), cell
    return float(cell)


def test_throughput_on_synthetic_tokens_with_compare():
    proc = bench_py(*TINY, "--synthetic", "--vocab_size=65", "--steps=3", "--warmup=1", "--peak_flops=1e12",
                    "--compare=configs/small.py")  # fmt: skip
    out = proc.stdout
    assert "training throughput" in out and "synthetic tokens" in out and "1 warm-up + 3 timed steps" in out
    lines = out.splitlines()
    assert lines[lines.index("training throughput (steady state, after warm-up)") + 1].split() == [
        "defaults",
        "small",
        "ratio",
    ]
    tok_s = [number(c) for c in row(out, "tokens/s")]
    assert len(tok_s) == 3 and tok_s[0] > 0 and tok_s[1] > 0
    assert all(number(c) > 0 for c in row(out, "ms/step"))
    assert all(0 < number(c) for c in row(out, "MFU (%)")[:2])  # the peak_flops override gives an MFU on a CPU
    memory = [number(c) for c in row(out, "peak memory (MiB)")]  # the timed steps' own peak: a ratio too
    assert memory[0] > 0 and memory[1] > 0 and memory[2] == pytest.approx(memory[1] / memory[0], abs=1e-3)
    assert "peak memory: resident set of the timed steps" in out


def test_json_holds_the_figures_of_the_table(tmp_path):
    """--json=FILE: per config, its label, info line and every figure the table prints (fmt of the same number)."""
    path = tmp_path / "bench.json"
    args = [*TINY, "--synthetic", "--steps=2", "--warmup=1", "--compare=configs/small.py", f"--json={path}"]
    out = bench_py(*args).stdout
    doc = json.loads(path.read_text())
    assert doc["mode"] == "throughput" and doc["title"] in out
    assert [c["label"] for c in doc["configs"]] == ["defaults", "small"]
    assert all(f"{c['label']}: {c['info']}" in out for c in doc["configs"])
    figures = [c["figures"] for c in doc["configs"]]
    assert list(figures[0]) == list(figures[1]) and "tokens/s" in figures[0] and "peak memory (MiB)" in figures[0]
    for key in figures[0]:
        assert row(out, key)[:2] == [bench.fmt(f[key]) for f in figures], key


def test_peak_memory_is_the_timed_runs_own(tmp_path):
    """CPU peak memory: the peak resident set of the timed steps alone, so a small model measured after a big one
    in the same process shows a smaller peak (the process's max RSS so far could only grow)."""
    model = "n_layer = {}\nn_head = 4\nn_embd = {}\nblock_size = {}\nbatch_size = 8\n"
    (tmp_path / "big.py").write_text(model.format(4, 256, 128))  # about 100 MiB of activations and optimizer state
    (tmp_path / "tiny.py").write_text(model.format(1, 32, 16))
    common = ["--device=cpu", "--dtype=float32", "--compile=False", "--synthetic", "--vocab_size=65", "--steps=1"]
    path = tmp_path / "bench.json"
    bench_py(str(tmp_path / "big.py"), f"--compare={tmp_path / 'tiny.py'}", *common, "--warmup=1", f"--json={path}")
    big, tiny = (c["figures"]["peak memory (MiB)"] for c in json.loads(path.read_text())["configs"])
    assert big > tiny + 40 and tiny > 50  # a torch process is resident in 100s of MiB; the big model adds more


def test_throughput_on_the_dataset_without_a_peak(char_data, capsys):
    assert bench.main([*TINY, f"--data_dir={char_data}", "--steps=2", "--warmup=1"]) == 0  # in-process: quicker
    out = capsys.readouterr().out
    assert "shakespeare_char" in out and "0.03M params" in out
    assert number(row(out, "tokens/s")[0]) > 0
    assert row(out, "MFU (%)") == ["-"]  # CPU: no known peak FLOP/s


@pytest.fixture(scope="module")
def time_to_loss(char_data, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("bench")
    args = [*TINY, f"--data_dir={char_data}", "--max_iters=10", "--eval_interval=5", "--eval_iters=2"]
    args += ["--log_interval=5", "--learning_rate=3e-3", "--warmup_iters=2", "--dropout=0"]
    proc = bench_py(*args, "--time_to_loss", "--thresholds=10,0.1", "--repeats=2", f"--out_dir={out_dir}")
    return proc.stdout, out_dir


def test_time_to_loss_reports_times(time_to_loss):
    out, out_dir = time_to_loss
    assert "time to loss (median of 2 run(s)" in out
    assert sorted(p.name for p in out_dir.iterdir()) == ["defaults-0", "defaults-1"]  # two runs, kept in out_dir
    wall, train_s = number(row(out, "val <= 10: wall s")[0]), number(row(out, "val <= 10: train s")[0])
    assert wall >= train_s >= 0  # reached at the step-0 evaluation
    assert number(row(out, "val <= 10: step")[0]) == 0
    assert row(out, "val <= 0.1: wall s") == ["-"]  # never reached
    eval_s, train_total, total = (number(row(out, k)[0]) for k in ("eval s", "train s", "total s"))
    assert eval_s > 0 and train_total > 0 and total == pytest.approx(eval_s + train_total, abs=2e-3, rel=1e-3)
    assert number(row(out, "tokens/s")[0]) > 0 and number(row(out, "ms/step")[0]) > 0
    assert 0 < number(row(out, "final val loss")[0]) < 3.6
    # char-level ASCII text: a byte per token, so bits per byte is the loss over ln 2 (to the printed digits)
    loss, bpb = number(row(out, "final val loss")[0]), number(row(out, "final val bpb")[0])
    assert bpb == pytest.approx(loss / math.log(2), rel=2e-3)
    assert number(row(out, "val <= 10: val bpb")[0]) > bpb  # at step 0, before training


def test_time_to_loss_uses_a_temp_dir_by_default(char_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the default out_dir is "out", relative to the working directory
    args = [*TINY, f"--data_dir={char_data}", "--max_iters=2", "--eval_interval=2", "--eval_iters=1", "--time_to_loss"]
    assert bench.main(args) == 0
    out = capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []  # ...but nothing was written there
    assert number(row(out, "final val loss")[0]) > 0


def test_sampling_speed_random_model_and_checkpoint(time_to_loss, capsys):
    out = bench_py(*TINY, "--synthetic", "--vocab_size=65", "--sample", "--new_tokens=40").stdout
    assert "randomly initialised" in out and "40 new tokens" in out
    cached, uncached = number(row(out, "tokens/s with KV cache")[0]), number(row(out, "tokens/s without")[0])
    assert cached > 0 and uncached > 0
    assert number(row(out, "speed-up")[0]) == pytest.approx(cached / uncached, rel=0.05)
    batched = number(row(out, "batch of 8: tokens/s with KV cache")[0])  # 8 rows by default on a CPU
    assert number(row(out, "batch of 8: time / one sequence's")[0]) == pytest.approx(8 * cached / batched, rel=0.05)
    assert row(out, "batch of 8: tokens/s without") == ["-"]  # timed on CUDA only, unless asked for
    assert "engine=eager" in out and row(out, "engine setup s, batch of 8 (once)") == ["-"]  # nothing to set up
    _, out_dir = time_to_loss
    assert bench.main(["--device=cpu", "--sample", "--new_tokens=20", f"--out_dir={out_dir / 'defaults-0'}"]) == 0
    out = capsys.readouterr().out  # in-process: quicker
    assert f"{out_dir / 'defaults-0' / 'ckpt.pt'}" in out
    assert number(row(out, "speed-up")[0]) > 0


def test_parse_splits_bench_flags_from_train_flags():
    argv = ["configs/small.py", "--steps=3", "--synthetic", "--n_layer=2", "--time-to-loss", "--thresholds=2,1.9"]
    opts, rest = bench.parse([*argv, "--device=cpu", "--repeats=2"])
    assert (opts.steps, opts.synthetic, opts.time_to_loss, opts.levels, opts.repeats) == (3, True, True, [2, 1.9], 2)
    assert (opts.warmup, opts.sample, opts.compare) == (5, False, "")  # the defaults
    assert rest == ["configs/small.py", "--n_layer=2", "--device=cpu"]  # train.py's, as given and in order


def test_sampling_batch_flags():
    out = bench_py(*TINY, "--synthetic", "--sample", "--new_tokens=20", "--batch=3", "--batch_uncached=True").stdout
    speeds = [number(row(out, f"batch of 3: tokens/s {k}")[0]) for k in ("with KV cache", "without")]
    assert number(row(out, "batch of 3: speed-up")[0]) == pytest.approx(speeds[0] / speeds[1], rel=0.05)
    out = bench_py(*TINY, "--synthetic", "--sample", "--new_tokens=20", "--batch=1").stdout
    assert row(out, "batch of 1: tokens/s with KV cache") == ["-"]


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--steps=0"], "steps must be positive"),
        (["--warmup=-1"], "warmup must be >= 0"),
        (["--steps"], "needs a value"),
        (["--time_to_loss", "--thresholds=2.0,x"], "thresholds must be numbers"),
        (["--time_to_loss", "--sample"], "choose one of"),
        (["--synthetic=maybe"], "expects bool"),
        (["--repeats=2.5"], "config key 'repeats' expects int, got 2.5"),
        (["--n_layr=2"], "unknown config key 'n_layr'"),
        (["--compare=configs/nothere.py"], "config file 'configs/nothere.py' not found"),
        (["--sample", "--device=cpu", "--out_dir=/nonexistent/run"], "no checkpoint at"),
        (["--sample", "--out_dir=x", "--compare=configs/small.py"], "leave out --compare"),
        (["--sample", "--engine=fast"], "engine"),
        (["--sample", "--batch=-1"], "batch must be >= 0"),
        (["--sample", "--device=cpu", "--synthetic", "--engine=graph"], "engine=graph needs a CUDA GPU"),
        (["--device=cuda:0"], "no CUDA GPU"),
        (["--json=/nonexistent/folder/bench.json"], "does not exist"),
        (["--suite=gpu"], "python -m scripts.gpu_suite"),
    ],
)
def test_bad_input_is_one_line(capsys, args, needle):
    assert bench.main(args) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], captured.err


def test_refuses_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert bench.main(["--synthetic"]) == 2
    assert "not torchrun" in capsys.readouterr().err


def test_help(capsys):
    assert bench.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "--time_to_loss" in out and "--thresholds" in out and "train.py" in out
