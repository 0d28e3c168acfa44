"""study.py: the real command on tiny models (every question included), its report, figures and errors."""

import json
import math
import re
import sys

import pytest
from conftest import ROOT, metrics_records, run

from study import main as study_main

TINY = ["--n_embd=32", "--n_head=2", "--block_size=16", "--batch_size=4", "--eval_iters=2", "--log_interval=5"]
TINY += ["--device=cpu", "--dtype=float32", "--compile=False"]
PNG = b"\x89PNG\r\n\x1a\n"
FIGURES = ["val_loss", "grad_norms", "rms", "q1_warmup", "q2_init_grads", "q3_rms", "q4_grads", "q4_loss"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny models train faster on one thread, much faster on a busy 2-core machine; study.main runs
    in this process from the repo root, like the subprocesses."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.chdir(ROOT)


def study(tmp_path, char_data, *flags):
    return run(["study.py", "configs/small.py", f"--data_dir={char_data}", f"--study_dir={tmp_path}", *TINY, *flags])


def row(report: str, name: str) -> list[str]:
    """The cells of the table row that starts with `name`."""
    line = next(ln for ln in report.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def section(report: str, title: str) -> str:
    return report.split(title, 1)[1].split("\n## ", 1)[0]


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])[-+]?\d+\.\d+(?:e[-+]\d+)?", text)]


def test_study_runs_every_variant_and_question(tmp_path, char_data, monkeypatch, capsys):
    # rmsnorm: question 5 in full; --jobs=2: two runs at once on two cores
    flags = ["--variants=pre_ln,rmsnorm", "--seeds=1", "--max_iters=20", "--name=t", "--jobs=2"]
    proc = study(tmp_path, char_data, *flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^\[\d+/14\] pre_ln probe \.\.\. loss at init \d", proc.stdout, re.M), proc.stdout
    out = tmp_path / "t"
    report = (out / "report.md").read_text()
    ln_vocab = math.log(json.loads((char_data / "meta.json").read_text())["vocab_size"])

    for variant in ("pre_ln", "rmsnorm"):  # variant | train | val | ms/step | tokens/s | diverged | load
        cells = row(report, variant)
        losses = [float(c.split("±")[0]) for c in cells[1:3]]
        assert all(math.isfinite(x) and 0 < x < ln_vocab for x in losses), cells
        assert float(cells[3]) > 0 and float(cells[4].replace(",", "")) > 0 and cells[5] == "no", cells
        assert float(cells[6]) >= 0  # the load average after the run
        recs = metrics_records(out / f"runs/{variant}-s1337")
        assert 10 <= sum("rms" in r for r in recs) <= 21  # telemetry on: ~10-20 records
        assert "probe_init" in (out / f"runs/{variant}-init/metrics.jsonl").read_text()

    for name in FIGURES:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
        assert f"![{name}]({name}.png)" in report

    for n in range(1, 6):
        text = section(report, f"## Question {n}:")
        assert len(numbers(text)) >= 4, (n, text)
    q1 = section(report, "## Question 1:")
    assert re.search(r"\*\*(yes|both|neither|pre-LN needed|inconclusive)", q1), q1
    for pos, warmup in (("pre", "100"), ("pre", "0"), ("post", "100"), ("post", "0")):
        cells = next(c for c in map(str.split, q1.splitlines()) if c[:4] == ["|", f"{pos}-LN", "|", warmup])
        assert 0 < float(cells[7]) < ln_vocab, cells  # final val
    q1_cfg = json.loads((out / "runs/q-post-nowarmup/config.json").read_text())
    assert (q1_cfg["n_layer"], q1_cfg["warmup_iters"], q1_cfg["norm_position"]) == (12, 0, "post")
    assert "holds" in section(report, "## Question 2:")
    assert float(row(report, "pre-LN, gpt2")[3]) > 0  # mlp grad L/1
    assert "RMSNorm vs LayerNorm:" in section(report, "## Question 5:")

    # --reuse=True runs nothing again and redraws the report; here without matplotlib: tables only
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for png in out.glob("*.png"):
        png.unlink()
    before = (out / "runs/pre_ln-s1337/study.json").stat().st_mtime_ns
    argv = ["configs/small.py", f"--data_dir={char_data}", f"--study_dir={tmp_path}", *TINY, *flags, "--reuse=True"]
    assert study_main(argv) == 0
    assert "plots skipped" in capsys.readouterr().out
    assert (out / "runs/pre_ln-s1337/study.json").stat().st_mtime_ns == before
    redrawn = (out / "report.md").read_text()
    assert row(redrawn, "pre_ln")[2] == row(report, "pre_ln")[2] and "val_loss.png skipped" in redrawn
    assert not list(out.glob("*.png"))


def test_a_diverging_run_is_a_result(tmp_path, char_data):
    flags = ["--variants=pre_ln", "--seeds=1", "--questions=none", "--max_iters=10", "--learning_rate=1e9"]
    proc = study(tmp_path, char_data, *flags, "--grad_clip=0", "--warmup_iters=0", "--n_layer=1", "--jobs=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^\[\d/2\] pre_ln seed 1337 \.\.\. DIVERGED: step \d+: loss", proc.stdout, re.M), proc.stdout
    report = (tmp_path / "small/report.md").read_text()
    assert row(report, "pre_ln")[1:3] == ["—", "—"] and row(report, "pre_ln")[5] == "yes (1/1)"
    assert "Not trained: pre_ln-s1337 diverged" in report


def test_unknown_variant_is_one_line(tmp_path):
    proc = run(["study.py", "configs/small.py", f"--study_dir={tmp_path}", "--variants=pre_ln,bogus"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown variant 'bogus'; valid variants: pre_ln, post_ln, rmsnorm")
    assert not list(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize(
    "flag, needle",
    [
        ("--n_layr=3", "unknown config key 'n_layr'"),
        ("--norm_position=side", "norm_position must be one of pre, post, peri"),
        ("--questions=1,7", "--questions must be all, none or some of 1,2,3,4,5"),
        ("--seeds=0", "--seeds must be a positive integer"),
        ("--name", "flag '--name' needs a value"),
    ],
)
def test_bad_flags_fail_in_one_line(tmp_path, capsys, flag, needle):
    assert study_main(["configs/small.py", f"--study_dir={tmp_path}", flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not list(tmp_path.iterdir())


def test_one_run_per_gpu_when_there_are_several(monkeypatch):
    import torch

    import study

    jobs = [{"args": ["configs/small.py"]}]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert study.slots(jobs, 1) == [None] and study.slots(jobs, 2) == [None, None]  # --jobs on the CPU / one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert study.slots(jobs, 1) == ["0", "1", "2", "3"]  # each run gets CUDA_VISIBLE_DEVICES=<one of these>
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert study.slots(jobs, 1) == ["2", "3"]
    assert study.slots([{"args": ["configs/small.py", "--device=cpu"]}], 1) == [None]


def test_every_run_decays_over_its_own_budget():
    """small.py ends its cosine at step 1000; the study's shorter runs must not inherit that schedule."""
    import study
    import train
    from config import TrainConfig, parse_args

    jobs = study.plan(study.parse(["configs/small.py"]))
    assert {j["resolved"]["max_iters"] for j in jobs} == {study.DEFAULT_MAX_ITERS, study.Q_BASE["max_iters"]}
    for job in jobs:
        cfg = parse_args(TrainConfig, job["args"])
        assert train.get_lr(cfg.max_iters - 1, cfg) < cfg.min_lr * 1.01, job["name"]
    mine = study.plan(study.parse(["configs/small.py", "--lr_decay_iters=400", "--variants=pre_ln"]))
    assert mine[1]["resolved"]["lr_decay_iters"] == 400  # the user's flag still wins
