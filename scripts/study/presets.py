"""The study's presets (--preset) and its cost model (what --dry_run estimates and the report compares with
the time a study took).

A preset sizes the same plan: every preset asks every question with the same runs; it changes the seeds per
arm, the steps, and the width of the questions' models. Imports nothing of the study.

The cost model: a run costs its process start-up plus the floating-point work of its steps at a measured
rate. Work per step = 6 x tokens per step x (n_layer x (12 C^2 + 2 T C) + C V) (forward and backward of the
blocks' matrices and attention scores, and of the head; C width, T context, V vocabulary), times a factor for
what else the run does (evaluations, telemetry steps, a probe, an inspection) counted in step-equivalents.
The rates are measured constants: one CPU thread running train.py at the study's shapes (median ms/step,
2-core Xeon, torch 2.13, OMP_NUM_THREADS=1, best of 3 on a shared machine), and a GPU rate that is an
assumption until a GPU study reports its time (the report prints the estimate beside the time it took).
"""

import math
from dataclasses import dataclass, field

# FLOP/s of one CPU thread on the blocks' work, measured at these widths (train.py, batch 16 x 64 tokens
# for 32 and 64 wide, 24 x 64 for 128: 12 x 32 at 40.6 ms/step, 6 x 32 at 21.8, 24 x 32 at 82, 12 x 64 at
# 159, 2 x 128 at 57); between two widths, log-linear; outside, the nearest
CPU_RATE = {32: 30e9, 64: 27e9, 128: 69e9}
GPU_RATE = 150e12  # FLOP/s of one GPU shared by several runs, bf16, uncompiled: an assumption (not measured)
MUON_CPU = 1.9  # a Muon step costs this many AdamW steps on a CPU (bfloat16 Newton-Schulz; measured at 2 x 128)
# a step with these switches costs this many plain pre-LN steps at 32 wide (12 x 32 on one CPU thread, train.py,
# telemetry off, alternating, 2 rounds on a loaded machine: pre-LN 118-128 ms, HC 406-770, mHC 1128-1323 (20
# Sinkhorn-Knopp iterations per sub-layer), Attention Residuals (full) 526-565). Their extra work is elementwise
# on the streams (~C per token) where a block's is ~C^2, so at width C the extra part is counted x 32 / C
SWITCH_COST = {("hyper_connections", "hc"): 4.5, ("hyper_connections", "mhc"): 10.0}
SWITCH_COST |= {("attn_residuals", "full"): 4.5, ("attn_residuals", "block"): 4.5}
SWITCH_WIDTH = 32  # the width SWITCH_COST was measured at
START = {"train": 3.0, "inspect": 2.5}  # seconds a process needs before its first step (python + torch import)
START_GPU = 8.0  # the same on a GPU, CUDA's initialisation included (an assumption)
SHARED_CPU = 1.15  # two runs at once on two cores share memory bandwidth: each step a little slower


@dataclass(frozen=True)
class Preset:
    """How big the study is: seeds, steps, and the questions' models."""

    name: str
    seeds: int  # seeds per arm: every variant and every seeded question run (--seeds overrides)
    variant_iters: int  # max_iters of the variants (--max_iters overrides)
    q: dict = field(default_factory=dict)  # on top of Q_BASE: the 12-layer model of questions 1-9
    deep: dict = field(default_factory=dict)  # on top of DEEP_BASE: the narrow models of questions 10-14
    max_depth: int = 0  # questions 10-14 leave out their runs deeper than this (0: none left out)
    inspect_batches: int = 2  # val batches python -m scripts.inspect measures a run on (question 10)
    leave_out: tuple = ()  # runs of questions 10-14 (by name) this preset does not make: the report says so
    budget_min: int = 90  # what it is sized for, in minutes, on its machine
    machine: str = "a 2-core CPU, two runs at a time (--jobs=2)"
    note: str = ""  # the report's header line about it


PRESETS = {
    # mHC's step costs about 10 pre-LN steps at 32 wide on a CPU (its Sinkhorn-Knopp iterations): at 48 layers
    # it alone would take a sixth of the study, so the CPU presets leave it out at their deepest depth
    "cpu": Preset(
        "cpu",
        seeds=3,
        variant_iters=500,
        leave_out=("d48-mhc",),
        note="the full study (mHC at 48 layers left out: its step costs about 10 pre-LN steps on a CPU)",
    ),
    "quick": Preset(
        "quick",
        seeds=2,
        variant_iters=50,
        q=dict(n_embd=32, n_head=2, max_iters=50, warmup_iters=10, eval_iters=5),
        deep=dict(max_iters=40, warmup_iters=10, eval_iters=5),
        max_depth=24,
        leave_out=("d24-mhc",),
        budget_min=15,
        note="QUICK preset: fewer steps (variants 50, questions 1-9 50, questions 10-14 40), 2 seeds per arm, "
        "questions 1-9 at 32 wide, no 48-layer runs nor mHC at 24: rougher answers and weaker tests than --preset=cpu",
    ),
    "gpu": Preset(
        "gpu",
        seeds=3,
        variant_iters=100,
        q=dict(n_embd=768, n_head=12, batch_size=32, max_iters=60, warmup_iters=15),
        deep=dict(n_embd=768, n_head=12, max_iters=50, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4),
        max_depth=24,
        budget_min=15,
        machine="one GPU, 8 runs at a time, with configs/study_gpu.py",
        note="GPU preset: GPT-2 small's width (768) for every question, fewer steps (variants 100, questions "
        "1-9 60, questions 10-14 50), no 48-layer runs",
    ),
}


def cpu_rate(width: int) -> float:
    """CPU_RATE at this width (log-linear between the measured widths, the nearest outside them)."""
    pts = sorted(CPU_RATE.items())
    if width <= pts[0][0]:
        return pts[0][1]
    for (w0, r0), (w1, r1) in zip(pts, pts[1:]):
        if width <= w1:
            t = math.log(width / w0) / math.log(w1 / w0)
            return math.exp(math.log(r0) + t * math.log(r1 / r0))
    return pts[-1][1]


def step_flops(c: dict, vocab: int) -> float:
    """Training FLOPs of one optimizer step of a run with resolved config c."""
    C, T, L = c["n_embd"], c["block_size"], c["n_layer"]
    tokens = c["batch_size"] * T * c.get("gradient_accumulation_steps", 1)
    return 6.0 * tokens * (L * (12 * C * C + 2 * T * C) + C * vocab)


def step_equivalents(c: dict, probe: bool, inspect_batches: int) -> float:
    """The run's work in training steps: its steps, its evaluations (forward only: 1/3 of a step per batch),
    its telemetry steps (about one extra step each), a probe's batches, an inspection's passes."""
    if probe:
        return c["eval_iters"]
    steps = c["max_iters"]
    evals = (steps // max(1, c["eval_interval"]) + 1) * c["eval_iters"] * 2 / 3
    tele = steps // c["telemetry_interval"] if c.get("telemetry_interval") else 0
    inspect = (c["n_layer"] + 2) * inspect_batches / 3 if inspect_batches else 0.0
    return steps + evals + tele + inspect


def run_seconds(c: dict, probe: bool, inspect_batches: int, vocab: int, gpu: bool) -> float:
    """Seconds one run takes alone on its device (a GPU: its share of the rate is counted by the caller)."""
    work = step_flops(c, vocab) * step_equivalents(c, probe, inspect_batches)
    extra = SWITCH_WIDTH / c["n_embd"]
    factor = math.prod(1 + (f - 1) * extra for (key, value), f in SWITCH_COST.items() if c.get(key) == value)
    if c.get("optimizer") == "muon" and not gpu:
        factor *= MUON_CPU
    rate = GPU_RATE if gpu else cpu_rate(c["n_embd"])
    return start_seconds(inspect_batches, gpu) + work * factor / rate


def start_seconds(inspect_batches: int, gpu: bool) -> float:
    """A run's process start-ups: train.py's, and an inspection's."""
    one = START_GPU if gpu else START["train"]
    return one + (one - START["train"] + START["inspect"] if inspect_batches else 0.0)


def estimate_minutes(runs: list[tuple[dict, bool, int]], slots: int, vocab: int, gpu: bool) -> float:
    """The study's wall time: runs (resolved config, probe, inspect batches) spread over `slots` at once.
    On a CPU each run has its own core; on one GPU the runs share its rate, so only start-ups overlap."""
    secs = [run_seconds(c, probe, ib, vocab, gpu) for c, probe, ib in runs]
    if gpu:
        starts = sum(start_seconds(ib, gpu) for _, _, ib in runs)
        return (sum(secs) - starts + starts / slots) / 60
    return sum(secs) / slots * (SHARED_CPU if slots > 1 else 1.0) / 60
