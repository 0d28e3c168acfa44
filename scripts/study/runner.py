"""Train norm and residual variants under one budget, answer nine questions about them with small extra
experiments, and write a report of tables, figures and a reading computed from the measurements.

    python -m scripts.study configs/small.py                                   # default variants, all questions
    python -m scripts.study configs/small.py --variants=pre_ln,post_ln,deepnorm --seeds=3 --max_iters=1000
    python -m scripts.study configs/small.py --questions=1,2 --name=warmup     # --key=value: any train.py key

Every --key=value that is not a study flag goes to every run, after the variant's or question's own
overrides. Each run is a subprocess `python train.py` with its out_dir in study_dir/name/runs/, so one
diverging run does not stop the study; then study_dir/name/report.md gets the tables and figures
(report.py). docs/norms.md explains every flag, table and figure.
"""

import json
import os
import queue
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path

from gpt_residual import config
from gpt_residual.errors import USER_ERRORS
from scripts.study import registry, report
from scripts.study.job import NAN, Job
from scripts.study.question import PRESETS, PROBE, Q_BASE

ROOT = Path(__file__).resolve().parents[2]  # the repo root

# ----------------------------------------------------------------------------- what to run

# nanochat's stack: pre-LN, weightless RMSNorm, QK-norm, a norm on the embeddings, rotary positions, the
# learned residual and value scalars, a logit cap, and Muon for the blocks' matrices
MODERN = dict(norm="rmsnorm", norm_affine=False, qk_norm=True, embed_norm=True, positions="rope")
MODERN |= dict(residual_scalars=True, value_residual=True, logit_softcap=15.0, optimizer="muon")
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
}
# The default study fits about 20 minutes on a 2-core CPU (OMP_NUM_THREADS=1): GPT-2's pre-LN, RMSNorm
# (question 5), and what questions 8 and 9 read; the other variants: --variants
DEFAULT_VARIANTS = "pre_ln,rmsnorm,rope,muon,modern"
DEFAULT_MAX_ITERS = 500  # for the variants (a config's max_iters is for one long run); --max_iters overrides
# the config file, then these, then overrides; every cosine ends at its run's own max_iters
EVERY_RUN = dict(eval_iters=10, checkpoint_interval=0, keep_checkpoints=1, lr_decay_iters=0)


class StudyError(ValueError):
    """A run that failed on its configuration, data or device; printed as one line, exit 2."""


@dataclass
class StudyOptions:
    """The study's own flags; every other --key=value is train.py's."""

    variants: str = DEFAULT_VARIANTS  # the variants to train, comma-separated (the list is below)
    seeds: int = 2  # runs per variant, seeds seed, seed+1, ...: the same for every variant
    questions: str = "all"  # all | none | some of 1,2,...,9
    name: str = ""  # the study's folder under study_dir (default: the config file's stem)
    study_dir: str = "study"  # where studies go
    reuse: bool = False  # keep runs already done with the same settings: resume a study, or redraw its report
    jobs: int = 1  # runs at once on the CPU (1: step times compare); with several GPUs, one run per GPU
    preset: str = "cpu"  # the questions' 12-layer model: "cpu" 64 wide | "gpu" 768 wide (use configs/study_gpu.py)
    dry_run: bool = False  # list the runs (steps and tokens each) and their totals, and stop

    def __post_init__(self):
        config.check_choice("preset", self.preset, PRESETS)
        bad = [v for v in self.variant_names if v not in VARIANTS]
        if bad:
            raise config.ConfigError(f"unknown variant '{','.join(bad)}'; valid variants: {', '.join(VARIANTS)}")
        for key in ("seeds", "jobs"):
            if getattr(self, key) < 1:
                raise config.ConfigError(f"--{key} must be a positive integer, got {getattr(self, key)}")
        numbers = ",".join(map(str, registry.QUESTIONS))
        q = {"all": numbers, "none": ""}.get(self.questions, self.questions)
        if not all(s in map(str, registry.QUESTIONS) for s in q.split(",") if q):
            raise config.ConfigError(f"--questions must be all, none or some of {numbers}; got {q!r}")
        self.questions = q

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
    return "\n".join(lines + ["", "and every key of train.py (python train.py --help), e.g. --max_iters=1000"])


# ----------------------------------------------------------------------------- the grid of runs


def flags(overrides: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in overrides.items()]


def make_job(config_file: str, user: list[str], name: str, group: str, overrides: dict, seed: int) -> Job:
    """A run's train.py arguments: the config file, then logging intervals (a tenth, 15th and 20th of its
    max_iters), then overrides, then the user's flags; checked by the config parser before anything runs."""
    mi = config.parse_args(config.TrainConfig, [config_file, *flags(overrides), *user]).max_iters
    every = dict(eval_interval=max(1, mi // 10), telemetry_interval=max(1, mi // 15), log_interval=max(1, mi // 20))
    args = [config_file, *flags(every | EVERY_RUN), *flags(overrides), *user, f"--seed={seed}"]
    resolved = config.to_dict(config.parse_args(config.TrainConfig, args))  # a bad key fails here
    return Job(name, group, seed, args, resolved, probe="probe_init" in overrides)


def plan(opts: StudyOptions, config_file: str, user: list[str]) -> list[Job]:
    """Every run of the study, in order: each variant's probe and seeds, then the questions' runs."""
    seed = config.parse_args(config.TrainConfig, [config_file, *user]).seed
    grid = []  # (name, group, overrides, seed)
    for v in opts.variant_names:
        overrides = {"max_iters": DEFAULT_MAX_ITERS, **VARIANTS[v]}
        grid.append((f"{v}-init", v, overrides | PROBE, seed))
        grid += [(f"{v}-s{s}", v, overrides, s) for s in range(seed, seed + opts.seeds)]
    base = Q_BASE | PRESETS[opts.preset]
    grid += [(f"q-{run.name}", "q", base | run.overrides, seed) for run in registry.runs_for(opts.question_numbers)]
    return [make_job(config_file, user, *g) for g in grid]


def describe_plan(jobs: list[Job]) -> str:
    """One line per run (its steps and tokens; a probe reads eval_iters batches and trains nothing), then the
    totals: with the tokens/s of the model on a device (python -m scripts.bench), what the study will cost there."""
    lines, steps, tokens = [], 0, 0
    for job in jobs:
        c = job.resolved
        n = 0 if job.probe else c["max_iters"]
        per_step = c["batch_size"] * c["block_size"] * c["gradient_accumulation_steps"]
        what = "probe" if job.probe else f"{n} steps"
        lines.append(f"  {job.name:<28} {what:>11}  {n * per_step / 1e6:8.2f}M tokens")
        steps, tokens = steps + n, tokens + n * per_step
    lines.append(f"{len(jobs)} runs ({sum(j.probe for j in jobs)} probes): {steps:,} steps, {tokens / 1e6:.1f}M tokens")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- running


def slots(device: str, n_jobs: int) -> list[str | None]:
    """Where runs go at once: one per GPU when there are several, else n_jobs on the CPU (or one GPU)."""
    import torch

    if device not in ("auto", "cuda") or torch.cuda.device_count() < 2:
        return [None] * n_jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def run_job(job: Job, runs: Path, gpu: str | None, reuse: bool):
    """One `python train.py` subprocess (unless reused), then its outcome and records, into job."""
    out, done = runs / job.name, runs / job.name / "study.json"
    if not (reuse and done.exists() and json.loads(done.read_text()).get("resolved") == job.resolved):
        shutil.rmtree(out, ignore_errors=True)  # start clean: nothing of an earlier run
        out.mkdir(parents=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})}
        cmd, t0 = [sys.executable, str(ROOT / "train.py"), *job.args, f"--out_dir={out}"], time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        (out / "train.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        error = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1] if proc.returncode else ""
        wall, load = time.perf_counter() - t0, os.getloadavg()[0]
        done.write_text(json.dumps(dict(resolved=job.resolved, rc=proc.returncode, error=error, wall=wall, load=load)))
    job.read(out)


def run_all(jobs: list[Job], runs: Path, reuse: bool, where: list[str | None]):
    """Every job, len(where) at a time, one progress line each; a configuration error stops the rest."""
    done, free = [0], queue.Queue()
    for slot in where:
        free.put(slot)

    def one(job: Job):
        slot = free.get()
        try:
            run_job(job, runs, slot, reuse)
        finally:
            free.put(slot)
        done[0] += 1
        print(f"[{done[0]}/{len(jobs)}] {job.describe()} ({job.wall:.0f} s)", flush=True)
        if job.rc == 2:  # a config, data or device error: every other run would fail the same way
            raise StudyError(f"{job.name}: {job.error.removeprefix('error: ')} (see {runs / job.name})")

    if len(where) == 1:
        for job in jobs:
            one(job)
        return
    with ThreadPoolExecutor(len(where)) as ex:
        futures = [ex.submit(one, job) for job in jobs]
        try:
            for future in futures:
                future.result()
        finally:  # after an error, start no more runs
            ex.shutdown(cancel_futures=True)


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
        if opts.dry_run:
            print(describe_plan(jobs))
            return 0
        where = slots(jobs[0].resolved["device"], opts.jobs)
        print(f"{len(jobs)} runs into {out / 'runs'}, {len(where)} at a time", flush=True)
        run_all(jobs, out / "runs", opts.reuse, where)
    except (StudyError, *USER_ERRORS) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    cfg = config.parse_args(config.TrainConfig, [config_file, *user])
    command, measured = f"python -m scripts.study {' '.join(argv)}", measure(opts, cfg, jobs)
    path = report.write(out, jobs, opts, command, where, started, measured)
    print(f"report: {path} ({(time.perf_counter() - started[0]) / 60:.1f} min)")
    return 1 if any(j.status == "failed" for j in jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
