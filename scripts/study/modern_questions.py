"""Questions 6-9: today's residual and normalization tricks (QK-norm, the learned residual scalars, Muon,
RoPE, the modern stack), from the runs the study made.

Like questions 1-5 (norm_questions.py), each is a Question (question.py): the runs its section reads and
the section, a function that reads Results and returns its markdown lines. QUESTIONS at the end lists
them; registry.py lists those.
"""

import math

from scripts.study import stats
from scripts.study.figures import plot_curves
from scripts.study.job import Job
from scripts.study.question import LEARNED_SCALARS, LR_SWEEP, POST_WARMUP, PRE_WARMUP, Question
from scripts.study.results import (
    NAN,
    Results,
    fastest,
    final,
    finite,
    fmt,
    last,
    mean,
    mean_std,
    step_stat,
    table,
)

LEARNED = 0.5  # nats: a run "trains" when its final val loss is at least this far below the unigram loss
SETTINGS = {"pre-LN": ("pre", False), "pre-LN + qk_norm": ("pre", True)}
SETTINGS |= {"post-LN": ("post", False), "post-LN + qk_norm": ("post", True)}

# ----------------------------------------------------------------------------- val-loss curves


def curve(job: Job, x: str) -> list[tuple[float, float]]:
    """(x, val loss) at each evaluation; x: "step", "tokens" or "seconds" (training time, eval left out)."""
    per_step = (job.config.get("batch_size", 0) * job.config.get("block_size", 0)) * job.config.get(
        "gradient_accumulation_steps", 1
    )
    value = {"step": lambda e: e["step"], "tokens": lambda e: e["step"] * per_step}
    value["seconds"] = lambda e: e["time"] - e["eval_time"]
    return [(value[x](e), e["val_loss"]) for e in job.evals if math.isfinite(e["val_loss"])]


def reach(job: Job, level: float, x: str) -> float:
    """The x at which the val loss first falls to level, linear between evaluations; NAN if it never does."""
    pts = curve(job, x)
    if pts and pts[0][1] <= level:
        return pts[0][0]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y1 <= level:
            return x0 + (x1 - x0) * (y0 - level) / (y0 - y1)
    return NAN


def at(job: Job, where: float, x: str) -> float:
    """The val loss at x = where, linear between evaluations; NAN outside the run."""
    pts = curve(job, x)
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= where <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (where - x0) / (x1 - x0)
    return NAN


def seeds(r: Results, variant: str) -> list[Job]:
    return [j for j in r.groups.get(variant, []) if not j.probe]


def versus(arm: list[Job], base: list[Job]) -> str:
    """The final val loss of arm minus base's: the difference, its 95% interval, Welch's p, and the words."""
    c = stats.welch(map(final, base), map(final, arm))
    return f"{stats.describe(c)}: {stats.verdict(c)}"


def missing(r: Results, *variants: str) -> list[str]:
    gone = [v for v in variants if not seeds(r, v)]
    return [f"- (add {', '.join(gone)} to --variants for this question)", ""] if gone else []


# ----------------------------------------------------------------------------- question 6


def trains(job: Job, unigram: float) -> bool:
    return job.status == "ok" and final(job) < unigram - LEARNED


def sweep(r: Results) -> dict[str, dict[float, Job]]:
    """Question 6's cells by setting and learning rate, read from the runs' own configs; the plain runs at
    Q_BASE's learning rate are question 1's warmup runs."""
    cells = {s: {} for s in SETTINGS}
    for name, job in r.q.items():
        c = job.config
        if name.startswith("lr-") or name in (PRE_WARMUP.name, POST_WARMUP.name):
            for s, key in SETTINGS.items():
                if (c.get("norm_position"), c.get("qk_norm")) == key:
                    cells[s][c.get("learning_rate")] = job
    return {s: dict(sorted(by_lr.items())) for s, by_lr in cells.items()}


def widens(plain: list[float], qk: list[float]) -> str:
    if set(qk) == set(plain):
        return "same range"
    return "widens" if set(qk) > set(plain) else "narrows" if set(qk) < set(plain) else "a different range"


def plot_sweep(plt, cells: dict, unigram: float):
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for i, (setting, by_lr) in enumerate(cells.items()):
        lrs = list(by_lr)
        style = "--s" if setting.endswith("qk_norm") else "-o"
        ax.plot(lrs, [final(by_lr[lr]) for lr in lrs], style, color=f"C{i // 2}", label=setting)
    ax.axhline(unigram, color="gray", lw=0.8, label="unigram loss")
    ax.axhline(unigram - LEARNED, color="gray", ls=":", lw=0.8, label=f"unigram - {LEARNED} (trains below)")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel="final val loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def sweep_cell(job: Job, trained: bool) -> str:
    return job.status if job.status != "ok" else fmt(final(job), 4) + ("" if trained else " ✗")


def q6(r: Results) -> list[str]:
    cells = sweep(r)
    lrs = sorted({lr for by_lr in cells.values() for lr in by_lr})
    c = next((j.config for by_lr in cells.values() for j in by_lr.values()), {})
    setup = f"{c.get('n_layer')} layers, n_embd {c.get('n_embd')}, {c.get('max_iters')} steps, warmup "
    md = [setup + f"{c.get('warmup_iters')}, one seed; trains: final val loss more than {LEARNED} nats below the"]
    md += [f"unigram loss ({fmt(r.unigram - LEARNED, 4)}); ✗: did not. Attention logit: the largest |q.k|/sqrt(hs)"]
    md += ["over the layers, at the last telemetry record.", ""]
    rows, logits, ranges = [], [], {}
    for setting, by_lr in cells.items():
        ok = ranges[setting] = [lr for lr, j in by_lr.items() if trains(j, r.unigram)]
        cell = {lr: sweep_cell(j, lr in ok) for lr, j in by_lr.items()}
        rows.append([setting, *(cell.get(lr, "—") for lr in lrs), ", ".join(f"{lr:g}" for lr in ok) or "none"])
        top = {lr: max(last(j).get("attn_logit_max") or [NAN]) for lr, j in by_lr.items()}
        logits.append([setting, *(fmt(top.get(lr, NAN), 1) for lr in lrs)])
    md += table(["setting", *(f"lr {lr:g}" for lr in lrs), "trains at"], rows)
    md += table(["largest attention logit, end", *(f"lr {lr:g}" for lr in lrs)], logits)
    verdicts = []
    for pos in ("pre", "post"):
        plain, qk = cells[f"{pos}-LN"], cells[f"{pos}-LN + qk_norm"]
        ok, ok_qk = ranges[f"{pos}-LN"], ranges[f"{pos}-LN + qk_norm"]
        diffs = ", ".join(f"{final(qk[lr]) - final(plain[lr]):+.4f} at {lr:g}" for lr in ok if lr in ok_qk)
        md.append(f"- {pos}-LN, final val loss with qk_norm minus without where both train: {diffs or 'none'}")
        counts = f"{widens(ok, ok_qk)} ({len(ok_qk)} of {len(lrs)} with qk_norm, {len(ok)} without)"
        gone = [f"{lr:g}" for lr in lrs if lr not in plain or lr not in qk]
        verdicts.append(f"{pos}-LN: " + (f"incomplete (no run at learning rate {', '.join(gone)})" if gone else counts))
    md += [f"- Answer (learning rates at which it trains; one seed): **{'; '.join(verdicts)}**", ""]
    return md + r.figure("q6_qk_norm_lr", plot_sweep, cells, r.unigram)


# ----------------------------------------------------------------------------- question 7

SCALARS = {"resid_a": "a_i (x's weight)", "resid_b": "b_i (x0's weight)", "v_lambda": "l_i (v0's share)"}


def plot_scalars(plt, tele: list[dict]):
    """One panel per scalar, one line per block over the steps (dark: block 0, light: the last)."""
    fig, axes = plt.subplots(1, len(SCALARS), figsize=(15, 4))
    for ax, (key, title) in zip(axes, SCALARS.items()):
        recs = [t for t in tele if key in t]
        n = len(recs[0][key]) if recs else 0
        for i in range(n):
            color = plt.cm.viridis(i / max(1, n - 1))
            ax.plot([t["step"] for t in recs], [t[key][i] for t in recs], color=color, label=f"block {i}")
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
        if n:
            ax.legend(fontsize=6, ncol=2)
    return fig


def q7(r: Results) -> list[str]:
    job, base = r.q[LEARNED_SCALARS.name], r.q[PRE_WARMUP.name]
    end = last(job)
    c, step = job.config, end.get("step")
    md = [f"A {c.get('n_layer')}-layer pre-LN run with residual_scalars and value_residual (otherwise question 1's"]
    md += [f"with warmup), one seed; scalar_lr {c.get('scalar_lr')}. Before block i: x = a_i * x + b_i * x0 (x0: the"]
    md += ["embeddings); in block i's attention: v = (1 - l_i) * v + l_i * v0 (v0: block 0's values).", ""]
    if not all(k in end for k in SCALARS):
        return md + ["- (no telemetry of the scalars in this run: it failed, or telemetry was off)", ""]
    cols = {k: end[k] for k in SCALARS}
    rows = [[i, *(fmt(cols[k][i], 4) for k in SCALARS)] for i in range(len(cols["resid_a"]))]
    md += [f"At the last telemetry record (step {step}); at init a_i = 1, b_i = 0, l_i = 0.5:", ""]
    md += table(["block", *SCALARS.values()], rows)
    for key, title in SCALARS.items():
        vals = cols[key][1:] if key == "v_lambda" else cols[key]  # block 0 has no l_i
        first = 1 if key == "v_lambda" else 0
        hi, lo = max(range(len(vals)), key=vals.__getitem__), min(range(len(vals)), key=vals.__getitem__)
        md.append(
            f"- {title}: from {fmt(vals[0], 4)} (block {first}) to {fmt(vals[-1], 4)} (block {len(vals) - 1 + first}); "
            f"largest {fmt(vals[hi], 4)} at block {hi + first}, smallest {fmt(vals[lo], 4)} at block {lo + first}"
        )
    diff = final(job) - final(base)
    md.append(f"- Final val loss {fmt(final(job), 4)}, minus plain pre-LN's (question 1's, warmup): {diff:+.4f} nats")
    return md + [""] + r.figure("q7_scalars", plot_scalars, job.tele)


# ----------------------------------------------------------------------------- question 8


def plot_level(plt, curves: dict[str, list[Job]], level: float):
    fig = plot_curves(plt, curves)
    for ax in fig.axes:
        ax.axhline(level, color="gray", ls=":", lw=0.8)
    return fig


def q8(r: Results) -> list[str]:
    md = ["From the variants pre_ln (AdamW) and muon (torch.optim.Muon for the blocks' matrices, AdamW for the"]
    md += ["rest): same model, data order, budget and seeds. The level: the highest final val loss of any of their"]
    md += ["runs, so every run reaches it; steps, tokens and seconds (training time, eval left out) to reach it,"]
    md += ["linear between evaluations, mean over seeds.", ""]
    if gone := missing(r, "pre_ln", "muon"):
        return md + gone
    runs = {"AdamW": seeds(r, "pre_ln"), "Muon": seeds(r, "muon")}
    level = max(finite(final(j) for rs in runs.values() for j in rs), default=NAN)
    got, rows = {}, []
    for name, rs in runs.items():
        got[name] = {x: mean(reach(j, level, x) for j in rs) for x in ("step", "tokens", "seconds")}
        ms = step_stat(fastest(rs), "ms_per_step")
        rows.append([name, *(fmt(got[name][x], 1) for x in ("step", "tokens", "seconds")), fmt(ms, 1)])
        rows[-1].append(mean_std(final(j) for j in rs))
    md += [f"Level: val loss {fmt(level, 4)}.", ""]
    md += table(["optimizer", "steps to level", "tokens to level", "seconds to level", "ms/step", "final val"], rows)
    steps, secs = (got["Muon"][x] / got["AdamW"][x] for x in ("step", "seconds"))
    md.append(f"- Muon needed {fmt(steps)}x AdamW's steps (and tokens) and {fmt(secs)}x its training time to the level")
    md.append(f"- Final val loss, Muon minus AdamW: {versus(runs['Muon'], runs['AdamW'])}")
    md += ["- Times depend on the machine and its load: see the header.", ""]
    return md + r.figure("q8_muon", plot_level, runs, level)


# ----------------------------------------------------------------------------- question 9


def q9(r: Results) -> list[str]:
    md = ["From the variants pre_ln (GPT-2: LayerNorm, learned positions, AdamW), rope (rotary positions, else"]
    md += ["pre_ln) and modern (RMSNorm without weights, qk_norm, embed_norm, rope, residual_scalars,"]
    md += ["value_residual, logit softcap, Muon). Same budget and seeds. At the same time: the val loss at the"]
    md += ["shortest of their runs' training times (eval left out), linear between evaluations.", ""]
    if gone := missing(r, "pre_ln", "rope", "modern"):
        return md + gone
    runs = {v: seeds(r, v) for v in ("pre_ln", "rope", "modern")}
    ends = [curve(j, "seconds")[-1][0] for rs in runs.values() for j in rs if curve(j, "seconds")]
    t = min(ends, default=NAN)
    at_t = {v: mean(at(j, t, "seconds") for j in rs) for v, rs in runs.items()}
    rows = []
    for v, rs in runs.items():
        secs = mean(curve(j, "seconds")[-1][0] for j in rs if curve(j, "seconds"))
        ms = step_stat(fastest(rs), "ms_per_step")
        rows.append([v, mean_std(final(j) for j in rs), fmt(ms, 1), fmt(secs, 1), fmt(at_t[v], 4)])
    md += table(["variant", "final val", "ms/step", "training seconds", f"val at {fmt(t, 1)} s"], rows)
    for v in ("rope", "modern"):
        md.append(
            f"- {v} minus pre_ln: final val loss {versus(runs[v], runs['pre_ln'])}; "
            f"at {fmt(t, 1)} s {at_t[v] - at_t['pre_ln']:+.4f} nats"
        )
    md += ["- Times depend on the machine and its load: see the header.", ""]
    return md + r.figure("q9_rope_modern", plot_curves, runs)


QUESTIONS = (
    Question(
        6,
        "Does QK-norm widen the range of learning rates at which a 12-layer model trains?",
        (PRE_WARMUP, POST_WARMUP, *LR_SWEEP),
        q6,
    ),
    Question(
        7,
        "What do the learned residual scalars and value-residual weights converge to, layer by layer?",
        (LEARNED_SCALARS, PRE_WARMUP),
        q7,
    ),
    # questions 8 and 9 read the variants they name (muon; rope, modern) beside pre_ln
    Question(8, "Muon vs AdamW: steps, tokens and time to the same val loss, and the final loss", (), q8),
    Question(
        9, "RoPE vs learned positions, and the modern stack vs GPT-2's pre-LN, at the same budget and time", (), q9
    ),
)
