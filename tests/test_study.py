"""python -m scripts.study: the real command on tiny models (every question included), its report, figures, errors."""

import json
import math
import re
import sys
from pathlib import Path

import pytest
from conftest import ROOT, metrics_records, needs_muon, run
from study_switches import switches  # noqa: F401  (a fixture: the switch keys, where this checkout lacks them)

from scripts.study import modern_questions, norm_questions, presets, registry
from scripts.study import runner as study
from scripts.study.depth_runs import DEEP_BASE
from scripts.study.job import Job
from scripts.study.presets import PRESETS
from scripts.study.question import Q6_LRS, Q_BASE
from scripts.study.results import TOL, Results
from scripts.study.runner import main as study_main

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
    where = [f"--data_dir={char_data}", f"--study_dir={tmp_path}"]
    return run(["-m", "scripts.study", "configs/small.py", *where, *TINY, *flags])


def row(report: str, name: str) -> list[str]:
    """The cells of the table row that starts with `name`."""
    line = next(ln for ln in report.splitlines() if ln.startswith(f"| {name} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def section(report: str, title: str) -> str:
    return report.split(title, 1)[1].split("\n## ", 1)[0]


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"(?<![\w.])[-+]?\d+\.\d+(?:e[-+]\d+)?", text)]


def test_study_runs_variants_and_questions_1_to_5(tmp_path, char_data, monkeypatch, capsys):
    # rmsnorm: question 5 in full; --jobs=2: two runs at once on two cores; questions 6-9: the next test
    flags = "--variants=pre_ln,rmsnorm --seeds=1 --max_iters=20 --name=t --jobs=2 --questions=1,2,3,4,5".split()
    proc = study_py(tmp_path, char_data, *flags)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^\[\d+/14\] pre_ln probe \.\.\. loss at init \d", proc.stdout, re.M), proc.stdout
    out = tmp_path / "t"
    report = (out / "report.md").read_text()
    ln_vocab = math.log(json.loads((char_data / "meta.json").read_text())["vocab_size"])

    for variant in ("pre_ln", "rmsnorm"):  # variant | train | val | val bpb | ms/step | tokens/s | diverged | load
        cells = row(report, variant)
        losses = [float(c.split("±")[0]) for c in cells[1:3]]
        assert all(math.isfinite(x) and 0 < x < ln_vocab for x in losses), cells
        assert float(cells[4]) > 0 and float(cells[5].replace(",", "")) > 0 and cells[6] == "no", cells
        assert float(cells[7]) >= 0  # the load average after the run
        recs = metrics_records(out / f"runs/{variant}-s1337")
        bpb = [r["val_bpb"] for r in recs if "val_bpb" in r][-1]  # one seed: the run's last estimate
        assert float(cells[3]) == pytest.approx(bpb, abs=1e-4) and 0 < bpb < ln_vocab / math.log(2), cells
        assert 10 <= sum("rms" in r for r in recs) <= 21  # telemetry on: ~10-20 records
        assert "probe_init" in (out / f"runs/{variant}-init/metrics.jsonl").read_text()

    for name in FIGURES:
        data = (out / f"{name}.png").read_bytes()
        assert data.startswith(PNG) and len(data) > 1000, name
        assert f"![{name}]({name}.png)" in report

    assert not re.search(r"issue|#\d", report, re.I)  # speaks of the project, not of its tracker
    assert f"- preset cpu: {PRESETS['cpu'].note}\n" in report and re.search(r"; estimated \d+\)\n", report)
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
            assert cells[11] == "stuck" and loss > unigram - TOL, cells
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
    proc = study_py(
        tmp_path, char_data, *flags, "--grad_clip=0", "--warmup_iters=0", "--n_layer=1", "--preset=quick", "--jobs=2"
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert re.search(r"^\[\d/2\] pre_ln seed 1337 \.\.\. DIVERGED: step \d+: loss", proc.stdout, re.M), proc.stdout
    report = (tmp_path / "small/report.md").read_text()
    assert f"- preset quick: {PRESETS['quick'].note}\n" in report
    assert row(report, "pre_ln")[1:4] == ["—", "—", "—"] and row(report, "pre_ln")[6] == "yes (1/1)"
    assert "Not trained: pre_ln-s1337 diverged" in report


def test_unknown_variant_is_one_line(tmp_path):
    proc = run(["-m", "scripts.study", "configs/small.py", f"--study_dir={tmp_path}", "--variants=pre_ln,bogus"])
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: unknown variant 'bogus'; valid variants: pre_ln, post_ln, rmsnorm")
    assert not list(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize(
    "flag, needle",
    [
        ("--n_layr=3", "unknown config key 'n_layr'"),
        ("--norm_position=side", "norm_position must be one of pre, post, peri"),
        ("--questions=1,15", "--questions must be all, none or some of 1,2,3,4,5,6,7,8,9,10,11,12,13,14"),
        ("--seeds=-1", "--seeds must be a positive integer"),
        ("--name", "flag '--name' needs a value"),
        ("--jobs=two", "config key 'jobs' expects int, got 'two'"),
        ("config/other.py", "give one config file"),
        ("--preset=tpu", "preset must be one of cpu, quick, gpu"),
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
        True, "x", 3, "1,2,3,4,5,6,7,8,9,10,11,12,13,14", ["pre_ln", "rmsnorm"]
    )  # fmt: skip
    assert (config_file, user) == ("configs/small.py", ["--n_layer=3"])
    assert study.parse(["configs/small.py", "--questions=none"])[0].question_numbers == set()


def test_help_names_every_flag_variant_and_question(capsys):
    assert study_main(["configs/small.py", "--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--variants", "--seeds", "--questions", "--name", "--study_dir", "--reuse", "--jobs", "--preset"):
        assert f"  {flag} " in out, flag
    assert all(v in out for v in study.VARIANTS) and all(q.title in out for q in registry.QUESTIONS.values())
    assert all(f"  {p.name}: {p.note}" in out for p in PRESETS.values())
    assert not re.search(r"issue|#\d", out, re.I), out  # speaks of the project, not of its tracker


@needs_muon  # the default variants and questions 8-9 train with Muon
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


@needs_muon  # the default variants and questions 8-9 train with Muon
@pytest.mark.usefixtures("switches")
def test_every_run_decays_over_its_own_budget():
    """small.py ends its cosine at step 1000; the study's shorter runs must not inherit that schedule."""
    import train
    from gpt_residual.config import TrainConfig, parse_args

    jobs = study.plan(*study.parse(["configs/small.py"]))
    budgets = {PRESETS["cpu"].variant_iters, Q_BASE["max_iters"], DEEP_BASE["max_iters"]}
    assert {j.resolved["max_iters"] for j in jobs} == budgets
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
        job = Job(f"q-{name}", "q", 1337, [], rc=0, config=cfg)
        if loss == "diverged":
            job.rc, job.error = 1, "error: step 12: loss is not finite (nan); lower learning_rate"
        else:
            job.evals = [{"step": 300, "train_loss": loss + 0.04, "val_loss": loss}]
        q[name] = job
    return "\n".join(norm_questions.q1(Results(Path("unused"), None, {}, q, unigram, {})))


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
    for pos, diff in (("pre", 2.4715 - 2.4395), ("post", 3.1138 - 2.5787)):  # without minus with: worse without
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


# ----------------------------------------------------------------------------- questions 6-9


def val_curve(recs: list[dict]) -> list[tuple[float, float, float]]:
    """(step, training seconds, val loss) at each evaluation of a run's metrics.jsonl."""
    return [(r["step"], r["time"] - r["eval_time"], r["val_loss"]) for r in recs if "val_loss" in r]


def first_reach(points: list[tuple[float, float]], level: float) -> float:
    """Where a piecewise-linear curve first falls to level (the test's own computation)."""
    if points[0][1] <= level:
        return points[0][0]
    (x0, y0), (x1, y1) = next((a, b) for a, b in zip(points, points[1:]) if b[1] <= level)
    return x1 if y0 == y1 else x0 + (x1 - x0) * (y0 - level) / (y0 - y1)


@pytest.fixture(scope="module")
def tricks(tmp_path_factory, char_data) -> tuple[str, Path, float]:
    """One tiny study of questions 6-9 for the tests below: its report, its runs' folder, the unigram loss."""
    tmp_path = tmp_path_factory.mktemp("tricks")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        mp.chdir(ROOT)
        flags = ["--variants=pre_ln,rope,muon,modern", "--seeds=1", "--max_iters=20", "--name=t", "--jobs=2"]
        proc = study_py(tmp_path, char_data, *flags, "--questions=6,7,8,9")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "t"
    report = (out / "report.md").read_text()
    for name in ("q6_qk_norm_lr", "q7_scalars", "q8_muon", "q9_rope_modern"):
        assert (out / f"{name}.png").read_bytes().startswith(PNG) and f"![{name}]({name}.png)" in report, name
    return report, out / "runs", float(re.search(r"\(unigram\): (\d+\.\d+)", report).group(1))


@needs_muon  # the default variants and questions 8-9 train with Muon
def test_q6_from_the_runs_records(tricks):
    """Every cell is its run's last val loss; "trains at", the attention logits and the answer follow from them."""
    report, runs, unigram = tricks
    q6, ranges = section(report, "## Question 6:"), {}
    for setting, pos, qk in (("pre-LN", "pre", ""), ("pre-LN + qk_norm", "pre", "-qk"), ("post-LN", "post", "")):
        cells, ok = row(q6, setting), []
        for k, lr in enumerate(Q6_LRS):
            name = f"q-{pos}-warmup" if not qk and lr == Q_BASE["learning_rate"] else f"q-lr-{pos}{qk}-{lr:g}"
            recs = metrics_records(runs / name)
            loss = [r["val_loss"] for r in recs if "val_loss" in r][-1]
            assert float(cells[1 + k].split()[0]) == pytest.approx(loss, abs=6e-5), (setting, lr, cells)
            assert json.loads((runs / name / "config.json").read_text())["learning_rate"] == lr
            ok += [f"{lr:g}"] if loss < unigram - modern_questions.LEARNED else []
            assert cells[1 + k].endswith("✗") == (loss >= unigram - modern_questions.LEARNED)
            top = max([r for r in recs if "rms" in r][-1]["attn_logit_max"])
            assert float(row(q6.split("| largest attention logit")[1], setting)[1 + k]) == pytest.approx(top, abs=0.06)
        assert cells[-1] == (", ".join(ok) or "none")
        ranges[setting] = len(ok)
    answer = f"pre-LN: {{}} ({ranges['pre-LN + qk_norm']} of 3 with qk_norm, {ranges['pre-LN']} without)"
    assert re.search(re.escape(answer).replace(r"\{\}", r"[a-z ]+"), q6), q6


@needs_muon  # the default variants and questions 8-9 train with Muon
def test_q7_from_the_runs_records(tricks):
    """a_i, b_i, l_i per block are the run's last telemetry record."""
    report, runs, _ = tricks
    q7, tele = section(report, "## Question 7:"), [r for r in metrics_records(runs / "q-scalars") if "rms" in r]
    assert f"(step {tele[-1]['step']})" in q7 and len(tele) >= 10
    for i in range(Q_BASE["n_layer"]):
        want = [tele[-1][k][i] for k in ("resid_a", "resid_b", "v_lambda")]
        assert [float(c) for c in row(q7, str(i))[1:]] == pytest.approx(want, abs=6e-5), i
    assert tele[-1]["v_lambda"][0] == 0 and tele[-1]["resid_a"] != tele[0]["resid_a"]  # they moved


@needs_muon  # the default variants and questions 8-9 train with Muon
def test_q8_from_the_runs_records(tricks):
    """The level is the worse run's final val loss; steps, tokens and seconds to it, from the curves."""
    report, runs, _ = tricks
    q8, curves = section(report, "## Question 8:"), {}
    for name, variant in (("AdamW", "pre_ln"), ("Muon", "muon")):
        curves[name] = val_curve(metrics_records(runs / f"{variant}-s1337"))
    level = max(c[-1][2] for c in curves.values())
    assert f"Level: val loss {level:.4f}." in q8
    for name, c in curves.items():
        cells = row(q8, name)
        steps, secs = (first_reach([(p[x], p[2]) for p in c], level) for x in (0, 1))
        assert float(cells[1]) == pytest.approx(steps, abs=0.06) and float(cells[3]) == pytest.approx(secs, abs=0.06)
        assert float(cells[2].replace(",", "")) == pytest.approx(steps * 4 * 16, abs=4)  # tokens: x batch x block
        assert float(cells[5]) == pytest.approx(c[-1][2], abs=6e-5)
    muon_cfg = json.loads((runs / "muon-s1337/config.json").read_text())
    assert muon_cfg["optimizer"] == "muon" and metrics_records(runs / "pre_ln-s1337")[0]


@needs_muon  # the default variants and questions 8-9 train with Muon
def test_q9_from_the_runs_records(tricks):
    """Final val losses and their differences; the run that stopped first is at its own final loss at t."""
    report, runs, _ = tricks
    q9 = section(report, "## Question 9:")
    curves = {v: val_curve(metrics_records(runs / f"{v}-s1337")) for v in ("pre_ln", "rope", "modern")}
    first = min(curves, key=lambda v: curves[v][-1][1])
    assert float(row(q9, first)[4]) == pytest.approx(curves[first][-1][2], abs=6e-5)
    for v, c in curves.items():
        assert float(row(q9, v)[1]) == pytest.approx(c[-1][2], abs=6e-5)
    for v in ("rope", "modern"):
        assert f"- {v} minus pre_ln: final val loss {curves[v][-1][2] - curves['pre_ln'][-1][2]:+.4f} nats" in q9
    modern = json.loads((runs / "modern-s1337/config.json").read_text())
    assert {k: modern[k] for k in study.MODERN} == study.MODERN


def fake_run(name: str, config: dict, losses: list[float], every: int = 10) -> Job:
    evals = [
        {"step": i * every, "time": 2.0 * i * every + 1, "eval_time": 1.0, "train_loss": x, "val_loss": x}
        for i, x in enumerate(losses)
    ]
    return Job(name, "q", 1337, [], rc=0, config=config, evals=evals)


def test_reach_and_at_interpolate_between_evaluations():
    job = fake_run("x", {"batch_size": 4, "block_size": 8}, [4.0, 3.0, 2.0, 2.5])
    assert modern_questions.reach(job, 2.5, "step") == 15 and modern_questions.reach(job, 2.5, "tokens") == 15 * 32
    assert modern_questions.reach(job, 2.5, "seconds") == 30  # 2 s per step, eval time left out
    assert modern_questions.reach(job, 4.5, "step") == 0 and math.isnan(modern_questions.reach(job, 1.9, "step"))
    assert modern_questions.at(job, 5, "step") == 3.5 and math.isnan(modern_questions.at(job, 31, "step"))


@pytest.mark.parametrize(
    "post_plain, post_qk, answer",
    [
        ([2.6, 3.3, 3.34], [2.6, 2.7, 3.34], "post-LN: widens (2 of 3 with qk_norm, 1 without)"),
        ([2.6, 3.3, 3.34], [2.6, 3.2, 3.34], "post-LN: same range (1 of 3 with qk_norm, 1 without)"),
        ([2.6, 2.7, 3.34], [2.6, "diverged", 3.34], "post-LN: narrows (1 of 3 with qk_norm, 2 without)"),
        ([2.6, 2.7, 3.34], [2.6, "missing", 3.34], "post-LN: incomplete (no run at learning rate 0.003)"),
    ],
)
def test_q6_range_is_the_learning_rates_that_train(post_plain, post_qk, answer):
    q = {}
    for pos, qk, losses in (("pre", False, [2.4] * 3), ("pre", True, [2.4] * 3), ("post", False, post_plain),
                            ("post", True, post_qk)):  # fmt: skip
        for lr, loss in zip(Q6_LRS, losses):
            if loss == "missing":  # not run: not counted as "did not train"
                continue
            job = fake_run(f"lr-{pos}-{qk}-{lr}", {"norm_position": pos, "qk_norm": qk, "learning_rate": lr}, [loss])
            if loss == "diverged":
                job.rc, job.error, job.evals = 1, "error: step 9: loss is not finite (nan)", []
            q[job.name] = job
    text = "\n".join(modern_questions.q6(Results(Path("unused"), None, {}, q, 3.3473, {})))
    assert f"**pre-LN: same range (3 of 3 with qk_norm, 3 without); {answer}**" in text, text
    assert "post-LN, final val loss with qk_norm minus without where both train: +0.0000 at 0.001" in text


@needs_muon  # the default variants and questions 8-9 train with Muon
@pytest.mark.usefixtures("switches")
def test_the_gpu_preset_studies_gpt2_small_width_on_bpe_shakespeare():
    """python -m scripts.study configs/study_gpu.py --preset=gpu: every run, variants and questions alike, is
    768 wide on the BPE data and uncompiled, 12 layers but for the depth questions' (6 to 24); the CPU study's
    questions keep their narrow models."""
    jobs = study.plan(*study.parse(["configs/study_gpu.py", "--preset=gpu"]))
    shapes = {(j.resolved["n_embd"], j.resolved["dataset"], j.resolved["compile"]) for j in jobs}
    assert shapes == {(768, "shakespeare", False)}
    assert {j.resolved["n_layer"] for j in jobs if not j.run.startswith(("d", "lr"))} == {12}
    assert {j.resolved["n_layer"] for j in jobs} == {6, 12, 24}  # the preset leaves out the 48-layer runs
    assert {j.group for j in jobs} >= {"q", "pre_ln", "modern"}
    cpu = study.plan(*study.parse(["configs/small.py"]))
    assert {j.resolved["n_embd"] for j in cpu if j.group == "q"} == {64, 32}  # questions 1-9, 10-14


@needs_muon  # the default variants and questions 8-9 train with Muon
@pytest.mark.usefixtures("switches")
def test_dry_run_lists_the_runs_and_their_cost_and_runs_nothing(tmp_path, capsys):
    """--dry_run: one line per run (steps, tokens, its seconds by the cost model) and the totals with the
    estimated time, from the same plan the study runs; no folder."""
    argv = ["configs/study_gpu.py", "--preset=gpu", f"--study_dir={tmp_path / 'studies'}", "--dry_run=True"]
    assert study_main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    jobs = study.plan(*study.parse(argv))
    assert len(out) == len(jobs) + 1 and not (tmp_path / "studies").exists()
    trained = [j.resolved for j in jobs if not j.probe]
    steps = sum(c["max_iters"] for c in trained)
    tokens = sum(c["max_iters"] * c["batch_size"] * c["block_size"] for c in trained)
    probes, inspected = len(jobs) - len(trained), sum(bool(j.inspect) for j in jobs)
    minutes = study.estimate(jobs, 8, gpu=True)
    assert out[-1] == (
        f"{len(jobs)} runs ({probes} probes, {inspected} inspected): {steps:,} steps, {tokens / 1e6:.1f}M tokens; "
        f"estimated {minutes:.0f} min, 8 at a time on one GPU (cost model: scripts/study/presets.py)"
    )
    assert re.fullmatch(r"  pre_ln-init +probe +0\.00M tokens +\d+\.\d s", out[0]), out[0]
    k = next(k for k, j in enumerate(jobs) if j.inspect)
    secs = presets.run_seconds(jobs[k].resolved, False, jobs[k].inspect, study.vocab_size(jobs[0].resolved), True)
    steps = jobs[k].resolved["max_iters"]
    assert re.fullmatch(rf"  {jobs[k].name} +{steps} steps \+ inspect +[\d.]+M tokens +{secs:.1f} s", out[k])
