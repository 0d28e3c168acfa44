"""What a question of the study is, and the runs questions 1-9 read.

A Question owns its runs (the Run specs that its section reads) and its report section; registry.py lists
every question, and both the planner (runner.py) and the report (report.py) read that list. A Run is one
`python train.py` run of a questions' model, or with seeded=True one per seed of the study: Q_BASE here for
questions 1-9, DEEP_BASE (depth_runs.py) for questions 10-14. Several questions may read the same run,
which the study makes once. A new question is a Question in a question module, its new runs here or in
depth_runs.py, and one line in registry.py.
"""

import typing
from collections.abc import Callable
from dataclasses import dataclass

if typing.TYPE_CHECKING:
    from scripts.study.results import Results


@dataclass(frozen=True)
class Run:
    """One run of a questions' model: its folder is runs/q-<name> (seeded: runs/q-<name>-s<seed>, one per
    seed); r.q[name] (the first seed) and r.seeds(run) (every seed) in a section."""

    name: str
    overrides: dict  # TrainConfig overrides on top of its base (and the preset's)
    base: str = "q"  # "q": Q_BASE, the 12-layer model of questions 1-9; "deep": depth_runs.DEEP_BASE
    seeded: bool = False  # one run per seed of the study (--seeds), the same seeds for every arm; else one
    inspect: bool = False  # measure the trained run with python -m scripts.inspect (layer usefulness)
    lr_scale: float = 1.0  # learning_rate and min_lr as a multiple of its base's (and preset's): sweeps follow them


@dataclass(frozen=True)
class Question:
    """One question of the report: its runs, made by the planner, and its section, written from them."""

    number: int  # --questions=<number>; its section is "## Question <number>: <title>"
    title: str
    runs: tuple[Run, ...]  # the runs its section reads (besides the variants it names, if any)
    section: Callable[["Results"], list[str]]  # its markdown lines


# The questions' model: 12 narrow layers, cheap on a CPU; one seed each. The learning rate is high for a
# 12-layer post-LN: in a pilot on configs/small.py, post-LN learned nothing past the token frequencies
# in 300 steps at 3e-3 or 1e-2, with warmup or without; at 1e-3 it trains with warmup.
Q_BASE = dict(n_layer=12, n_embd=64, n_head=4, batch_size=16, max_iters=300, learning_rate=1e-3, min_lr=1e-4)
Q_BASE |= dict(warmup_iters=100, norm="layernorm", norm_position="pre", residual=True, deepnorm=False, init="gpt2")
# nanochat's stack: pre-LN, weightless RMSNorm, QK-norm, a norm on the embeddings, rotary positions, the
# learned residual and value scalars, a logit cap, and Muon for the blocks' matrices
MODERN = dict(norm="rmsnorm", norm_affine=False, qk_norm=True, embed_norm=True, positions="rope")
MODERN |= dict(residual_scalars=True, value_residual=True, logit_softcap=15.0, optimizer="muon")
PROBE = {"probe_init": True}  # measure at initialisation, train nothing

# probes at initialisation (questions 2, 3, 4)
INIT_PRE_GPT2 = Run("init-pre-gpt2", PROBE)
INIT_POST_GPT2 = Run("init-post-gpt2", {"norm_position": "post", **PROBE})
INIT_PRE_XAVIER = Run("init-pre-xavier", {"init": "xavier", **PROBE})
INIT_POST_XAVIER = Run("init-post-xavier", {"norm_position": "post", "init": "xavier", **PROBE})
INIT_NO_RESIDUAL = Run("init-no_residual", {"residual": False, **PROBE})
# trained runs: pre- and post-LN with and without warmup (question 1, read by 3, 4, 6, 7 too)
PRE_WARMUP = Run("pre-warmup", {})
PRE_NOWARMUP = Run("pre-nowarmup", {"warmup_iters": 0})
POST_WARMUP = Run("post-warmup", {"norm_position": "post"})
POST_NOWARMUP = Run("post-nowarmup", {"norm_position": "post", "warmup_iters": 0})
NO_RESIDUAL_WARMUP = Run("no_residual-warmup", {"residual": False})  # question 4
LEARNED_SCALARS = Run("scalars", {"residual_scalars": True, "value_residual": True})  # question 7
Q6_LRS = (1e-3, 3e-3, 1e-2)  # question 6's sweep; its plain cells at Q_BASE's learning rate are question 1's runs
LR_SWEEP = tuple(
    Run(f"lr-{pos}{'-qk' if qk else ''}-{lr:g}", {"norm_position": pos, "qk_norm": qk, "learning_rate": lr})
    for pos in ("pre", "post")
    for qk in (False, True)
    for lr in Q6_LRS
    if qk or lr != Q_BASE["learning_rate"]
)
# every run, in the order the study makes them (the probes first: they train nothing)
RUNS = (INIT_PRE_GPT2, INIT_POST_GPT2, INIT_PRE_XAVIER, INIT_POST_XAVIER, INIT_NO_RESIDUAL)
RUNS += (PRE_WARMUP, PRE_NOWARMUP, POST_WARMUP, POST_NOWARMUP, NO_RESIDUAL_WARMUP, LEARNED_SCALARS, *LR_SWEEP)
