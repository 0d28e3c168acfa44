"""Compare norm variants under one budget and answer issue 4's questions with measurements.

    python study.py configs/small.py                                   # default variants, all questions
    python study.py configs/small.py --variants=pre_ln,post_ln,deepnorm --seeds=3 --max_iters=1000
    python study.py configs/small.py --questions=1,2 --name=warmup     # --key=value: any TrainConfig key

Study flags: --variants, --seeds (runs per variant, default 2, seed = base seed + k), --questions (all | none |
1,2,...), --name (default: the config's stem), --study_dir (default: study), --reuse=True (keep runs
already done with the same settings: resume a study, or redraw its report), --jobs (runs at once on
the CPU; default 1, so step times compare; with several GPUs: one run per GPU). Every other --key=value
goes to every run, after the variant's or question's own overrides. Each run is a subprocess
`python train.py` with its out_dir in study_dir/name/runs/, so one diverging run does not stop the
study; then study_dir/name/report.md gets tables, figures and a reading computed from the numbers.
"""

import json
import math
import os
import platform
import queue
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import metrics

ROOT = Path(__file__).resolve().parent
VARIANTS = {  # name: overrides on top of the config file
    "pre_ln": {},
    "post_ln": {"norm_position": "post"},
    "rmsnorm": {"norm": "rmsnorm"},
    "peri_ln": {"norm_position": "peri"},
    "no_residual": {"residual": False},
    "deepnorm": {"norm_position": "post", "deepnorm": True},
    "post_rmsnorm": {"norm_position": "post", "norm": "rmsnorm"},
    "xavier": {"init": "xavier"},
    "post_xavier": {"norm_position": "post", "init": "xavier"},
}
DEFAULT_VARIANTS = "pre_ln,post_ln,rmsnorm,peri_ln,no_residual"
DEFAULT_MAX_ITERS = 500  # for the variants (a config's max_iters is for one long run); --max_iters overrides
# the config file, then these, then overrides; every cosine ends at its run's own max_iters
EVERY_RUN = dict(eval_iters=10, checkpoint_interval=0, keep_checkpoints=1, lr_decay_iters=0)
QUESTIONS = {
    1: "Does post-LN need warmup where pre-LN does not?",
    2: "Per-layer gradient norms at initialisation: pre- vs post-LN, GPT-2 vs Xavier init",
    3: "Residual-stream RMS growth with depth, pre- vs post-LN",
    4: "Removing the residual connections in a 12-layer model",
    5: "RMSNorm vs LayerNorm: step time and final loss",
}
# The questions' model: 12 narrow layers, cheap on a CPU; one seed each. The learning rate is high for a
# 12-layer post-LN: in a pilot on configs/small.py, post-LN learned nothing past the token frequencies
# in 300 steps at 3e-3 or 1e-2, with warmup or without; at 1e-3 it trains with warmup.
Q_BASE = dict(n_layer=12, n_embd=64, n_head=4, batch_size=16, max_iters=300, learning_rate=1e-3, min_lr=1e-4)
Q_BASE |= dict(warmup_iters=100, norm="layernorm", norm_position="pre", residual=True, deepnorm=False, init="gpt2")
PROBE = {"probe_init": True}
Q_RUNS = {  # name: (overrides on top of Q_BASE, the questions that read it)
    "init-pre-gpt2": (PROBE, {2, 3, 4}),
    "init-post-gpt2": ({"norm_position": "post", **PROBE}, {2, 3}),
    "init-pre-xavier": ({"init": "xavier", **PROBE}, {2}),
    "init-post-xavier": ({"norm_position": "post", "init": "xavier", **PROBE}, {2}),
    "init-no_residual": ({"residual": False, **PROBE}, {4}),
    "pre-warmup": ({}, {1, 3, 4}),
    "pre-nowarmup": ({"warmup_iters": 0}, {1}),
    "post-warmup": ({"norm_position": "post"}, {1, 3}),
    "post-nowarmup": ({"norm_position": "post", "warmup_iters": 0}, {1}),
    "no_residual-warmup": ({"residual": False}, {4}),
}
TOL = 0.05  # nats: a smaller loss difference between single-seed runs is called no difference
GROW = 1.5  # last/first layer ratio above this "grows toward the output", below 1/GROW "shrinks", else "flat"
NAN = float("nan")


class StudyError(ValueError):
    """A bad study flag, or a run that failed on its configuration; printed as one line, exit 2."""


def parse(argv: list[str]) -> dict:
    opts = {"variants": DEFAULT_VARIANTS, "seeds": "2", "questions": "all", "name": "", "study_dir": "study"}
    opts |= {"reuse": "False", "jobs": "1"}
    files, user = [], []
    for arg in argv:
        key, eq, value = arg[2:].partition("=")
        if arg.startswith("--") and key.replace("-", "_") in opts:
            if not eq:
                raise StudyError(f"flag '{arg}' needs a value: write {arg}=VALUE")
            opts[key.replace("-", "_")] = value
        else:
            (user if arg.startswith("--") else files).append(arg)
    if len(files) != 1:
        raise StudyError("give one config file, e.g. python study.py configs/small.py --variants=pre_ln,post_ln")
    variants = opts["variants"].split(",")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise StudyError(f"unknown variant '{','.join(bad)}'; valid variants: {', '.join(VARIANTS)}")
    for key in ("seeds", "jobs"):
        if not opts[key].isdigit() or int(opts[key]) < 1:
            raise StudyError(f"--{key} must be a positive integer, got {opts[key]!r}")
    q = {"all": ",".join(map(str, QUESTIONS)), "none": ""}.get(opts["questions"], opts["questions"])
    if not all(s in map(str, QUESTIONS) for s in q.split(",") if q):
        raise StudyError(f"--questions must be all, none or some of {','.join(map(str, QUESTIONS))}; got {q!r}")
    out = Path(opts["study_dir"]) / (opts["name"] or Path(files[0]).stem)
    qs, seeds, jobs = {int(s) for s in q.split(",") if q}, int(opts["seeds"]), int(opts["jobs"])
    reuse = opts["reuse"].lower() == "true"
    return dict(
        config=files[0], user=user, variants=variants, seeds=seeds, questions=qs, out=out, reuse=reuse, jobs=jobs
    )


def flags(overrides: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in overrides.items()]


def plan(opts: dict) -> list[dict]:
    """Every run of the study, in order, with its train.py arguments checked by the config parser:
    config file, then logging intervals, then the variant's or question's overrides, then the user's flags."""
    import config

    def job(name, group, overrides, seed):
        mi = config.parse_args(config.TrainConfig, [opts["config"], *flags(overrides), *opts["user"]]).max_iters
        every = dict(eval_interval=max(1, mi // 10), telemetry_interval=max(1, mi // 15), log_interval=max(1, mi // 20))
        args = [opts["config"], *flags(every | EVERY_RUN), *flags(overrides), *opts["user"], f"--seed={seed}"]
        resolved = config.to_dict(config.parse_args(config.TrainConfig, args))  # a bad key fails here, before any run
        return dict(name=name, group=group, seed=seed, probe="probe_init" in overrides, args=args, resolved=resolved)

    seed = config.parse_args(config.TrainConfig, [opts["config"], *opts["user"]]).seed
    jobs = []
    for v in opts["variants"]:
        overrides = {"max_iters": DEFAULT_MAX_ITERS, **VARIANTS[v]}
        jobs.append(job(f"{v}-init", v, overrides | PROBE, seed))
        jobs += [job(f"{v}-s{s}", v, overrides, s) for s in range(seed, seed + opts["seeds"])]
    jobs += [job(f"q-{n}", "q", Q_BASE | ov, seed) for n, (ov, qs) in Q_RUNS.items() if qs & opts["questions"]]
    return jobs


# ----------------------------------------------------------------------------- running


def slots(jobs: list[dict], n_jobs: int) -> list[str | None]:
    """Where runs go at once: one per GPU when there are several, else n_jobs on the CPU (or one GPU)."""
    import torch

    import config

    device = config.parse_args(config.TrainConfig, jobs[0]["args"]).device
    if device not in ("auto", "cuda") or torch.cuda.device_count() < 2:
        return [None] * n_jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]


def run_job(job: dict, runs: Path, gpu: str | None, reuse: bool):
    """One `python train.py` subprocess (unless reused), then its outcome and metrics.jsonl, into job."""
    out, done = runs / job["name"], runs / job["name"] / "study.json"
    if not (reuse and done.exists() and json.loads(done.read_text()).get("resolved") == job["resolved"]):
        shutil.rmtree(out, ignore_errors=True)  # start clean: nothing of an earlier run
        out.mkdir(parents=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"CUDA_VISIBLE_DEVICES": gpu} if gpu else {})}
        cmd, t0 = [sys.executable, str(ROOT / "train.py"), *job["args"], f"--out_dir={out}"], time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        (out / "train.log").write_text(" ".join(cmd) + "\n" + proc.stdout + proc.stderr)
        error = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1] if proc.returncode else ""
        wall, load = time.perf_counter() - t0, os.getloadavg()[0]  # load: were the step times measured alone?
        result = dict(resolved=job["resolved"], rc=proc.returncode, error=error, wall=wall, load=load)
        done.write_text(json.dumps(result))
    job.update(json.loads(done.read_text()))
    job["status"] = "ok" if job["rc"] == 0 else "diverged" if "not finite" in job["error"] else "failed"
    recs = metrics.read(out) if (out / "metrics.jsonl").exists() else []
    job["evals"] = [r for r in recs if "val_loss" in r]
    job["trains"] = [r for r in recs if "ms_per_step" in r]
    job["tele"] = [r for r in recs if "rms" in r and not r.get("probe_init")]
    job["init"] = next((r for r in recs if r.get("probe_init")), None)
    job["config"] = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}


def describe(job: dict) -> str:
    if job["status"] != "ok":
        return f"{job['status'].upper()}: {job['error'].removeprefix('error: ')}"
    return f"loss at init {job['init']['loss']:.3f}" if job["probe"] else f"val {job['evals'][-1]['val_loss']:.3f}"


def run_all(jobs: list[dict], runs: Path, reuse: bool, where: list[str | None]):
    done, free = [0], queue.Queue()
    for slot in where:
        free.put(slot)

    def one(job):
        slot = free.get()
        try:
            run_job(job, runs, slot, reuse)
        finally:
            free.put(slot)
        done[0] += 1
        what = job["name"] if job["group"] == "q" else job["group"]
        what += " probe" if job["probe"] else f" seed {job['seed']}"
        print(f"[{done[0]}/{len(jobs)}] {what} ... {describe(job)} ({job['wall']:.0f} s)", flush=True)
        if job["rc"] == 2:  # a config, data or device error: every other run would fail the same way
            raise StudyError(f"{job['name']}: {job['error'].removeprefix('error: ')} (see {runs / job['name']})")

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


# ----------------------------------------------------------------------------- numbers


def finite(xs) -> list[float]:
    return [x for x in xs if x is not None and math.isfinite(x)]


def mean(xs) -> float:
    xs = finite(xs)
    return statistics.mean(xs) if xs else NAN


def mean_std(xs) -> str:
    xs = finite(xs)
    if len(xs) < 2:
        return f"{xs[0]:.4f}" if xs else "—"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def final(job: dict, key: str = "val_loss") -> float:
    return job["evals"][-1][key] if job["status"] == "ok" and job["evals"] else NAN


def step_stat(job: dict, key: str) -> float:
    """Median over the log records but the first (it holds the slow first step)."""
    recs = job["trains"][1:] or job["trains"]
    return statistics.median(r[key] for r in recs) if recs else NAN


def fastest(runs: list[dict]) -> dict:
    """The seed with the shortest step time: the least disturbed, since a busy machine only slows runs down."""
    timed = [j for j in runs if math.isfinite(step_stat(j, "ms_per_step"))]
    return min(timed, key=lambda j: step_stat(j, "ms_per_step")) if timed else runs[0]


def ratio(values) -> float:
    """Last over first: > 1 grows toward the output."""
    return values[-1] / values[0] if values and values[0] > 0 else NAN


def factor(values) -> float:
    """Per-layer growth factor: exp of the least-squares slope of log(value) over the index."""
    pts = [(i, math.log(v)) for i, v in enumerate(values or []) if v > 0]
    if len(pts) < 2:
        return NAN
    mx, my = statistics.mean(p[0] for p in pts), statistics.mean(p[1] for p in pts)
    return math.exp(sum((x - mx) * (y - my) for x, y in pts) / sum((x - mx) ** 2 for x, _ in pts))


def shape(r: float) -> str:
    return "n/a" if not math.isfinite(r) else "grows" if r > GROW else "shrinks" if r < 1 / GROW else "flat"


def outcome(job: dict, unigram: float) -> str:
    """diverged | failed | stuck (val loss within TOL of knowing only the token frequencies) | trained."""
    return job["status"] if job["status"] != "ok" else "stuck" if final(job) > unigram - TOL else "trained"


def last(job: dict) -> dict:
    """The run's last telemetry record: the statistics 'at the end'."""
    return job["tele"][-1] if job["tele"] else {}


def fmt(x, digits: int = 3) -> str:
    """x with `digits` decimals, thousands without, tiny or huge values in scientific notation; "—" if missing."""
    if x is None or not math.isfinite(x):
        return "—"
    if 0.01 <= abs(x) < 1000:
        return f"{x:.{digits}f}"
    return f"{x:,.0f}" if 1000 <= abs(x) < 1e6 else f"{x:.{digits}g}"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


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

    import dataset

    try:
        folder = dataset.dataset_dir(cfg.dataset, cfg.data_dir)
        meta = dataset.read_meta(folder)
        train, val = (np.asarray(dataset.load_tokens(folder, s, meta)[:10_000_000]) for s in ("train", "val"))
    except (OSError, ValueError):
        return NAN
    counts = np.bincount(train, minlength=meta["vocab_size"]) + 1.0
    return float(-np.log(counts / counts.sum())[val].mean())


def hardware() -> str:
    import torch

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.machine())
    gpu = f"; GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else ""
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


# ----------------------------------------------------------------------------- figures


def get_plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped, tables only (pip install matplotlib)", flush=True)
        return None
    return plt


def plot_curves(plt, curves: dict[str, list[dict]]):
    """Val loss vs step and vs training time (eval left out); x marks a diverged run's last eval."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, jobs) in enumerate(curves.items()):
        for k, job in enumerate(j for j in jobs if j["evals"]):
            ev, loss = job["evals"], [r["val_loss"] for r in job["evals"]]
            for ax, xs in zip(axes, ([r["step"] for r in ev], [r["time"] - r["eval_time"] for r in ev])):
                ax.plot(xs, loss, color=f"C{i}", label=None if k else label)
                if job["status"] == "diverged":
                    ax.plot(xs[-1:], loss[-1:], "x", color=f"C{i}", ms=10)
    for ax, xlabel in zip(axes, ("step", "training time, s (without eval)")):
        ax.set(xlabel=xlabel, ylabel="val loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def plot_layers(plt, panels: dict[str, dict[str, dict]], keys: tuple, ylabel: str, xlabel: str):
    """One panel per title, one line per label and key (solid: the first key, dashed: the second), log y."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels.items()):
        for i, (label, rec) in enumerate(series.items()):
            for key, style in zip(keys, ("-o", "--s")):
                if rec and key in rec:
                    name = f"{label} {key.removeprefix('grad_')}" if len(keys) > 1 else label
                    ax.plot(range(len(rec[key])), rec[key], style, color=f"C{i}", ms=3, label=name)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def figure(plt, out: Path, name: str, fn, *args) -> list[str]:
    """Draw out/name.png with fn (if matplotlib is there); its markdown."""
    if plt is None:
        return [f"*({name}.png skipped: matplotlib is not installed)*", ""]
    fig = fn(plt, *args)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=100)
    plt.close(fig)
    return [f"![{name}]({name}.png)", ""]


GRADS, LAYER = ("grad_attn", "grad_mlp"), "block (0 = nearest the input)"
RMS, STREAM = ("rms",), "residual stream (0 = embeddings, i = after block i)"


# ----------------------------------------------------------------------------- the report


def variants_section(plt, out: Path, groups: dict[str, list[dict]], unigram: float) -> list[str]:
    runs = {v: [j for j in js if not j["probe"]] for v, js in groups.items()}
    init = {v: next(j["init"] for j in js if j["probe"]) or {} for v, js in groups.items()}
    end = {v: last(rs[0]) for v, rs in runs.items()}  # the first seed's
    rows, per_layer = [], []
    for v, rs in runs.items():
        n = sum(j["status"] == "diverged" for j in rs)
        failed = [j["name"] for j in rs if j["status"] == "failed"]
        div = (f"yes ({n}/{len(rs)})" if n else "no") + (f"; failed: {', '.join(failed)}" if failed else "")
        ms, tok = step_stat(fastest(rs), "ms_per_step"), step_stat(fastest(rs), "tokens_per_sec")
        losses = [mean_std(final(j, "train_loss") for j in rs), mean_std(final(j) for j in rs)]
        load = fmt(fastest(rs).get("load", NAN), 1)
        rows.append([v, *losses, fmt(ms, 1), f"{tok:,.0f}" if math.isfinite(tok) else "—", div, load])
        i, e = init[v], end[v]
        per_layer.append([v, fmt(i.get("loss")), *(fmt(ratio(r.get(k))) for r in (i, e) for k in GRADS)])
        per_layer[-1] += [fmt(ratio(i.get("rms", [])[1:])), fmt(ratio(e.get("rms", [])[1:])), e.get("step", "—")]
    md = table(["variant", "final train loss", "final val loss", "ms/step*", "tokens/s*", "diverged", "load"], rows)
    md += ["*: of the fastest seed (the median over its log records but the first); load: the 1-minute load average"]
    md += [f"after that run, on {os.cpu_count()} cores (above that, the cores were shared: slower steps).", ""]
    md += ["Per layer: L/1 is the last block's value over the first block's (RMS: of the stream leaving it).", ""]
    head = ["variant", "loss at init", "attn grad L/1, init", "mlp grad L/1, init", "attn grad L/1, end"]
    md += table([*head, "mlp grad L/1, end", "RMS L/1, init", "RMS L/1, end", "end = step"], per_layer)
    md += figure(plt, out, "val_loss", plot_curves, runs)
    md += figure(plt, out, "grad_norms", plot_layers, {"at init": init, "at the end": end}, GRADS, "grad norm", LAYER)
    md += figure(plt, out, "rms", plot_layers, {"at init": init, "at the end": end}, RMS, "RMS", STREAM)
    md += ["### Reading", ""]
    ranked = sorted((x, v) for v, rs in runs.items() if math.isfinite(x := mean(final(j) for j in rs)))
    std = {v: statistics.stdev(xs) for v, rs in runs.items() if len(xs := finite(final(j) for j in rs)) > 1}
    if ranked:
        gap = f", {ranked[1][0] - ranked[0][0]:.4f} below {ranked[1][1]}" if len(ranked) > 1 else ""
        if len(ranked) > 1 and ranked[0][1] in std and ranked[1][1] in std:
            noise = 2 * max(std[ranked[0][1]], std[ranked[1][1]])
            gap += f" ({'within' if ranked[1][0] - ranked[0][0] < noise else 'more than'} 2 std = {noise:.4f})"
        order = " < ".join(f"{v} {x:.4f}" for x, v in ranked)
        md.append(f"- Lowest final val loss: **{ranked[0][1]}**{gap}. Order: {order}")
    base = {v: x for x, v in ranked}.get("pre_ln")
    if base is not None and len(ranked) > 1:
        diffs = ", ".join(f"{v} {x - base:+.4f}" for x, v in ranked if v != "pre_ln")
        md.append(f"- Final val loss minus pre_ln's: {diffs} nats")
    noise = f"one seed each, so gaps under {TOL} nats may be noise"
    noise = f"the largest seed-to-seed std is {max(std.values()):.4f}" if std else noise
    bad = [f"{j['name']} {o}" for rs in runs.values() for j in rs if (o := outcome(j, unigram)) != "trained"]
    md.append(f"- Noise: {noise}. " + (f"Not trained: {', '.join(bad)}." if bad else "Every run trained."))
    for v in runs:
        r, e = ratio(init[v].get("grad_mlp")), ratio(end[v].get("grad_mlp"))
        md.append(
            f"- {v}: last/first-block MLP grad norm {fmt(r)} at init ({shape(r)}), {fmt(e)} at the end ({shape(e)})"
        )
    return md + [""]


def q1(plt, out: Path, q: dict, unigram: float) -> list[str]:
    rows, needs, md = [], {}, []
    for pos in ("pre", "post"):
        on, off = q[f"{pos}-warmup"], q[f"{pos}-nowarmup"]
        for j in (on, off):
            best = min(finite(r["val_loss"] for r in j["evals"]), default=NAN)
            row = [fmt(final(j, "train_loss"), 4), fmt(final(j), 4), fmt(best, 4), outcome(j, unigram)]
            rows.append([f"{pos}-LN", j["config"].get("warmup_iters"), *row])
        d, res = final(off) - final(on), (outcome(on, unigram), outcome(off, unigram))
        needs[pos] = None if res[0] != "trained" else res[1] != "trained" or d > TOL
        md.append(
            f"- {pos}-LN: final val loss without warmup minus with: {d:+.4f} nats ({res[0]} with, {res[1]} without)"
        )
    c = q["pre-warmup"]["config"]
    if None in needs.values():
        bad = " and ".join(f"{p}-LN" for p, n in needs.items() if n is None)
        verdict = f"inconclusive: {bad} did not train even with warmup at this learning rate ({c.get('learning_rate')})"
    else:
        verdict = {
            (False, True): "yes: post-LN needed warmup, pre-LN did not",
            (True, True): "both needed warmup: no contrast between them here",
            (False, False): "neither needed warmup here (a higher learning rate or more depth may show it)",
            (True, False): "pre-LN needed warmup and post-LN did not: the opposite of the usual claim",
        }[needs["pre"], needs["post"]]
    rule = f"needs warmup: without it > {TOL} nats worse, stuck or diverged; one seed"
    md.append(f"- Answer ({rule}): **{verdict}**")
    setup = f"{c.get('n_layer')} layers, n_embd {c.get('n_embd')}, learning_rate {c.get('learning_rate')}"
    md = [f"Setup: {setup}, {c.get('max_iters')} steps, warmup_iters {c.get('warmup_iters')} vs 0.", "", *md, ""]
    md += table(["norm", "warmup_iters", "final train", "final val", "best val", "outcome"], rows)
    runs = ("pre-warmup", "pre-nowarmup", "post-warmup", "post-nowarmup")
    return md + figure(plt, out, "q1_warmup", plot_curves, {k: [q[k]] for k in runs})


def q2(plt, out: Path, q: dict) -> list[str]:
    md = ["Xiong et al. 2020 (On Layer Normalization in the Transformer Architecture) argue that at init the"]
    md += ["gradient norms of post-LN grow toward the output layer and those of pre-LN stay flat. Measured:", ""]
    rows, lines, panels = [], [], {}
    for init in ("gpt2", "xavier"):
        for pos in ("pre", "post"):
            r = panels.setdefault(f"{init} init", {})[f"{pos}-LN"] = q[f"init-{pos}-{init}"]["init"] or {}
            ra, rm = ratio(r.get("grad_attn")), ratio(r.get("grad_mlp"))
            rows.append([f"{pos}-LN, {init}", fmt(r.get("loss")), fmt(ra), fmt(rm), fmt(factor(r.get("grad_mlp")))])
            claim, holds = ("grow", rm > GROW) if pos == "post" else ("stay flat", 1 / GROW <= rm <= GROW)
            verdict = f"the claim that {pos}-LN's {claim} **{'holds' if holds else 'does not hold'}** here"
            verdict = verdict if math.isfinite(rm) else "no measurement"
            lines.append(f"- {pos}-LN, {init} init: L/1 grad norm {fmt(rm)} (MLP), {fmt(ra)} (attn); {verdict}")
    md += table(["case", "loss at init", "attn grad L/1", "mlp grad L/1", "mlp per-layer factor"], rows) + lines
    md += [f"- grows: L/1 > {GROW}, shrinks: L/1 < 1/{GROW}, else flat; mean over the probe's batches", ""]
    return md + figure(plt, out, "q2_init_grads", plot_layers, panels, GRADS, "grad norm at init", LAYER)


def q3(plt, out: Path, q: dict) -> list[str]:
    md = ["From the probes of question 2 (GPT-2 init) and the 12-layer runs of question 1 with warmup.", ""]
    rows, lines, panels = [], [], {"at init": {}, "at the end": {}}
    for pos in ("pre", "post"):
        for panel, r in zip(panels, (q[f"init-{pos}-gpt2"]["init"] or {}, last(q[f"{pos}-warmup"]))):
            panels[panel][f"{pos}-LN"], rms = r, r.get("rms", [NAN, NAN])
            when, growth = ("init" if panel == "at init" else f"step {r.get('step')}"), ratio(rms[1:])
            rows.append([f"{pos}-LN", when, fmt(rms[0]), fmt(rms[1]), fmt(rms[-1]), fmt(growth), fmt(factor(rms[1:]))])
            lines.append(f"- {pos}-LN, {when}: last-block/block-0 RMS = {fmt(growth)} ({shape(growth)})")
    head = ["norm", "when", "embeddings", "after block 0", "after last block", "last/block 0", "per-layer factor"]
    return md + table(head, rows) + lines + [""] + figure(plt, out, "q3_rms", plot_layers, panels, RMS, "RMS", STREAM)


def q4(plt, out: Path, q: dict, unigram: float) -> list[str]:
    names = {"pre-LN": ("init-pre-gpt2", "pre-warmup"), "no residual": ("init-no_residual", "no_residual-warmup")}
    init, runs = {k: q[a]["init"] or {} for k, (a, _) in names.items()}, {k: q[b] for k, (_, b) in names.items()}
    rows = []
    for k, j in runs.items():
        grads = [fmt(ratio(r.get("grad_mlp"))) for r in (init[k], last(j))]
        block0 = fmt(init[k].get("grad_mlp", [NAN])[0])
        rows.append([k, fmt(init[k].get("loss")), fmt(final(j), 4), outcome(j, unigram), *grads, block0])
    head = ["model", "loss at init", "final val", "outcome", "mlp grad L/1, init", "L/1, end", "block 0 mlp grad, init"]
    md = table(head, rows)
    (pre, nores), first = runs.values(), [(r.get("grad_mlp") or [NAN])[0] for r in init.values()]
    md.append(f"- Final val loss without residual connections minus pre-LN's: {final(nores) - final(pre):+.4f} nats")
    md.append(f"- At init, block 0's MLP gradient norm without residuals is {fmt(first[1] / first[0])}x pre-LN's")
    end0 = [(last(j).get("grad_mlp") or [NAN])[0] for j in runs.values()]
    md.append(f"- At the end (step {last(nores).get('step')}) it is {fmt(end0[1] / end0[0])}x pre-LN's")
    panels = {"at init": init, "at the end": {k: last(j) for k, j in runs.items()}}
    md += [""] + figure(plt, out, "q4_grads", plot_layers, panels, GRADS, "grad norm", LAYER)
    return md + figure(plt, out, "q4_loss", plot_curves, {k: [j] for k, j in runs.items()})


def q5(plt, out: Path, groups: dict[str, list[dict]], bench: dict) -> list[str]:
    md = ["From the variants pre_ln (LayerNorm) and rmsnorm, same budget and seeds; and one norm layer alone.", ""]
    if "pre_ln" in groups and "rmsnorm" in groups:
        runs = {v: [j for j in groups[v] if not j["probe"]] for v in ("pre_ln", "rmsnorm")}
        ms = {v: step_stat(fastest(rs), "ms_per_step") for v, rs in runs.items()}
        loss = {v: mean(final(j) for j in rs) for v, rs in runs.items()}
        rows = [[v, rs[0]["config"].get("device"), fmt(ms[v], 1), mean_std(map(final, rs))] for v, rs in runs.items()]
        md += table(["variant", "device", "ms/step", "final val loss"], rows)  # the load: in the variants table
        md.append(f"- Training step time, RMSNorm vs LayerNorm: {fmt((ms['rmsnorm'] / ms['pre_ln'] - 1) * 100, 1)}%")
        md.append(f"- Final val loss, RMSNorm minus LayerNorm: {loss['rmsnorm'] - loss['pre_ln']:+.4f} nats")
    else:
        md.append("- (add pre_ln and rmsnorm to --variants for the whole-step comparison)")
    for device, us in bench.items():
        diff = fmt((us["RMSNorm"] / us["LayerNorm"] - 1) * 100, 1)
        times = f"LayerNorm {us['LayerNorm']:.1f} µs, RMSNorm {us['RMSNorm']:.1f} µs ({diff}%)"
        md.append(f"- One norm layer, forward + backward on {device}: {times}")
    return md + ["- Times depend on the machine and its load: see the header.", ""]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip() + "\n\nvariants: " + ", ".join(VARIANTS))
        return 0
    import config

    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    try:
        opts = parse(argv)
        jobs, out = plan(opts), opts["out"]
        where = slots(jobs, opts["jobs"])
        print(f"{len(jobs)} runs into {out / 'runs'}, {len(where)} at a time", flush=True)
        run_all(jobs, out / "runs", opts["reuse"], where)
    except (StudyError, config.ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    plt, cfg = get_plt(), config.parse_args(config.TrainConfig, [opts["config"], *opts["user"]])
    bench = {}
    for device in ("cpu", "cuda") if 5 in opts["questions"] else ():
        if device == "cpu" or any(j["config"].get("device", "").startswith("cuda") for j in jobs):
            bench[device] = norm_bench(cfg.batch_size * cfg.block_size, cfg.n_embd, cfg.bias, device)
    unigram = unigram_loss(cfg)
    unigram_line = f"val loss of a model that knows only the token frequencies (unigram): {fmt(unigram, 4)}"
    wall, q = time.perf_counter() - t0, {j["name"].removeprefix("q-"): j for j in jobs if j["group"] == "q"}
    groups = {v: [j for j in jobs if j["group"] == v] for v in opts["variants"]}
    how = f"{len(where)} at once on " + (
        f"GPUs {','.join(where)}" if where[0] else "the CPU (step times not comparable)"
    )
    how = "one after another" if len(where) == 1 else how
    md = [f"# Norm study: {out.name}", "", f"`python study.py {' '.join(argv)}`", "", f"- {hardware()}"]
    md += [f"- load average (1 min): {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"]
    took = f"{wall / 60:.1f} min (the runs alone: {sum(j['wall'] for j in jobs) / 60:.1f} min)"
    md += [f"- {len(jobs)} runs, {how}; this study took {took}", f"- {unigram_line}", "", "## Variants", ""]
    md += variants_section(plt, out, groups, unigram)
    sections = {1: lambda: q1(plt, out, q, unigram), 2: lambda: q2(plt, out, q), 3: lambda: q3(plt, out, q)}
    sections |= {4: lambda: q4(plt, out, q, unigram), 5: lambda: q5(plt, out, groups, bench)}
    for n in sorted(opts["questions"]):
        md += [f"## Question {n}: {QUESTIONS[n]}", "", *sections[n]()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print(f"report: {out / 'report.md'} ({wall / 60:.1f} min)")
    return 1 if any(j["status"] == "failed" for j in jobs) else 0


if __name__ == "__main__":
    sys.exit(main())
