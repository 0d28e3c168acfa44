"""The study's report: the header (machine, load, time), the variants' tables, figures and reading, then
each question's section (registry.py), from the runs the runner made (runner.py).
"""

import math
import os
import platform
import statistics
import time
from pathlib import Path

from scripts.study import registry, stats
from scripts.study.figures import GRADS, LAYER, RMS, STREAM, get_plt, plot_curves, plot_layers
from scripts.study.job import Job
from scripts.study.presets import PRESETS
from scripts.study.results import (
    TOL,
    Results,
    fastest,
    final,
    finite,
    fmt,
    last,
    mean,
    mean_std,
    outcome,
    ratio,
    shape,
    step_stat,
    table,
    top_ratio,
)

# ----------------------------------------------------------------------------- the header


def hardware() -> str:
    import torch

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.machine())
    gpu = f"; GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else ""
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


# ----------------------------------------------------------------------------- the variants


def variants_section(r: Results) -> list[str]:
    runs = {v: [j for j in js if not j.probe] for v, js in r.groups.items()}
    init = {v: next(j.init for j in js if j.probe) or {} for v, js in r.groups.items()}
    end = {v: last(rs[0]) for v, rs in runs.items()}  # the first seed's
    rows, per_layer = [], []
    for v, rs in runs.items():
        n = sum(j.status == "diverged" for j in rs)
        failed = [j.name for j in rs if j.status == "failed"]
        div = (f"yes ({n}/{len(rs)})" if n else "no") + (f"; failed: {', '.join(failed)}" if failed else "")
        ms, tok = step_stat(fastest(rs), "ms_per_step"), step_stat(fastest(rs), "tokens_per_sec")
        losses = [mean_std(final(j, "train_loss") for j in rs), mean_std(final(j) for j in rs)]
        losses.append(mean_std(final(j, "val_bpb") for j in rs))  # bits per byte: comparable across tokenizers
        rows.append(
            [v, *losses, fmt(ms, 1), f"{tok:,.0f}" if math.isfinite(tok) else "—", div, fmt(fastest(rs).load, 1)]
        )
        i, e = init[v], end[v]
        per_layer.append([v, fmt(i.get("loss")), *(fmt(ratio(rec.get(k))) for rec in (i, e) for k in GRADS)])
        per_layer[-1] += [fmt(ratio(i.get("rms", [])[1:])), fmt(ratio(e.get("rms", [])[1:]))]
        per_layer[-1] += [fmt(top_ratio(e)[0], 1), e.get("step", "—")]
    header = ["variant", "final train loss", "final val loss", "val bits/byte", "ms/step*", "tokens/s*", "diverged"]
    md = table([*header, "load"], rows)
    md += ["*: of the fastest seed (the median over its log records but the first); load: the 1-minute load average"]
    md += [f"after that run, on {os.cpu_count()} cores (above that, the cores were shared: slower steps).", ""]
    md += ["Per layer: L/1 is the last block's value over the first block's (RMS: of the stream leaving it);"]
    md += ["top/median |h|: the largest over the blocks of the stream's largest |h| over its median (question 12).", ""]
    head = ["variant", "loss at init", "attn grad L/1, init", "mlp grad L/1, init", "attn grad L/1, end"]
    md += table(
        [*head, "mlp grad L/1, end", "RMS L/1, init", "RMS L/1, end", "top/median |h|, end", "end = step"], per_layer
    )
    md += r.figure("val_loss", plot_curves, runs)
    md += r.figure("grad_norms", plot_layers, {"at init": init, "at the end": end}, GRADS, "grad norm", LAYER)
    md += r.figure("rms", plot_layers, {"at init": init, "at the end": end}, RMS, "RMS", STREAM)
    return md + ["### Reading", "", *variants_reading(runs, init, end, r.unigram), ""]


def variants_reading(runs: dict[str, list[Job]], init: dict, end: dict, unigram: float) -> list[str]:
    """Sentences from the numbers: the ranking, the gaps against the noise, what did not train, the profiles."""
    md = []
    ranked = sorted((x, v) for v, rs in runs.items() if math.isfinite(x := mean(final(j) for j in rs)))
    std = {v: statistics.stdev(xs) for v, rs in runs.items() if len(xs := finite(final(j) for j in rs)) > 1}
    if ranked:
        gap = ""
        if len(ranked) > 1:  # the best against the runner-up: Welch over their seeds
            c = stats.welch((final(j) for j in runs[ranked[0][1]]), (final(j) for j in runs[ranked[1][1]]))
            gap = f", below {ranked[1][1]} by {stats.describe(c)}: {stats.verdict(c, None, 'lower', 'detected')}"
        order = " < ".join(f"{v} {x:.4f}" for x, v in ranked)
        md.append(f"- Lowest final val loss: **{ranked[0][1]}**{gap}. Order: {order}")
    base = {v: x for x, v in ranked}.get("pre_ln")
    if base is not None and len(ranked) > 1:
        diffs = ", ".join(f"{v} {x - base:+.4f}" for x, v in ranked if v != "pre_ln")
        md.append(f"- Final val loss minus pre_ln's: {diffs} nats")
    noise = f"one seed each, so gaps under {TOL} nats may be noise"
    noise = f"the largest seed-to-seed std is {max(std.values()):.4f}" if std else noise
    bad = [f"{j.name} {o}" for rs in runs.values() for j in rs if (o := outcome(j, unigram)) != "trained"]
    md.append(f"- Noise: {noise}. " + (f"Not trained: {', '.join(bad)}." if bad else "Every run trained."))
    for v in runs:
        a, b = ratio(init[v].get("grad_mlp")), ratio(end[v].get("grad_mlp"))
        md.append(
            f"- {v}: last/first-block MLP grad norm {fmt(a)} at init ({shape(a)}), {fmt(b)} at the end ({shape(b)})"
        )
    return md


# ----------------------------------------------------------------------------- the report


def write(out: Path, jobs: list[Job], opts, command: str, where: list, started: tuple, measured: tuple) -> Path:
    """out/report.md and its figures: the header (machine, load, time), the variants, then each question.
    opts: the StudyOptions; started: (perf_counter, load average, estimated minutes); measured: (unigram
    loss, norm_bench)."""
    (t0, load0, minutes), (unigram, bench) = started, measured
    groups = {v: [j for j in jobs if j.group == v] for v in opts.variant_names}
    reps = {}
    for j in jobs:
        if j.group == "q":
            reps.setdefault(j.run, []).append(j)
    q = {name: js[0] for name, js in reps.items()}
    r, wall = Results(out, get_plt(), groups, q, unigram, bench, reps), time.perf_counter() - t0
    how = f"{len(where)} at once on " + (
        f"GPUs {','.join(where)}" if where[0] else "one device (step times inflated by sharing it)"
    )
    how = "one after another" if len(where) == 1 else how
    preset = PRESETS[opts.preset]
    md = [f"# Norm study: {out.name}", "", f"`{command}`", "", f"- preset {preset.name}: {preset.note}"]
    md += [f"- {hardware()}", f"- load average (1 min): {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"]
    took = f"{wall / 60:.1f} min (the runs alone: {sum(j.wall for j in jobs) / 60:.1f} min; estimated {minutes:.0f})"
    md += [f"- {len(jobs)} runs, {how}; {opts.seeds} seeds per arm; this study took {took}"]
    md += [f"- val loss of a model that knows only the token frequencies (unigram): {fmt(r.unigram, 4)}", ""]
    md += ["## Variants", "", *variants_section(r)]
    for n in sorted(opts.question_numbers):
        question = registry.QUESTIONS[n]
        md += [f"## Question {n}: {question.title}", "", *question.section(r)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"
