"""Train norm and residual variants under one budget, answer fourteen questions about them with extra
experiments (several seeds per arm where a question compares), and write a report of tables, figures and
answers computed from the measurements.

    python -m scripts.study configs/small.py                                   # the full study (--preset=cpu)
    python -m scripts.study configs/small.py --preset=quick                    # the same questions, smaller
    python -m scripts.study configs/small.py --questions=10 --dry_run=True     # one question's plan and cost
    python -m scripts.study configs/small.py --variants=pre_ln,post_ln,deepnorm --seeds=3 --max_iters=1000

Every --key=value that is not a study flag goes to every run, after the variant's or question's own
overrides. Each run is a subprocess `python train.py` with its out_dir in study_dir/name/runs/, so one
diverging run does not stop the study (execute.py); then study_dir/name/report.md gets the tables and
figures (report.py). docs/norms.md explains every flag, table and figure.
"""

import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from gpt_residual import config
from gpt_residual.errors import USER_ERRORS
from scripts.study import presets, registry, report
from scripts.study.depth_runs import DEEP_BASE
from scripts.study.execute import StudyError, check_instruments, run_all, slots
from scripts.study.job import NAN, Job
from scripts.study.presets import PRESETS
from scripts.study.question import MODERN, PROBE, Q_BASE, Run

# ----------------------------------------------------------------------------- what to run

VARIANTS = {  # name: TrainConfig overrides on top of the config file; a new variant is one line here
    "pre_ln": {},
    "post_ln": {"norm_position": "post"},
    "rmsnorm": {"norm": "rmsnorm"},
    "peri_ln": {"norm_position": "peri"},
    "no_residual": {"residual": False},
    "deepnorm": {"norm_position": "post", "deepnorm": True},
    "post_rmsnorm": {"norm_position": "post", "norm": "rmsnorm"},
    "xavier": {"init": "xavier"},
    "post_xavier": {"norm_position": "post", "init": "xavier"},
    "qk_norm": {"qk_norm": True},
    "no_affine": {"norm_affine": False},
    "embed_norm": {"embed_norm": True},
    "reordered": {"norm_position": "reordered"},
    "residual_scalars": {"residual_scalars": True},
    "value_residual": {"value_residual": True},
    "rope": {"positions": "rope"},
    # a char model's confident guess needs a logit gap of ~9 (p = 0.99 over 65 characters: ln(0.99 * 64 / 0.01));
    # at 15, tanh bends logits of 9 by 10%: the cap (nanochat's value) trims outliers, not the usual predictions
    "softcap": {"logit_softcap": 15.0},
    "muon": {"optimizer": "muon"},
    "modern": MODERN,
    # the residual stream's newer switches, one each (questions 10-14 study them at depth, with seeds)
    "attn_gate": {"attn_gate": "elementwise"},
    "attn_gate_head": {"attn_gate": "head"},
    "norm_scaling": {"norm_scaling": True},
    "mix_ln": {"norm_position": "mix"},
    "dyt": {"norm": "dyt"},
    "derf": {"norm": "derf"},
    "hc": {"hyper_connections": "hc"},
    "mhc": {"hyper_connections": "mhc"},
    "attn_res": {"attn_residuals": "full"},
    "attn_res_block": {"attn_residuals": "block", "attn_residual_blocks": 2},  # 2 blocks: any model of 2+ layers
}
# The default variants: GPT-2's pre-LN, RMSNorm (question 5), and what questions 8 and 9 read; the other
# variants: --variants
DEFAULT_VARIANTS = "pre_ln,rmsnorm,rope,muon,modern"
# the config file, then these, then overrides; every cosine ends at its run's own max_iters
EVERY_RUN = dict(eval_iters=10, checkpoint_interval=0, keep_checkpoints=1, lr_decay_iters=0)
BASES = {"q": Q_BASE, "deep": DEEP_BASE}  # a Run's base: the model of questions 1-9, of questions 10-14
CADENCE = {"q": (10, 15), "deep": (4, 10)}  # (evaluations, telemetry records) per run: variants take "q"'s


@dataclass
class StudyOptions:
    """The study's own flags; every other --key=value is train.py's."""

    variants: str = DEFAULT_VARIANTS  # the variants to train, comma-separated (the list is below)
    seeds: int = 0  # seeds per arm (variants, and the questions' seeded runs): seed, seed+1, ...; 0: the preset's
    questions: str = "all"  # all | none | some of 1,2,...,14
    name: str = ""  # the study's folder under study_dir (default: the config file's stem)
    study_dir: str = "study"  # where studies go
    reuse: bool = False  # keep runs already done with the same settings: resume a study, or redraw its report
    jobs: int = 0  # runs at once: 0 the preset's (cpu, quick: 2 on a CPU; gpu: 8 on one GPU); several GPUs: 1 each
    preset: str = "cpu"  # cpu: the full study | quick: fewer steps and seeds | gpu: 768 wide, one GPU (study_gpu.py)
    dry_run: bool = False  # list the runs (steps, tokens, estimated seconds) and the estimated time, and stop

    def __post_init__(self):
        config.check_choice("preset", self.preset, PRESETS)
        bad = [v for v in self.variant_names if v not in VARIANTS]
        if bad:
            raise config.ConfigError(f"unknown variant '{','.join(bad)}'; valid variants: {', '.join(VARIANTS)}")
        for key in ("seeds", "jobs"):
            if getattr(self, key) < 0:
                raise config.ConfigError(
                    f"--{key} must be a positive integer (0: the preset's), got {getattr(self, key)}"
                )
        numbers = ",".join(map(str, registry.QUESTIONS))
        q = {"all": numbers, "none": ""}.get(self.questions, self.questions)
        if not all(s in map(str, registry.QUESTIONS) for s in q.split(",") if q):
            raise config.ConfigError(f"--questions must be all, none or some of {numbers}; got {q!r}")
        self.questions = q
        p = PRESETS[self.preset]
        self.seeds = self.seeds or p.seeds
        self.jobs = self.jobs or (8 if p.name == "gpu" else min(2, os.cpu_count() or 1))

    @property
    def variant_names(self) -> list[str]:
        return self.variants.split(",")

    @property
    def question_numbers(self) -> set[int]:
        return {int(s) for s in self.questions.split(",") if s}


def parse(argv: list[str]) -> tuple[StudyOptions, str, list[str]]:
    """The study's flags, the config file, and the flags for train.py (checked later, by plan)."""
    opts, rest = config.split_flags(StudyOptions, argv)
    files = [a for a in rest if not a.startswith("--")]
    if len(files) != 1:
        msg = "give one config file, e.g. python -m scripts.study configs/small.py --variants=pre_ln"
        raise config.ConfigError(msg)
    return opts, files[0], [a for a in rest if a.startswith("--")]


def help_text() -> str:
    helps = config.field_help(StudyOptions)
    lines = [__doc__.strip(), "", "study flags:"]
    lines += [f"  --{f.name:<10} {f.default!r:<45} {helps[f.name]}" for f in fields(StudyOptions)]
    lines += ["", "variants: " + ", ".join(VARIANTS), "", "questions:"]
    lines += [f"  {q.number}. {q.title}" for q in registry.QUESTIONS.values()]
    lines += ["", "presets:"] + [
        f"  {p.name}: {p.note} (sized for {p.budget_min} min on {p.machine})" for p in PRESETS.values()
    ]
    return "\n".join(lines + ["", "and every key of train.py (python train.py --help), e.g. --max_iters=1000"])


# ----------------------------------------------------------------------------- the grid of runs


def flags(overrides: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in overrides.items()]


def resolve(args: list[str]) -> dict:
    """The config these train.py arguments resolve to; a bad key or value fails here, before anything runs."""
    return config.to_dict(config.parse_args(config.TrainConfig, args))


def make_job(
    config_file: str,
    user: list[str],
    name: str,
    group: str,
    overrides: dict,
    seed: int,
    run: Run | None = None,
    inspect: int = 0,
) -> Job:
    """A run's train.py arguments: the config file, then logging intervals (evaluations and telemetry records
    per run from CADENCE, 20 log records), then overrides, then the user's flags."""
    mi = resolve([config_file, *flags(overrides), *user])["max_iters"]
    evals, tele = CADENCE[run.base if run else "q"]
    every = dict(
        eval_interval=max(1, mi // evals), telemetry_interval=max(1, mi // tele), log_interval=max(1, mi // 20)
    )
    args = [config_file, *flags(every | EVERY_RUN), *flags(overrides), *user, f"--seed={seed}"]
    return Job(
        name,
        group,
        seed,
        args,
        resolve(args),
        probe="probe_init" in overrides,
        run=run.name if run else "",
        inspect=inspect,
    )


def plan(opts: StudyOptions, config_file: str, user: list[str]) -> list[Job]:
    """Every run of the study, in order: each variant's probe and seeds, then the questions' runs (a seeded
    Run once per seed, the same seeds as the variants'); the preset sizes them."""
    preset, seed = PRESETS[opts.preset], resolve([config_file, *user])["seed"]
    seeds = range(seed, seed + opts.seeds)
    jobs = []
    for v in opts.variant_names:
        overrides = {"max_iters": preset.variant_iters, **VARIANTS[v]}
        jobs.append(make_job(config_file, user, f"{v}-init", v, overrides | PROBE, seed))
        jobs += [make_job(config_file, user, f"{v}-s{s}", v, overrides, s) for s in seeds]
    size = {"q": preset.q, "deep": preset.deep}
    for run in registry.runs_for(opts.question_numbers):
        overrides = BASES[run.base] | size[run.base] | run.overrides
        if run.lr_scale != 1:  # a sweep: learning_rate and min_lr, both, as a multiple of the base's
            overrides |= {k: float(f"{overrides[k] * run.lr_scale:.6g}") for k in ("learning_rate", "min_lr")}
        if (preset.max_depth and overrides["n_layer"] > preset.max_depth) or run.name in preset.leave_out:
            continue
        batches = preset.inspect_batches if run.inspect else 0
        for s in seeds if run.seeded else (seed,):
            name = f"q-{run.name}-s{s}" if run.seeded else f"q-{run.name}"
            jobs.append(make_job(config_file, user, name, "q", overrides, s, run, batches))
    return jobs


def on_gpu(opts: StudyOptions, jobs: list[Job]) -> bool:
    import torch

    device = jobs[0].resolved["device"]
    return device.startswith("cuda") or (device == "auto" and (opts.preset == "gpu" or torch.cuda.is_available()))


def vocab_size(cfg: dict) -> int:
    """The dataset's vocabulary (its meta.json), for the cost of the head; unprepared: 256 for a char
    dataset, the config's vocab_size else."""
    from gpt_residual import dataset

    try:
        return dataset.read_meta(dataset.dataset_dir(cfg["dataset"], cfg["data_dir"]))["vocab_size"]
    except (OSError, ValueError, KeyError):
        return 256 if "char" in cfg["dataset"] else cfg["vocab_size"]


def estimate(jobs: list[Job], n_slots: int, gpu: bool) -> float:
    """Minutes the study should take: the cost model of presets.py."""
    runs = [(j.resolved, j.probe, j.inspect) for j in jobs]
    return presets.estimate_minutes(runs, n_slots, vocab_size(jobs[0].resolved), gpu)


def describe_plan(jobs: list[Job], n_slots: int, gpu: bool) -> str:
    """One line per run (its steps, tokens and estimated seconds alone; a probe reads eval_iters batches and
    trains nothing), then the totals and the estimated wall time with n_slots runs at once."""
    lines, steps, tokens, vocab = [], 0, 0, vocab_size(jobs[0].resolved)
    for job in jobs:
        c = job.resolved
        n = 0 if job.probe else c["max_iters"]
        per_step = c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"]
        what = "probe" if job.probe else f"{n} steps" + (" + inspect" if job.inspect else "")
        secs = presets.run_seconds(c, job.probe, job.inspect, vocab, gpu)
        lines.append(f"  {job.name:<28} {what:>21}  {n * per_step / 1e6:8.2f}M tokens  {secs:7.1f} s")
        steps, tokens = steps + n, tokens + n * per_step
    where = f"{n_slots} at a time on " + ("one GPU" if gpu else "the CPU")
    lines.append(
        f"{len(jobs)} runs ({sum(j.probe for j in jobs)} probes, {sum(bool(j.inspect) for j in jobs)} "
        f"inspected): {steps:,} steps, {tokens / 1e6:.1f}M tokens; estimated {estimate(jobs, n_slots, gpu):.0f} "
        f"min, {where} (cost model: scripts/study/presets.py)"
    )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- measured besides the runs


def measure(opts: StudyOptions, cfg, jobs: list[Job]) -> tuple[float, dict[str, dict[str, float]]]:
    """The unigram loss of cfg's data, and (for question 5) the norm layers' speed on the devices the runs used."""
    bench = {}
    for device in ("cpu", "cuda") if 5 in opts.question_numbers else ():
        if device == "cpu" or any(j.config.get("device", "").startswith("cuda") for j in jobs):
            bench[device] = norm_bench(cfg.batch_size * cfg.block_size, cfg.n_embd, cfg.bias, device)
    return unigram_loss(cfg), bench


def norm_bench(rows: int, n_embd: int, bias: bool, device: str) -> dict[str, float]:
    """Microseconds per forward + backward of one norm layer on a (rows, n_embd) activation: best of 7."""
    import torch

    x = torch.randn(rows, n_embd, device=device, requires_grad=True)
    out = {}
    for name, mod in {"LayerNorm": torch.nn.LayerNorm(n_embd, bias=bias), "RMSNorm": torch.nn.RMSNorm(n_embd)}.items():
        mod.to(device)
        times = []
        for _ in range(7):
            t = time.perf_counter()
            for _ in range(50):
                mod(x).sum().backward()
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) / 50 * 1e6)
        out[name] = min(times)
    return out


def unigram_loss(cfg) -> float:
    """Val loss of a model that knows only the train split's token frequencies: where a run that
    learned nothing else is stuck (first 10M tokens of each split)."""
    import numpy as np

    from gpt_residual import dataset

    try:
        folder = dataset.dataset_dir(cfg.dataset, cfg.data_dir)
        meta = dataset.read_meta(folder)
        train, val = (np.asarray(dataset.load_tokens(folder, s, meta)[:10_000_000]) for s in ("train", "val"))
    except (OSError, ValueError):
        return NAN
    counts = np.bincount(train, minlength=meta["vocab_size"]) + 1.0
    return float(-np.log(counts / counts.sum())[val].mean())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(help_text())
        return 0
    started = (time.perf_counter(), os.getloadavg()[0])
    try:
        opts, config_file, user = parse(argv)
        jobs, out = plan(opts, config_file, user), Path(opts.study_dir) / (opts.name or Path(config_file).stem)
        where, gpu = slots(jobs[0].resolved["device"], opts.jobs), on_gpu(opts, jobs)
        if opts.dry_run:
            print(describe_plan(jobs, len(where), gpu))
            return 0
        check_instruments(jobs)
        minutes = estimate(jobs, len(where), gpu)
        print(f"{len(jobs)} runs into {out / 'runs'}, {len(where)} at a time; estimated {minutes:.0f} min", flush=True)
        run_all(jobs, out / "runs", opts.reuse, where)
    except (StudyError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    cfg = config.parse_args(config.TrainConfig, [config_file, *user])
    command, measured = f"python -m scripts.study {' '.join(argv)}", measure(opts, cfg, jobs)
    path = report.write(out, jobs, opts, command, where, (*started, minutes), measured)
    print(f"report: {path} ({(time.perf_counter() - started[0]) / 60:.1f} min)")
    return 1 if any(j.status == "failed" for j in jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
