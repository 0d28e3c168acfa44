"""The study's report: its numbers, tables, figures and questions 1-5, from the runs study.py made
(questions 6-9: questions.py).

Each question is a function that reads Results and returns its markdown lines; QUESTIONS at the end
lists them. A new question is one function here, one line in QUESTIONS and its runs in study.py's Q_RUNS.
"""

import math
import os
import platform
import statistics
import time
import typing
from dataclasses import dataclass
from pathlib import Path

if typing.TYPE_CHECKING:
    from scripts.study.runner import Job

TOL = 0.05  # nats: a smaller loss difference between single-seed runs is called no difference
GROW = 1.5  # last/first layer ratio above this "grows toward the output", below 1/GROW "shrinks", else "flat"
NAN = float("nan")

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


def final(job: "Job", key: str = "val_loss") -> float:
    return job.evals[-1][key] if job.status == "ok" and job.evals else NAN


def step_stat(job: "Job", key: str) -> float:
    """Median over the log records but the first (it holds the slow first step)."""
    recs = job.trains[1:] or job.trains
    return statistics.median(r[key] for r in recs) if recs else NAN


def fastest(runs: list["Job"]) -> "Job":
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


def outcome(job: "Job", unigram: float) -> str:
    """diverged | failed | stuck (val loss within TOL of knowing only the token frequencies) | trained."""
    return job.status if job.status != "ok" else "stuck" if final(job) > unigram - TOL else "trained"


def last(job: "Job") -> dict:
    """The run's last telemetry record: the statistics 'at the end'."""
    return job.tele[-1] if job.tele else {}


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


# ----------------------------------------------------------------------------- the header and figures


def hardware() -> str:
    import torch

    info = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name")), platform.machine())
    gpu = f"; GPU: {torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}" if torch.cuda.is_available() else ""
    return f"CPU: {cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads){gpu}"


def get_plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped, tables only (pip install matplotlib)", flush=True)
        return None
    return plt


def plot_curves(plt, curves: dict[str, list["Job"]]):
    """Val loss vs step and vs training time (eval left out); x marks a diverged run's last eval."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, jobs) in enumerate(curves.items()):
        for k, job in enumerate(j for j in jobs if j.evals):
            ev, loss = job.evals, [r["val_loss"] for r in job.evals]
            for ax, xs in zip(axes, ([r["step"] for r in ev], [r["time"] - r["eval_time"] for r in ev])):
                ax.plot(xs, loss, color=f"C{i}", label=None if k else label)
                if job.status == "diverged":
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


GRADS, LAYER = ("grad_attn", "grad_mlp"), "block (0 = nearest the input)"
RMS, STREAM = ("rms",), "residual stream (0 = embeddings, i = after block i)"


@dataclass
class Results:
    """What every section of the report reads."""

    out: Path  # the study's folder: report.md and the figures go here
    plt: typing.Any  # matplotlib.pyplot, or None: tables only
    groups: dict[str, list["Job"]]  # variant: its probe and its seeds
    q: dict[str, "Job"]  # the questions' runs, by their name in study.Q_RUNS
    unigram: float  # the val loss of a model that knows only the token frequencies
    bench: dict[str, dict[str, float]]  # device: norm layer: µs per forward + backward

    def figure(self, name: str, fn, *args) -> list[str]:
        """Draw out/name.png with fn (if matplotlib is there); its markdown."""
        if self.plt is None:
            return [f"*({name}.png skipped: matplotlib is not installed)*", ""]
        fig = fn(self.plt, *args)
        fig.tight_layout()
        fig.savefig(self.out / f"{name}.png", dpi=100)
        self.plt.close(fig)
        return [f"![{name}]({name}.png)", ""]


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
        rows.append(
            [v, *losses, fmt(ms, 1), f"{tok:,.0f}" if math.isfinite(tok) else "—", div, fmt(fastest(rs).load, 1)]
        )
        i, e = init[v], end[v]
        per_layer.append([v, fmt(i.get("loss")), *(fmt(ratio(rec.get(k))) for rec in (i, e) for k in GRADS)])
        per_layer[-1] += [fmt(ratio(i.get("rms", [])[1:])), fmt(ratio(e.get("rms", [])[1:])), e.get("step", "—")]
    md = table(["variant", "final train loss", "final val loss", "ms/step*", "tokens/s*", "diverged", "load"], rows)
    md += ["*: of the fastest seed (the median over its log records but the first); load: the 1-minute load average"]
    md += [f"after that run, on {os.cpu_count()} cores (above that, the cores were shared: slower steps).", ""]
    md += ["Per layer: L/1 is the last block's value over the first block's (RMS: of the stream leaving it).", ""]
    head = ["variant", "loss at init", "attn grad L/1, init", "mlp grad L/1, init", "attn grad L/1, end"]
    md += table([*head, "mlp grad L/1, end", "RMS L/1, init", "RMS L/1, end", "end = step"], per_layer)
    md += r.figure("val_loss", plot_curves, runs)
    md += r.figure("grad_norms", plot_layers, {"at init": init, "at the end": end}, GRADS, "grad norm", LAYER)
    md += r.figure("rms", plot_layers, {"at init": init, "at the end": end}, RMS, "RMS", STREAM)
    return md + ["### Reading", "", *variants_reading(runs, init, end, r.unigram), ""]


def variants_reading(runs: dict[str, list["Job"]], init: dict, end: dict, unigram: float) -> list[str]:
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


# ----------------------------------------------------------------------------- the questions


def warmup_verdict(needs: dict[str, bool | None], learning_rate) -> str:
    """Question 1's answer from pre- and post-LN's needs (None: it did not train even with warmup)."""
    if None in needs.values():
        bad = " and ".join(f"{p}-LN" for p, n in needs.items() if n is None)
        return f"inconclusive: {bad} did not train even with warmup at this learning rate ({learning_rate})"
    return {
        (False, True): "yes: post-LN needed warmup, pre-LN did not",
        (True, True): "both needed warmup: no contrast between them here",
        (False, False): "neither needed warmup here (a higher learning rate or more depth may show it)",
        (True, False): "pre-LN needed warmup and post-LN did not: the opposite of the usual claim",
    }[needs["pre"], needs["post"]]


def q1(r: Results) -> list[str]:
    rows, needs, md = [], {}, []
    for pos in ("pre", "post"):
        on, off = r.q[f"{pos}-warmup"], r.q[f"{pos}-nowarmup"]
        for j in (on, off):
            best = min(finite(e["val_loss"] for e in j.evals), default=NAN)
            row = [fmt(final(j, "train_loss"), 4), fmt(final(j), 4), fmt(best, 4), outcome(j, r.unigram)]
            rows.append([f"{pos}-LN", j.config.get("warmup_iters"), *row])
        d, res = final(off) - final(on), (outcome(on, r.unigram), outcome(off, r.unigram))
        needs[pos] = None if res[0] != "trained" else res[1] != "trained" or d > TOL
        md.append(
            f"- {pos}-LN: final val loss without warmup minus with: {d:+.4f} nats ({res[0]} with, {res[1]} without)"
        )
    c = r.q["pre-warmup"].config
    rule = f"needs warmup: without it > {TOL} nats worse, stuck or diverged; one seed"
    md.append(f"- Answer ({rule}): **{warmup_verdict(needs, c.get('learning_rate'))}**")
    setup = f"{c.get('n_layer')} layers, n_embd {c.get('n_embd')}, learning_rate {c.get('learning_rate')}"
    md = [f"Setup: {setup}, {c.get('max_iters')} steps, warmup_iters {c.get('warmup_iters')} vs 0.", "", *md, ""]
    md += table(["norm", "warmup_iters", "final train", "final val", "best val", "outcome"], rows)
    runs = ("pre-warmup", "pre-nowarmup", "post-warmup", "post-nowarmup")
    return md + r.figure("q1_warmup", plot_curves, {k: [r.q[k]] for k in runs})


def q2(r: Results) -> list[str]:
    md = ["Xiong et al. 2020 (On Layer Normalization in the Transformer Architecture) argue that at init the"]
    md += ["gradient norms of post-LN grow toward the output layer and those of pre-LN stay flat. Measured:", ""]
    rows, lines, panels = [], [], {}
    for init in ("gpt2", "xavier"):
        for pos in ("pre", "post"):
            rec = panels.setdefault(f"{init} init", {})[f"{pos}-LN"] = r.q[f"init-{pos}-{init}"].init or {}
            ra, rm = ratio(rec.get("grad_attn")), ratio(rec.get("grad_mlp"))
            rows.append([f"{pos}-LN, {init}", fmt(rec.get("loss")), fmt(ra), fmt(rm), fmt(factor(rec.get("grad_mlp")))])
            claim, holds = ("grow", rm > GROW) if pos == "post" else ("stay flat", 1 / GROW <= rm <= GROW)
            verdict = f"the claim that {pos}-LN's {claim} **{'holds' if holds else 'does not hold'}** here"
            verdict = verdict if math.isfinite(rm) else "no measurement"
            lines.append(f"- {pos}-LN, {init} init: L/1 grad norm {fmt(rm)} (MLP), {fmt(ra)} (attn); {verdict}")
    md += table(["case", "loss at init", "attn grad L/1", "mlp grad L/1", "mlp per-layer factor"], rows) + lines
    md += [f"- grows: L/1 > {GROW}, shrinks: L/1 < 1/{GROW}, else flat; mean over the probe's batches", ""]
    return md + r.figure("q2_init_grads", plot_layers, panels, GRADS, "grad norm at init", LAYER)


def q3(r: Results) -> list[str]:
    md = ["From the probes of question 2 (GPT-2 init) and the 12-layer runs of question 1 with warmup.", ""]
    rows, lines, panels = [], [], {"at init": {}, "at the end": {}}
    for pos in ("pre", "post"):
        for panel, rec in zip(panels, (r.q[f"init-{pos}-gpt2"].init or {}, last(r.q[f"{pos}-warmup"]))):
            panels[panel][f"{pos}-LN"], rms = rec, rec.get("rms", [NAN, NAN])
            when, growth = ("init" if panel == "at init" else f"step {rec.get('step')}"), ratio(rms[1:])
            rows.append([f"{pos}-LN", when, fmt(rms[0]), fmt(rms[1]), fmt(rms[-1]), fmt(growth), fmt(factor(rms[1:]))])
            lines.append(f"- {pos}-LN, {when}: last-block/block-0 RMS = {fmt(growth)} ({shape(growth)})")
    head = ["norm", "when", "embeddings", "after block 0", "after last block", "last/block 0", "per-layer factor"]
    return md + table(head, rows) + lines + [""] + r.figure("q3_rms", plot_layers, panels, RMS, "RMS", STREAM)


def q4(r: Results) -> list[str]:
    names = {"pre-LN": ("init-pre-gpt2", "pre-warmup"), "no residual": ("init-no_residual", "no_residual-warmup")}
    init, runs = {k: r.q[a].init or {} for k, (a, _) in names.items()}, {k: r.q[b] for k, (_, b) in names.items()}
    rows = []
    for k, j in runs.items():
        grads = [fmt(ratio(rec.get("grad_mlp"))) for rec in (init[k], last(j))]
        block0 = fmt(init[k].get("grad_mlp", [NAN])[0])
        rows.append([k, fmt(init[k].get("loss")), fmt(final(j), 4), outcome(j, r.unigram), *grads, block0])
    head = ["model", "loss at init", "final val", "outcome", "mlp grad L/1, init", "L/1, end", "block 0 mlp grad, init"]
    md = table(head, rows)
    (pre, nores), first = runs.values(), [(rec.get("grad_mlp") or [NAN])[0] for rec in init.values()]
    md.append(f"- Final val loss without residual connections minus pre-LN's: {final(nores) - final(pre):+.4f} nats")
    md.append(f"- At init, block 0's MLP gradient norm without residuals is {fmt(first[1] / first[0])}x pre-LN's")
    end0 = [(last(j).get("grad_mlp") or [NAN])[0] for j in runs.values()]
    md.append(f"- At the end (step {last(nores).get('step')}) it is {fmt(end0[1] / end0[0])}x pre-LN's")
    panels = {"at init": init, "at the end": {k: last(j) for k, j in runs.items()}}
    md += [""] + r.figure("q4_grads", plot_layers, panels, GRADS, "grad norm", LAYER)
    return md + r.figure("q4_loss", plot_curves, {k: [j] for k, j in runs.items()})


def q5(r: Results) -> list[str]:
    md = ["From the variants pre_ln (LayerNorm) and rmsnorm, same budget and seeds; and one norm layer alone.", ""]
    if "pre_ln" in r.groups and "rmsnorm" in r.groups:
        runs = {v: [j for j in r.groups[v] if not j.probe] for v in ("pre_ln", "rmsnorm")}
        ms = {v: step_stat(fastest(rs), "ms_per_step") for v, rs in runs.items()}
        loss = {v: mean(final(j) for j in rs) for v, rs in runs.items()}
        rows = [[v, rs[0].config.get("device"), fmt(ms[v], 1), mean_std(map(final, rs))] for v, rs in runs.items()]
        md += table(["variant", "device", "ms/step", "final val loss"], rows)  # the load: in the variants table
        md.append(f"- Training step time, RMSNorm vs LayerNorm: {fmt((ms['rmsnorm'] / ms['pre_ln'] - 1) * 100, 1)}%")
        md.append(f"- Final val loss, RMSNorm minus LayerNorm: {loss['rmsnorm'] - loss['pre_ln']:+.4f} nats")
    else:
        md.append("- (add pre_ln and rmsnorm to --variants for the whole-step comparison)")
    for device, us in r.bench.items():
        diff = fmt((us["RMSNorm"] / us["LayerNorm"] - 1) * 100, 1)
        times = f"LayerNorm {us['LayerNorm']:.1f} µs, RMSNorm {us['RMSNorm']:.1f} µs ({diff}%)"
        md.append(f"- One norm layer, forward + backward on {device}: {times}")
    return md + ["- Times depend on the machine and its load: see the header.", ""]


QUESTIONS = {  # number: (title, its section); its runs are study.py's Q_RUNS that name the number
    1: ("Does post-LN need warmup where pre-LN does not?", q1),
    2: ("Per-layer gradient norms at initialisation: pre- vs post-LN, GPT-2 vs Xavier init", q2),
    3: ("Residual-stream RMS growth with depth, pre- vs post-LN", q3),
    4: ("Removing the residual connections in a 12-layer model", q4),
    5: ("RMSNorm vs LayerNorm: step time and final loss", q5),
}


# ----------------------------------------------------------------------------- the report


def write(out: Path, jobs: list["Job"], opts, command: str, where: list, started: tuple, measured: tuple,
          questions: dict = QUESTIONS) -> Path:  # fmt: skip
    """out/report.md and its figures: the header (machine, load, time), the variants, then each question.
    opts: the StudyOptions; started: (perf_counter, load average); measured: (unigram loss, norm_bench);
    questions: number: (title, section), these five and study_tricks' (study.QUESTIONS)."""
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
        title, section = questions[n]
        md += [f"## Question {n}: {title}", "", *section(r)]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out / "report.md"
