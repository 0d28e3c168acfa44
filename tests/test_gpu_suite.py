"""The GPU suite's plumbing, on the CPU: reading what `python -m scripts.bench --json` really writes (run here on
a tiny model) and nanoGPT's output, timing a run to a loss, and its refusal where no GPU is visible. (Its figures
themselves need a GPU: README records them.)"""

import sys

import pytest
import torch
from conftest import assert_one_line_error, run

from scripts import gpu_suite

TINY = [
    "--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=16", "--batch_size=4", "--device=cpu",
    "--dtype=float32", "--compile=False", "--synthetic=True", "--vocab_size=65",
]  # fmt: skip


@pytest.fixture(scope="module")
def bench_figures(tmp_path_factory) -> dict:
    """The real bench, run by the suite's own runner on a tiny CPU model: throughput and sampling figures."""
    logs = tmp_path_factory.mktemp("suite-logs")
    throughput = gpu_suite.bench([*TINY, "--steps=2", "--warmup=1", "--peak_flops=1e12"], "tiny", logs)
    args = [*TINY, "--sample", "--new_tokens=4", "--repeats=1", f"--batch={gpu_suite.SAMPLE_BATCH}"]
    sampling = gpu_suite.bench([*args, "--batch_uncached=True"], "tiny-sample", logs)
    assert (logs / "tiny.log").read_text().startswith("$ ")  # bench's own output is kept beside the JSON
    return {"throughput": throughput, "sampling": sampling}


def test_reads_what_bench_really_writes(bench_figures):
    """Every row the suite takes from bench exists in bench's JSON (a renamed or dropped figure fails here)."""
    figs = bench_figures["throughput"]
    rows = gpu_suite.throughput_rows(figs, figs, figs, {"tokens/s": 1.0})
    ours = dict((what, value) for what, value, _, _ in rows)
    assert ours["GPT-2 124M tokens/s, configs/gpt2.py micro-batch"] == figs["tokens/s"] > 0
    assert ours["  MFU (%)"] > 0 and ours["  peak memory (MiB)"] > 0
    assert ours["  compile s"] is None  # compile=False: nothing compiled
    assert rows[-2][2] == 1.0  # nanoGPT's figure beside ours
    rows = gpu_suite.sampling_rows("tiny", bench_figures["sampling"], targets=True)
    ours = dict((what.removeprefix("tiny sampling: "), value) for what, value, _, _ in rows)
    b = f"batch of {gpu_suite.SAMPLE_BATCH}"
    for what in ("tokens/s with KV cache", "tokens/s without", "speed-up", f"{b}: tokens/s with KV cache"):
        assert ours[what] > 0, what
    assert ours[f"{b}: tokens/s without"] > 0  # --batch_uncached=True, as on CUDA
    assert ours["engine setup s, one sequence"] is None  # the eager engine on a CPU: nothing to set up
    with pytest.raises(gpu_suite.SuiteError, match="has no 'tokens/s'"):
        gpu_suite.throughput_rows({"tokens per second": 1.0}, {}, {}, {})
    assert gpu_suite.throughput_rows({}, {}, {}, {})[0][1] is None  # bench failed: no figure, no error


def test_a_failed_bench_run_gives_no_figures(tmp_path, capsys):
    assert gpu_suite.bench(["--steps=0"], "bad", tmp_path) == {}
    assert "steps must be positive" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()


def test_reads_nanogpt_lines():
    theirs = gpu_suite.nanogpt_bench("0/20 loss: 10.9\ntime per iteration: 28.0000ms, MFU: 38.20%\n", 12 * 1024)
    assert theirs == {"tokens/s": pytest.approx(12 * 1024 / 0.028), "ms/step": 28.0, "MFU (%)": 38.2}
    assert gpu_suite.nanogpt_bench("Traceback ...", 1) == {}


def test_time_to_loss_stops_the_run_once_it_crosses(tmp_path):
    script = (
        "import time\n"
        "print('compiling the model ...', flush=True)\n"
        "for step, loss in enumerate([2.0, 1.6, 1.46, 1.3]):\n"
        "    print(f'step {step * 250}: train loss 9.0, val loss {loss:.4f}', flush=True)\n"
        "    time.sleep(0.2 if step < 2 else 30)\n"
    )
    cmd = [sys.executable, "-c", script]
    seconds, best, setup = gpu_suite.time_to_loss(cmd, tmp_path / "log", target=1.47, limit=60)
    assert 0.3 < seconds < 5 and best == 1.46  # stopped at 1.46: the 30 s sleep and 1.3 never came
    assert 0 < setup < seconds - 0.3  # the compile began before the first 0.4 s of steps
    assert "val loss 1.4600" in (tmp_path / "log").read_text()
    seconds, best, _ = gpu_suite.time_to_loss(cmd, tmp_path / "log", target=1.0, limit=1)
    assert seconds is None and best == 1.46  # gave up at the limit


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_the_suite_refuses_without_a_gpu():
    assert_one_line_error(run(["-m", "scripts.gpu_suite"]), "needs a CUDA GPU")
    assert_one_line_error(run(["-m", "scripts.gpu_suite", "--nanogp=x"]), "unknown config key 'nanogp'")
    assert_one_line_error(run(["-m", "scripts.bench", "--suite=gpu"]), "python -m scripts.gpu_suite")


def test_a_suite_stopped_midway_leaves_the_sections_it_measured(tmp_path, monkeypatch, bench_figures):
    """The figures measured so far are in table.txt after each section: a suite that runs past a time limit
    (or fails in sampling) still leaves its training figures."""
    monkeypatch.setattr(gpu_suite, "bench", lambda args, name, logs: bench_figures["throughput"])
    monkeypatch.setattr(gpu_suite, "time_to_loss", lambda cmd, log, cwd=None, limit=150: (21.5, 1.46, 4.0))

    def killed(name, figures, targets):
        raise TimeoutError("the device's time limit")

    monkeypatch.setattr(gpu_suite, "sampling_rows", killed)
    with pytest.raises(TimeoutError):
        gpu_suite.measure(None, tmp_path)
    table = (tmp_path / "table.txt").read_text()
    tok_s = gpu_suite.fmt(bench_figures["throughput"]["tokens/s"])
    assert "partial" in table and tok_s in table and "shakespeare_char: s from start to val <= 1.47" in table
    assert "21.5" in table and "compile_scope=blocks" in table
