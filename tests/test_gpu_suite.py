"""The GPU suite's plumbing, on the CPU: reading bench.py's and nanoGPT's output, timing a run to a loss,
and its refusal where no GPU is visible. (Its figures themselves need a GPU: README records them.)"""

import sys

import pytest
import torch
from conftest import assert_one_line_error, run

from scripts import gpu_suite

BENCH_OUT = """defaults: 124.35M params, ...
training throughput (steady state, after warm-up)
                                          defaults
tokens/s                                    612345
MFU (%)                                       53.1
peak memory (MiB, CUDA max allocated)        22310
compile s                                     41.2
"""


def test_reads_bench_tables_and_nanogpt_lines():
    assert gpu_suite.table_row(BENCH_OUT, "tokens/s") == 612345
    assert gpu_suite.table_row(BENCH_OUT, "peak memory") == 22310
    assert gpu_suite.table_row(BENCH_OUT, "speed-up") is None
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
    assert_one_line_error(run(["-m", "scripts.bench", "--suite=gpu"]), "needs a CUDA GPU")
    assert_one_line_error(run(["-m", "scripts.bench", "--suite=tpu"]), "suite must be one of gpu")


def test_a_suite_stopped_midway_leaves_the_sections_it_measured(tmp_path, monkeypatch):
    """The figures measured so far are in table.txt after each section: a suite that runs past a time limit
    (or fails in sampling) still leaves its training figures."""
    monkeypatch.setattr(gpu_suite, "run_logged", lambda cmd, log, cwd=None: BENCH_OUT)
    monkeypatch.setattr(gpu_suite, "time_to_loss", lambda cmd, log, cwd=None, limit=150: (21.5, 1.46, 4.0))

    def killed(logs):
        raise TimeoutError("the device's time limit")

    monkeypatch.setattr(gpu_suite, "sampling_rows", killed)
    with pytest.raises(TimeoutError):
        gpu_suite.measure(None, tmp_path)
    table = (tmp_path / "table.txt").read_text()
    assert "partial" in table and "612345" in table and "shakespeare_char: s from start to val <= 1.47" in table
    assert "21.5" in table and "compile_scope=blocks" in table
