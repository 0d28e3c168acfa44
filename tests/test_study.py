"""study.py: the real command on tiny models (every question included), its report, figures and errors."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT, metrics_records, run

import study
import study_report
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


def study_py(tmp_path, char_data, *flags):
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
    proc = study_py(tmp_path, char_data, *flags)
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

    assert not re.search(r"issue|#\d", report, re.I)  # speaks of the project, not of its tracker
    for n in range(1, 6):
        text = section(report, f"## Question {n}:")
        assert len(numbers(text)) >= 4, (n, text)
    # question 1 from the runs' own records: 20 steps teach a 12-layer model nothing beyond the token
    # frequencies (the unigram loss in the header), with warmup or without, so the answer is "inconclusive"
    q1 = section(report, "## Question 1:")
    unigram = float(re.search(r"\(unigram\): (\d+\.\d+)", report).group(1))
    for pos in ("pre", "post"):
        runs = (metrics_records(out / f"runs/q-{pos}-{w}") for w in ("warmup", "nowarmup"))
        on, off = ([r["val_loss"] for r in recs if "val_loss" in r][-1] for recs in runs)
        for warmup, loss in (("100", on), ("0", off)):
            cells = next(c for c in map(str.split, q1.splitlines()) if c[:4] == ["|", f"{pos}-LN", "|", warmup])
            assert float(cells[7]) == pytest.approx(loss, abs=6e-5) and 0 < loss < ln_vocab, cells  # final val
            assert cells[11] == "stuck" and loss > unigram - study_report.TOL, cells
        line = f"- {pos}-LN: final val loss without warmup minus with: {off - on:+.4f} nats (stuck with, stuck without)"
        assert line in q1, q1
    assert "**inconclusive: pre-LN and post-LN did not train even with warmup at this learning rate (0.001)**" in q1
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
    proc = study_py(tmp_path, char_data, *flags, "--grad_clip=0", "--warmup_iters=0", "--n_layer=1", "--jobs=2")
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
        ("--jobs=two", "config key 'jobs' expects int, got 'two'"),
        ("config/other.py", "give one config file"),
    ],
)
def test_bad_flags_fail_in_one_line(tmp_path, capsys, flag, needle):
    assert study_main(["configs/small.py", f"--study_dir={tmp_path}", flag]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err, err
    assert not list(tmp_path.iterdir())


def test_parse_splits_study_flags_from_train_flags():
    """config.split_flags, as bench.py uses it: a bare bool flag, dashes or underscores, the rest in order."""
    opts, config_file, user = study.parse(["--n_layer=3", "configs/small.py", "--reuse", "--study-dir=x", "--seeds=3"])
    assert (opts.reuse, opts.study_dir, opts.seeds, opts.questions, opts.variant_names[:2]) == (
        True, "x", 3, "1,2,3,4,5", ["pre_ln", "post_ln"]
    )  # fmt: skip
    assert (config_file, user) == ("configs/small.py", ["--n_layer=3"])
    assert study.parse(["configs/small.py", "--questions=none"])[0].question_numbers == set()


def test_help_names_every_flag_variant_and_question(capsys):
    assert study_main(["configs/small.py", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--variants", "--seeds", "--questions", "--name", "--study_dir", "--reuse", "--jobs"):
        assert f"  {flag} " in out, flag
    assert all(v in out for v in study.VARIANTS) and all(title in out for title, _ in study.QUESTIONS.values())
    assert not re.search(r"issue|#\d", out, re.I), out  # speaks of the project, not of its tracker


def test_one_run_per_gpu_when_there_are_several(monkeypatch):
    import torch

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert study.slots("auto", 1) == [None] and study.slots("auto", 2) == [None, None]  # --jobs on the CPU / one GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert study.slots("auto", 1) == ["0", "1", "2", "3"]  # each run gets CUDA_VISIBLE_DEVICES=<one of these>
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert study.slots("cuda", 1) == ["2", "3"]
    assert study.slots("cpu", 1) == [None]
    jobs = study.plan(*study.parse(["configs/small.py", "--questions=none", "--device=cpu"]))
    assert {j.resolved["device"] for j in jobs} == {"cpu"}  # what main passes to slots


def test_every_run_decays_over_its_own_budget():
    """small.py ends its cosine at step 1000; the study's shorter runs must not inherit that schedule."""
    import train
    from config import TrainConfig, parse_args

    jobs = study.plan(*study.parse(["configs/small.py"]))
    assert {j.resolved["max_iters"] for j in jobs} == {study.DEFAULT_MAX_ITERS, study.Q_BASE["max_iters"]}
    for job in jobs:
        cfg = parse_args(TrainConfig, job.args)
        assert train.get_lr(cfg.max_iters - 1, cfg) < cfg.min_lr * 1.01, job.name
    mine = study.plan(*study.parse(["configs/small.py", "--lr_decay_iters=400", "--variants=pre_ln"]))
    assert mine[1].resolved["lr_decay_iters"] == 400  # the user's flag still wins


def q1_section(finals: dict[str, float | str], unigram: float = 3.3473) -> str:
    """Question 1's section from four runs that ended at these val losses ("diverged": stopped on a loss that
    was not finite); the setup as in the committed report, docs/study/report.md."""
    q = {}
    for name, loss in finals.items():
        cfg = dict(n_layer=12, n_embd=64, learning_rate=0.001, max_iters=300, warmup_iters=0 if "now" in name else 100)
        job = study.Job(f"q-{name}", "q", 1337, [], rc=0, config=cfg)
        if loss == "diverged":
            job.rc, job.error = 1, "error: step 12: loss is not finite (nan); lower learning_rate"
        else:
            job.evals = [{"step": 300, "train_loss": loss + 0.04, "val_loss": loss}]
        q[name] = job
    return "\n".join(study_report.q1(study_report.Results(Path("unused"), None, {}, q, unigram, {})))


def test_q1_answers_the_committed_report_from_its_own_numbers():
    """The committed report's table, fed back to question 1, gives its answer: post-LN needed warmup."""
    committed = section((ROOT / "docs/study/report.md").read_text(), "## Question 1:")
    finals = {}
    for pos in ("pre", "post"):
        for name, warmup in ((f"{pos}-warmup", "100"), (f"{pos}-nowarmup", "0")):
            finals[name] = float(row(committed, f"{pos}-LN | {warmup}")[3])  # final val
    text = q1_section(finals)
    answer = next(ln for ln in committed.splitlines() if ln.startswith("- Answer"))
    assert answer.endswith("**yes: post-LN needed warmup, pre-LN did not**") and answer in text, text
    for pos, diff in (("pre", 2.4715 - 2.4395), ("post", 2.7761 - 2.5787)):  # without minus with: worse without
        assert diff > 0 and f"- {pos}-LN: final val loss without warmup minus with: {diff:+.4f} nats" in text


@pytest.mark.parametrize(
    "pre_off, post_on, post_off, answer",
    [
        (2.47, 2.58, "diverged", "yes: post-LN needed warmup, pre-LN did not"),
        (2.47, 2.58, 3.34, "yes: post-LN needed warmup, pre-LN did not"),  # stuck at the unigram loss
        (2.64, 2.58, 2.78, "both needed warmup: no contrast between them here"),
        (2.47, 2.58, 2.60, "neither needed warmup here"),
        (2.47, 2.58, 2.38, "neither needed warmup here"),  # better without warmup: no need
        (2.64, 2.58, 2.60, "pre-LN needed warmup and post-LN did not: the opposite of the usual claim"),
        (2.47, 3.34, 3.35, "inconclusive: post-LN did not train even with warmup at this learning rate (0.001)"),
    ],
)
def test_q1_needs_warmup_when_it_ends_worse_stuck_or_diverged(pre_off, post_on, post_off, answer):
    text = q1_section({"pre-warmup": 2.44, "pre-nowarmup": pre_off, "post-warmup": post_on, "post-nowarmup": post_off})
    assert f"**{answer}" in text, text
    assert f"pre-LN: final val loss without warmup minus with: {pre_off - 2.44:+.4f} nats" in text
    if post_off != "diverged":
        assert f"post-LN: final val loss without warmup minus with: {post_off - post_on:+.4f} nats" in text
