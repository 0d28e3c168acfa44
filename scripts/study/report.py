"""The study's report: the header (machine, load, time), the variants' tables, figures and reading, then
each question's section (registry.py), from the runs the runner made (runner.py).
"""

import math
import os
import platform
import statistics
import time
from pathlib import Path

from scripts.study import registry
from scripts.study.figures import GRADS, LAYER, RMS, STREAM, get_plt, plot_curves, plot_layers
from scripts.study.job import Job
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
        per_layer[-1] += [fmt(ratio(i.get("rms", [])[1:])), fmt(ratio(e.get("rms", [])[1:])), e.get("step", "—")]
    header = ["variant", "final train loss", "final val loss", "val bits/byte", "ms/step*", "tokens/s*", "diverged"]
    md = table([*header, "load"], rows)
    md += ["*: of the fastest seed (the median over its log records but the first); load: the 1-minute load average"]
    md += [f"after that run, on {os.cpu_count()} cores (above that, the cores were shared: slower steps).", ""]
    md += ["Per layer: L/1 is the last block's value over the first block's (RMS: of the stream leaving it).", ""]
    head = ["variant", "loss at init", "attn grad L/1, init", "mlp grad L/1, init", "attn grad L/1, end"]
    md += table([*head, "mlp grad L/1, end", "RMS L/1, init", "RMS L/1, end", "end = step"], per_layer)
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
    opts: the StudyOptions; started: (perf_counter, load average); measured: (unigram loss, norm_bench)."""
    (t0, load0), (unigram, bench) = started, measured
    groups = {v: [j for j in jobs if j.group == v] for v in opts.variant_names}
    q = {j.name.removeprefix("q-"): j for j in jobs if j.group == "q"}
    r, wall = Results(out, get_plt(), groups, q, unigram, bench), time.perf_counter() - t0
    how = f"{len(where)} at once on " + (
        f"GPUs {','.join(where)}" if where[0] else "the CPU (step times not comparable)"
    )
    how = "one after another" if len(where) == 1 else how
    md = [f"# Norm study: {out.name}", "", f"`{command}`", "", f"- {hardware()}"]
    md += [f"- load average (1 min): {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end"]
    took = f"{wall / 60:.1f} min (the runs alone: {sum(j.wall for j in jobs) / 60:.1f} min)"
    md += [f"- {len(jobs)} runs, {how}; this study took {took}"]
    md += [f"- val loss of a model that knows only the token frequencies (unigram): {fmt(r.unigram, 4)}", ""]
    md += ["## Variants", "", *variants_section(r)]
    for n in sorted(opts.question_numbers):
        question = registry.QUESTIONS[n]
        md += [f"## Question {n}: {question.title}", "", *question.section(r)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"
