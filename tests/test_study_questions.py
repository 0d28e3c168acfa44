"""The study's questions 10-14, their statistics and their planner, on synthetic results whose answer is known
(no run trains here: the sections read Jobs built by hand, as a real study's would look)."""

import json
import math

import pytest
from conftest import needs_muon
from study_switches import switches  # noqa: F401  (a fixture: the switch keys, where this checkout lacks them)

from scripts.study import depth_questions, depth_runs, execute, presets, stats, switch_questions
from scripts.study import runner as study
from scripts.study.depth_runs import DEEP_BASE, DEPTH, LR_GRID, LR_SWEEP, STABILITY, SWITCH
from scripts.study.job import Job
from scripts.study.presets import PRESETS
from scripts.study.results import Results

SEEDS = (1337, 1338, 1339)
NOISE = (0.0, 0.01, -0.01)  # each seed's offset: the same in every arm, as seeds with one data order would be

# ----------------------------------------------------------------------------- statistics


def test_welch_matches_a_worked_example():
    """a = 0, 1, 2 and b = 3, 4, 5: means 1 and 4, variances 1, standard error sqrt(2/3), t = 3.674 on
    Welch-Satterthwaite df = 4; t(0.975, 4) = 2.7764, so the interval is 3 +- 2.267 and p = 0.0213."""
    c = stats.welch([0, 1, 2], [3, 4, 5])
    assert c.diff == 3 and c.n == (3, 3)
    assert (c.lo, c.hi) == pytest.approx((3 - 2.7764 * math.sqrt(2 / 3), 3 + 2.7764 * math.sqrt(2 / 3)), abs=1e-4)
    assert c.p == pytest.approx(0.0213, abs=1e-4)
    flipped = stats.welch([3, 4, 5], [0, 1, 2])
    assert (flipped.diff, flipped.p) == (-3, c.p)
    assert stats.verdict(c) == "higher" and stats.verdict(flipped) == "lower"
    assert stats.describe(c) == "+3.0000 nats [+0.7330, +5.2670], p = 0.021 (3 vs 3 seeds)"
    # unequal variances: b = 3, 5, 7, 9 (variance 20/3), standard error sqrt(1/3 + 5/3), t = 3.5355 on df = 4.0755
    # (Welch-Satterthwaite), p = 0.0234 and t(0.975, 4.0755) x se = 3.898; Student's pooled test would say 0.0262
    c = stats.welch([0, 1, 2], [3, 5, 7, 9])
    assert (c.diff, c.p, c.hi - c.diff) == pytest.approx((5, 0.02338, 3.898), abs=1e-4) and c.n == (3, 4)


def test_welch_leaves_out_what_did_not_finish_and_says_when_it_cannot_test():
    c = stats.welch([1.0, float("nan"), 1.2], [1.1, None, 1.3, 1.2])  # a diverged seed has no final value
    assert c.n == (2, 3) and c.diff == pytest.approx(0.1) and math.isfinite(c.p)
    one = stats.welch([1.0], [2.0, 2.1])
    assert one.diff == pytest.approx(1.05) and not one.testable
    assert stats.verdict(one) == "not testable (too few finite seeds)"
    assert "too few for an interval" in stats.describe(one)
    assert stats.verdict(stats.welch([1.0, 1.1, 0.9], [1.0, 1.12, 0.91])) == "no detectable difference at this budget"
    assert stats.verdict(stats.welch([], [1.0, 2.0])).startswith("not testable")


def test_holm_adjusts_in_order_and_stays_monotone():
    """0.01, 0.04, 0.03 of three tests: 3 x 0.01 = 0.03, then 2 x 0.03 = 0.06, then max(0.06, 1 x 0.04)."""
    assert stats.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    adj = stats.holm([0.2, float("nan"), 0.001])
    assert adj[0] == pytest.approx(0.2) and math.isnan(adj[1]) and adj[2] == pytest.approx(0.002)


# ----------------------------------------------------------------------------- synthetic runs


def fake(run, seed: int, loss: float = 2.6, **fields) -> Job:
    """One seed of a question's run that ended at val loss `loss` (NAN: it diverged)."""
    L = run.overrides.get("n_layer", 12)
    cfg = dict(n_layer=L, n_embd=32, batch_size=16, block_size=64, max_iters=200, learning_rate=3e-3 * run.lr_scale)
    cfg |= dict(warmup_iters=50, log_interval=5, telemetry_interval=10, muon_lr=0.02)
    job = Job(f"q-{run.name}-s{seed}", "q", seed, [], run=run.name, rc=0, config=cfg, **fields)
    if math.isnan(loss):
        job.rc, job.error = 1, "error: step 50: loss is not finite (nan)"
    else:
        job.evals = [{"step": 200, "train_loss": loss, "val_loss": loss, "time": 10.0, "eval_time": 1.0}]
    return job


def results(jobs: dict[str, list[Job]], unigram: float = 3.35) -> Results:
    return Results(None, None, {}, {k: v[0] for k, v in jobs.items()}, unigram, {}, jobs)


def section(fn, jobs) -> str:
    return "\n".join(fn(results(jobs)))


def answer(text: str) -> str:
    return next(ln for ln in text.splitlines() if ln.startswith("- Answer")).split("**")[1]


# ----------------------------------------------------------------------------- question 10


def skip_deltas(L: int, late: float, k: int) -> list[dict]:
    """Block i's loss increase when skipped: 1 in the earlier half, `late` in the later (times a seed factor)."""
    return [
        {"block": i, "skip_loss_delta": 1.0 if i < L // 2 else late * (1 + 0.05 * k), "angular_distance": 0.3}
        for i in range(L)
    ]


@pytest.mark.parametrize("late_at_48, change", [(0.1, "falls"), (1.0, "no detectable change at this budget")])
def test_q10_finds_the_later_layers_that_stop_mattering_and_what_restores_them(late_at_48, change):
    """pre-LN's later half matters as much as the earlier at 6 layers and (when late_at_48 = 0.1) a tenth as
    much at 48; LayerNorm Scaling keeps it even at 48; every other arm is pre-LN's profile."""
    jobs = {}
    for (arm, L), run in DEPTH.items():
        late = 1.0 if L == 6 or arm == "LayerNorm Scaling" else late_at_48 if L == 48 else 0.5
        jobs[run.name] = [
            fake(run, s, 2.6 + NOISE[k], inspection={"layers": skip_deltas(L, late, k)}) for k, s in enumerate(SEEDS)
        ]
    text = section(depth_questions.q10, jobs)

    def share(late: float) -> str:  # the later half's share over the seeds: L/2 blocks of 1, L/2 of late
        return "{:.4f} ± {:.4f}".format(
            *stats.mean_sd(late * (1 + 0.05 * k) / (1 + late * (1 + 0.05 * k)) for k in range(3))
        )

    assert f"| pre-LN | {share(1.0)} | {share(0.5)} | {share(0.5)} | {share(late_at_48)} |" in text
    assert f"| LayerNorm Scaling | {share(1.0)} | {share(1.0)} | {share(1.0)} | {share(1.0)} |" in text
    words = answer(text)
    assert words.startswith(f"pre-LN's later half's share of the skip loss from 6 to 48 layers: {change} (")
    if change == "falls":  # against pre-LN's fallen share, LayerNorm Scaling's even one is detected
        assert "higher than pre-LN's (restores the later layers): LayerNorm Scaling;" in words
        assert "no detectable difference at this budget: post-LN, peri-LN, Mix-LN, DeepNorm, mHC, no residual" in words
    else:
        assert "higher than pre-LN's (restores the later layers): none" in words
    assert "| 6 layers | 12 layers | 24 layers | 48 layers |" in text and "Curse of Depth" in text


def test_q10_reports_what_it_could_not_measure():
    """A run without an inspection, and a diverged one, are dashes and counted, not zeros."""
    jobs = {run.name: [fake(run, s) for s in SEEDS] for run in DEPTH.values()}
    jobs[DEPTH["post-LN", 48].name] = [fake(DEPTH["post-LN", 48], s, float("nan")) for s in SEEDS]
    jobs[DEPTH["pre-LN", 6].name][0].inspect_error = "error: cannot read ckpt.pt"
    del jobs[DEPTH["mHC", 48].name]  # a preset left it out
    text = section(depth_questions.q10, jobs)
    assert "- Not run in this study (its preset leaves them out, docs/norms.md says why): mHC at 48 layers\n" in text
    assert "not run or not testable: post-LN, peri-LN, Mix-LN, DeepNorm, LayerNorm Scaling, mHC, no residual" in text
    assert "- Not measured (the inspection failed: runs/<name>/inspect.log): q-d6-pre-s1337\n" in text
    assert "| post-LN | 2.6000 ± 0.0000 (3/3) | 2.6000 ± 0.0000 (3/3) | 2.6000 ± 0.0000 (3/3) | — (0/3) |" in text
    assert "| pre-LN | — | — | — | — |" in text  # no inspection: no share
    assert "not testable (too few finite seeds)" in answer(text)


# ----------------------------------------------------------------------------- question 11


def test_q11_answers_each_switch_on_each_baseline():
    """On (a) the gate lowers the loss by 0.1 and DyT raises it by 0.1; on (b) the gate does nothing and DyT
    raises it: the verdict differs between the baselines for the gate alone."""
    effect = {("(a)", "gated attention"): -0.1, ("(a)", "DyT"): 0.1, ("(b)", "DyT"): 0.1}
    jobs = {}
    for (b, s), run in SWITCH.items():
        d = effect.get((b.split()[0], s), 0.0)
        jobs[run.name] = [fake(run, seed, 2.6 + d + NOISE[k]) for k, seed in enumerate(SEEDS)]
    text = section(switch_questions.q11, jobs)
    assert answer(text) == (
        "(a) lower with gated attention, higher with DyT; (b) lower with none, higher with DyT; "
        "the verdict differs between the baselines for gated attention"
    )
    gate = next(ln for ln in text.splitlines() if ln.startswith("| gated attention |"))
    assert "-0.1000 nats [" in gate and gate.endswith("| lower |")
    assert "Qiu et al. 2025" in text and "Where this scale cannot speak" in text


# ----------------------------------------------------------------------------- question 12


def acts(steps: range, L: int, end_ratio: float) -> list[dict]:
    """Telemetry whose largest top/median ratio grows linearly from 5 at step 0 to end_ratio, in block 1."""
    last = steps[-1]
    return [
        {"step": t, "act_median": [0.5] * L, "act_top": [2.0] * L}
        | {"act_top": [2.0, 0.5 * (5 + (end_ratio - 5) * t / last)] + [2.0] * (L - 2)}
        for t in steps
    ]


def test_q12_finds_who_grows_massive_activations_and_who_removes_them():
    """Baseline (a) and its switches grow the ratio from 5 to ~50 but the gate keeps it at ~5; baseline (b)
    and its switches keep it at ~5."""
    jobs = {}
    for (b, s), run in SWITCH.items():
        end = 5.0 if b.startswith("(b)") or s == "gated attention" else 50.0
        tele = [acts(range(0, 201, 20), 12, end * (1 + NOISE[k])) for k in range(3)]
        jobs[run.name] = [fake(run, seed, tele=tele[k]) for k, seed in enumerate(SEEDS)]
    text = section(switch_questions.q12, jobs)
    words = answer(text)
    grows, lowered = words.split("; lower than their baseline at the end: ")
    assert "(a) pre-LN, AdamW, GPT-2 init" in grows and "(a) + DyT" in grows and "gated attention" not in grows
    assert "(b)" not in grows
    assert (
        lowered.startswith("(a) + gated attention;")
        and "the largest ratio of any run is 50.5, below the 1000x" in words
    )
    row = next(ln for ln in text.splitlines() if ln.startswith("| (a) + gated attention |"))
    assert "| 1, 1, 1 |" in row  # the block of the largest ratio, per seed


# ----------------------------------------------------------------------------- question 13


def losses(values: list[float], every: int = 10) -> list[dict]:
    return [{"step": k * every, "loss": x, "ms_per_step": 40.0} for k, x in enumerate(values)]


def test_spikes_count_excursions_above_the_best_loss_so_far():
    run = STABILITY["HC"]
    job = fake(run, 1, trains=losses([3.0, 2.5, 2.4, 2.9, 3.0, 2.3, 2.2, 2.6, 2.3]))
    assert switch_questions.spikes(job, after=0) == 2  # 2.9 and 3.0 are one excursion, 2.6 another
    assert switch_questions.spikes(job, after=35) == 1  # the first one is inside the warmup
    assert math.isnan(switch_questions.spikes(Job("x", "q", 1, [], rc=2, error="error: no data"), after=0))


def test_q13_compares_hc_and_mhc_gain_spikes_and_loss():
    gains = {"pre-LN": None, "HC": (3000.0, 2500.0, 3500.0), "mHC": (1.0, 1.01, 1.02)}
    jobs = {}
    for arm, run in STABILITY.items():
        seeds = []
        for k, seed in enumerate(SEEDS):
            g = gains[arm][k] if gains[arm] else None
            tele = [{"step": t, "hc_gain": None if g is None else 1 + (g - 1) * t / 200} for t in range(0, 201, 10)]
            curve = [3.0, 2.5, 2.4, 2.9, 2.3, 2.2, 2.8, 2.1] if arm == "HC" else [3.0, 2.5, 2.4, 2.3, 2.2, 2.1, 2.0]
            seeds.append(fake(run, seed, (2.9 if arm == "HC" else 2.6) + NOISE[k], tele=tele, trains=losses(curve)))
        jobs[run.name] = seeds
    text = section(switch_questions.q13, jobs)
    assert answer(text) == (
        "composite gain (max over training): lower with mHC; spikes: fewer with mHC; final val loss: lower with mHC"
    )
    assert "pre-LN trains here (final val loss more than 0.5 nats below the unigram loss) in 3 of 3 seeds" in text
    assert "Setup: question 11's model (a) at peak learning rate 0.01, 3.33x its usual, pre-LN, HC and mHC" in text
    assert "| HC | 2.9000 ± 0.0100 | 0/3 | 1.0000 ± 0.0000 | 3000.0000 ± 500.0000 | 3000.0000 ± 500.0000 |" in text


# ----------------------------------------------------------------------------- question 14


@pytest.mark.parametrize("deep_best_without", [1, 2])
def test_q14_says_how_far_the_best_learning_rate_moved_with_and_without_depth_scaling(deep_best_without):
    """With depth_scaling the 3rd learning rate is best at 6 and 24 layers; without it the best moves to the
    2nd at 24 (and the 6-layer best costs 0.1 there), or stays."""
    best = {(6, False): 2, (6, True): 2, (24, False): deep_best_without, (24, True): 2}
    jobs = {}
    for (d, scaled, x), run in LR_SWEEP.items():
        k = LR_GRID.index(x)
        loss = 2.5 + 0.1 * abs(k - best[d, scaled])
        jobs[run.name] = [fake(run, s, loss + NOISE[i]) for i, s in enumerate(SEEDS)]
    text = section(depth_questions.q14, jobs)
    assert "- With depth_scaling: best lr 0.01 at 6 layers, 0.01 at 24 (0 grid steps); the same\n" in text
    if deep_best_without == 2:
        assert answer(text).startswith("the best learning rate did not move on this grid, with depth_scaling or")
        return
    assert answer(text) == "the optimum moved less with depth_scaling (0 vs 1 grid steps)"
    assert "- Without depth_scaling: best lr 0.01 at 6 layers, 0.003 at 24 (1 grid steps); at 24 layers" in text
    assert "the base depth's best minus the deep best: +0.1000 nats [" in text and "a detectable cost" in text
    assert "| 24 layers, with | 2.7000 ± 0.0100 | 2.6000 ± 0.0100 | 2.5000 ± 0.0100 | 2.6000 ± 0.0100 | 0.01 |" in text


# ----------------------------------------------------------------------------- the planner


@needs_muon  # baseline (b) trains with Muon
@pytest.mark.usefixtures("switches")
def test_the_new_questions_plan_every_arm_with_the_same_seeds_once():
    jobs = study.plan(*study.parse(["configs/small.py", "--questions=10,11,12,13,14", "--variants=pre_ln"]))
    q = [j for j in jobs if j.group == "q"]
    by_run = {}
    for j in q:
        by_run.setdefault(j.run, []).append(j)
    made = {r.name for r in depth_runs.RUNS} - set(PRESETS["cpu"].leave_out)
    assert set(by_run) == made and PRESETS["cpu"].leave_out == ("d48-mhc",)
    assert all(sorted(j.seed for j in js) == list(SEEDS) for js in by_run.values())  # one data order per seed
    assert len(q) == len({j.name for j in q}) == 3 * len(made)  # a shared run is made once per seed
    assert SWITCH["(a) pre-LN, AdamW, GPT-2 init", "baseline"] is DEPTH["pre-LN", 12]
    assert {j.run for j in q if j.inspect} == {r.name for r in DEPTH.values()} - {"d48-mhc"}
    assert {j.inspect for j in q} == {0, PRESETS["cpu"].inspect_batches}
    c = {j.run: j.resolved for j in q if j.seed == SEEDS[0]}
    assert c["d48-pre"]["n_layer"] == 48 and c["d24-mhc"]["hyper_connections"] == "mhc"
    assert (c["sw-b-hc"]["optimizer"], c["sw-b-hc"]["residual_scalars"], c["sw-b-gate"]["residual_scalars"]) == (
        "muon", False, True)  # fmt: skip
    dyt = [(c[f"sw-{b}-dyt"]["norm"], c[f"sw-{b}-dyt"]["qk_norm"], c[f"sw-{b}-dyt"]["embed_norm"]) for b in "ab"]
    assert dyt == [("dyt", False, False)] * 2 and c["sw-b-gate"]["qk_norm"] and c["sw-b-mix"]["embed_norm"]
    cp = c["lr24-cp-x10"]
    assert (cp["learning_rate"], cp["min_lr"], cp["depth_scaling"], cp["base_depth"]) == (0.03, 0.003, 1.0, 6)
    assert c["lr6-sp-x0.333"]["learning_rate"] == 0.001 and c["lr6-sp-x0.333"]["depth_scaling"] == 0
    assert (c["st-hc"]["learning_rate"], c["st-hc"]["log_interval"], c["st-hc"]["telemetry_interval"]) == (0.01, 5, 10)
    assert all(c[r]["n_embd"] == 32 and c[r]["max_iters"] == DEEP_BASE["max_iters"] == 150 for r in made)
    only = study.plan(*study.parse(["configs/small.py", "--questions=13", "--variants=pre_ln"]))
    assert {j.run for j in only if j.group == "q"} == {r.name for r in STABILITY.values()}


@needs_muon
@pytest.mark.usefixtures("switches")
def test_the_quick_preset_asks_the_same_questions_smaller():
    jobs = [j for j in study.plan(*study.parse(["configs/small.py", "--preset=quick"])) if j.group == "q"]
    deep = [j for j in jobs if j.run in {r.name for r in depth_runs.RUNS}]
    assert {j.seed for j in deep} == set(SEEDS[:2]) and max(j.resolved["n_layer"] for j in deep) == 24
    assert {j.resolved["max_iters"] for j in deep} == {40} and {j.inspect for j in deep} == {0, 2}
    assert {j.resolved["max_iters"] for j in jobs if j not in deep} == {50}
    full = {j.run for j in study.plan(*study.parse(["configs/small.py"])) if j.group == "q"}
    left_out = full - {j.run for j in jobs}
    assert left_out == {r.name for (_, L), r in DEPTH.items() if L == 48} - {"d48-mhc"} | {"d24-mhc"}


@needs_muon
@pytest.mark.usefixtures("switches")
@pytest.mark.parametrize("preset, config_file", [("cpu", "configs/small.py"), ("quick", "configs/small.py"),
                                                 ("gpu", "configs/study_gpu.py")])  # fmt: skip
def test_each_preset_fits_its_budget_by_the_cost_model(preset, config_file):
    """The whole study of each preset, estimated by presets.py's cost model, within what it promises (90 min on
    2 CPU cores; 15 min for quick; 15 min on one GPU): a plan that outgrows it fails here."""
    jobs = study.plan(*study.parse([config_file, f"--preset={preset}"]))
    minutes = study.estimate(jobs, 8 if preset == "gpu" else 2, gpu=preset == "gpu")
    assert 0.3 * presets.PRESETS[preset].budget_min < minutes <= presets.PRESETS[preset].budget_min, minutes


def test_the_cost_model_counts_flops_steps_and_start_up():
    """12 x 32, 16 x 64 tokens, vocabulary 65: 6 * 1024 * (12 * (12 * 32^2 + 2 * 64 * 32) + 32 * 65) FLOPs a
    step; 100 steps and 5 evaluations of 2 x 10 forward batches (a third of a step each); at 30 GFLOP/s."""
    c = dict(n_embd=32, block_size=64, n_layer=12, batch_size=16, max_iters=100, eval_interval=25, eval_iters=10)
    flops = 6 * 1024 * (12 * (12 * 32**2 + 2 * 64 * 32) + 32 * 65)
    want = presets.START["train"] + flops * (100 + 5 * 10 * 2 / 3) / presets.CPU_RATE[32]
    assert presets.run_seconds(c, False, 0, 65, gpu=False) == pytest.approx(want)
    muon = presets.run_seconds(c | {"optimizer": "muon"}, False, 0, 65, gpu=False)
    assert muon - presets.START["train"] == pytest.approx((want - presets.START["train"]) * presets.MUON_CPU)
    inspected = presets.run_seconds(c, False, 4, 65, gpu=False)
    assert inspected - want == pytest.approx(presets.START["inspect"] + flops * 14 * 4 / 3 / presets.CPU_RATE[32])
    assert presets.cpu_rate(45) == pytest.approx(math.exp((math.log(30e9) + math.log(27e9)) / 2), rel=0.02)
    mhc = presets.run_seconds(c | {"hyper_connections": "mhc"}, False, 0, 65, gpu=False) - presets.START["train"]
    assert mhc == pytest.approx((want - presets.START["train"]) * 10)  # measured at 32 wide: 10 pre-LN steps
    wide = c | {"n_embd": 128}
    plain, streams = (
        presets.run_seconds(wide | x, False, 0, 65, gpu=False) - 3.0 for x in ({}, {"attn_residuals": "full"})
    )
    assert streams / plain == pytest.approx(1 + 3.5 * 32 / 128)  # the extra part shrinks as 1 / width


@pytest.mark.parametrize("lacks", ["scripts.inspect", "scipy"])
def test_a_study_checks_what_it_needs_before_it_runs(monkeypatch, lacks):
    """The runs question 10 inspects need python -m scripts.inspect; every report needs scipy."""
    jobs = [Job("q-d6-pre-s1", "q", 1, [], inspect=4), Job("pre_ln-s1", "pre_ln", 1, [])]
    find_spec = execute.importlib.util.find_spec
    monkeypatch.setattr(execute.importlib.util, "find_spec", lambda name: None if name == lacks else find_spec(name))
    why = "statistics need scipy .*: pip install scipy" if lacks == "scipy" else "q-d6-pre-s1 and 0 more runs are "
    with pytest.raises(
        execute.StudyError, match=why + ("" if lacks == "scipy" else "measured by python -m scripts.inspect")
    ):
        execute.check_instruments(jobs)
    if lacks == "scipy":
        with pytest.raises(execute.StudyError, match="scipy"):
            execute.check_instruments(jobs[1:])
    else:
        execute.check_instruments(jobs[1:])  # nothing to inspect: nothing else needed


def test_a_job_reads_its_inspection(tmp_path):
    (tmp_path / "study.json").write_text(json.dumps(dict(rc=0, error="", wall=1.0, inspect_error="")))
    layers = [{"block": 0, "skip_loss_delta": 0.5, "angular_distance": 0.2}]
    (tmp_path / "inspect.json").write_text(json.dumps({"n_layer": 1, "layers": layers}))
    job = Job("q-d6-pre-s1", "q", 1, [], inspect=4)
    job.read(tmp_path)
    assert job.inspection["layers"] == layers and depth_questions.layers(job, "skip_loss_delta") == [0.5]
    assert depth_questions.late_share(job) == 1.0  # one block: it is the later half
    deltas = [1.0, -0.5, 0.5, -0.2]  # skipping blocks 1 and 3 lowers the loss: they count 0, not less
    job.inspection = {"layers": [{"block": i, "skip_loss_delta": x} for i, x in enumerate(deltas)]}
    assert depth_questions.late_share(job) == pytest.approx(0.5 / 1.5)
    job.rc = 1  # a run that diverged was not measured
    assert depth_questions.layers(job, "skip_loss_delta") == [] and math.isnan(depth_questions.late_share(job))
