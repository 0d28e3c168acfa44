"""Questions 10 and 14: depth. Which norm placements and residual variants keep a deep model's later layers
useful (question 10), and whether depth_scaling keeps the best learning rate where it was (question 14).

Both read seeded runs of depth_runs.py: every arm has several seeds with the same data order per seed, and
every comparison is Welch's (stats.py). Question 10 reads python -m scripts.inspect's per-layer measurements
of each trained run: the val loss increase when block i is skipped (skip_loss_delta) and the angular
distance between block i's input and output.
"""

import math

from scripts.study import stats
from scripts.study.depth_runs import BASE_DEPTH, COMPLETE_P, DEEP_DEPTH, DEPTH, DEPTH_ARMS, DEPTHS, LR_GRID, LR_SWEEP
from scripts.study.job import Job
from scripts.study.question import Question
from scripts.study.results import NAN, Results, final, fmt, mean_std, table
from scripts.study.stats import describe, holm, verdict

PRE = "pre-LN"

# ----------------------------------------------------------------------------- per-layer measurements


def layers(job: Job, key: str) -> list[float]:
    """One inspect.json value per block (NAN where it was not measured)."""
    got = (job.inspection or {}).get("layers", []) if job.status == "ok" else []
    return [NAN if rec.get(key) is None else float(rec[key]) for rec in got]


def late_share(job: Job) -> float:
    """The later half's share of the skip loss: over blocks i >= L/2, the sum of max(0, skip_loss_delta_i),
    over that sum for all blocks; in [0, 1], 0.5 when every block matters alike, falling as the later blocks
    stop mattering. A block whose skipping lowers the loss counts as 0 (a sum of signed deltas near zero would
    make the ratio meaningless). NAN when the run was not measured or no block matters at all."""
    d = [max(0.0, x) for x in layers(job, "skip_loss_delta")]
    total = sum(d)
    if not d or not math.isfinite(total) or total <= 0:
        return NAN
    return sum(d[len(d) // 2 :]) / total


def late_angle(job: Job) -> float:
    """Mean angular distance (fraction of pi) between input and output of the later half's blocks."""
    a = layers(job, "angular_distance")[len(layers(job, "angular_distance")) // 2 :]
    return sum(a) / len(a) if a and all(map(math.isfinite, a)) else NAN


def per_block_mean(jobs: list[Job], key: str) -> list[float]:
    """The mean over seeds of each block's value (the seeds that were measured)."""
    rows = [v for j in jobs if (v := layers(j, key))]
    return [stats.mean_sd(col)[0] for col in zip(*rows)] if rows else []


# ----------------------------------------------------------------------------- question 10


def trained(jobs: list[Job], unigram: float) -> str:
    ok = sum(j.status == "ok" and final(j) < unigram - 0.05 for j in jobs)
    return f"{ok}/{len(jobs)}"


def plot_depth(plt, r: Results, deepest: int):
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    for i, arm in enumerate(DEPTH_ARMS):
        color, depths = f"C{i}", [L for L in DEPTHS if r.seeds(DEPTH[arm, L])]
        for ax, fn in ((axes[0][0], final), (axes[0][1], late_share)):
            ms = [stats.mean_sd(fn(j) for j in r.seeds(DEPTH[arm, L])) for L in depths]
            ax.errorbar(
                depths,
                [m for m, _ in ms],
                [0 if math.isnan(s) else s for _, s in ms],
                fmt="-o",
                ms=3,
                color=color,
                label=arm,
                capsize=2,
            )
        for ax, key in ((axes[1][0], "skip_loss_delta"), (axes[1][1], "angular_distance")):
            ys = per_block_mean(r.seeds(DEPTH[arm, deepest]), key)
            ax.plot([(k + 0.5) / len(ys) for k in range(len(ys))], ys, "-", color=color, label=arm, lw=1)
    labels = [
        ("layers (log scale)", "final val loss, nats"),
        ("layers (log scale)", "later half's share of the skip loss (0.5: even)"),
        (f"relative depth of the block (block + 0.5) / {deepest}", "val loss increase when skipped, nats"),
        (f"relative depth of the block (block + 0.5) / {deepest}", "angle between block input and output, x pi rad"),
    ]
    titles = [
        "mean over seeds; bars: std",
        "",
        f"{deepest} layers, mean over seeds",
        f"{deepest} layers, mean over seeds",
    ]
    for ax, (x, y), title in zip(axes.flat, labels, titles):
        ax.set(xlabel=x, ylabel=y, title=title)
        ax.grid(alpha=0.3)
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xticks(DEPTHS, [str(L) for L in DEPTHS])
    axes[0][0].legend(fontsize=7)
    return fig


def depth_tables(r: Results, depths: list[int]) -> list[str]:
    """Per arm and depth: the final val loss (and how many seeds trained), the later half's share and angle;
    then the cells not run and the inspections that failed."""
    cols, tables = [f"{L} layers" for L in depths], {}
    cells = {
        "final val loss (trained/seeds)": lambda js: f"{mean_std(map(final, js))} ({trained(js, r.unigram)})",
        "later half's share of the skip loss": lambda js: mean_std(map(late_share, js)),
        "later half's angular distance": lambda js: mean_std(map(late_angle, js)),
    }
    for title, cell in cells.items():
        tables[title] = [[arm, *(cell(r.seeds(DEPTH[arm, L])) for L in depths)] for arm in DEPTH_ARMS]
    md = [line for title, body in tables.items() for line in table([title, *cols], body)]
    absent = [f"{a} at {L} layers" for L in depths for a in DEPTH_ARMS if not r.seeds(DEPTH[a, L])]
    if absent:
        md.append(f"- Not run in this study (its preset leaves them out, docs/norms.md says why): {', '.join(absent)}")
    failed = [j.name for a in DEPTH_ARMS for L in depths for j in r.seeds(DEPTH[a, L]) if j.inspect_error]
    if failed:
        md.append(f"- Not measured (the inspection failed: runs/<name>/inspect.log): {', '.join(failed)}")
    return md


def q10(r: Results) -> list[str]:
    depths = [L for L in DEPTHS if any(r.seeds(DEPTH[a, L]) for a in DEPTH_ARMS)]
    if not depths:
        return ["- (no run of this question: every depth was left out)", ""]
    deepest, shallowest = depths[-1], depths[0]
    c = next(j.config for a in DEPTH_ARMS for L in depths for j in r.seeds(DEPTH[a, L]))
    seeds = len(r.seeds(DEPTH[PRE, shallowest]))
    md = [
        f"Setup: {c.get('n_embd')} wide, {c.get('max_iters')} steps of {c.get('batch_size')} x "
        f"{c.get('block_size')} tokens at peak learning rate {c.get('learning_rate')} (warmup "
        f"{c.get('warmup_iters')}), AdamW, at {', '.join(map(str, depths))} layers; {seeds} seeds per cell, the "
        "same data order per seed. Per block, from python -m scripts.inspect on fixed val batches: the val loss "
        "increase when the block is skipped, and the angular distance between its input and output "
        "(arccos of their cosine / pi). *Later half's share*: the later half's sum of those loss increases "
        "over all blocks' (0.5: every block matters alike; a block whose skipping lowers the loss counts 0).",
        "",
        *CLAIMS_10,
        "",
        *depth_tables(r, depths),
    ]
    pre = stats.welch(map(late_share, r.seeds(DEPTH[PRE, shallowest])), map(late_share, r.seeds(DEPTH[PRE, deepest])))
    md.append(f"- pre-LN, later half's share at {deepest} minus at {shallowest} layers: {describe(pre, '')}")
    arms = [a for a in DEPTH_ARMS if a != PRE]
    base = r.seeds(DEPTH[PRE, deepest])
    comps = [stats.welch(map(late_share, base), map(late_share, r.seeds(DEPTH[a, deepest]))) for a in arms]
    losses = [stats.welch(map(final, base), map(final, r.seeds(DEPTH[a, deepest]))) for a in arms]
    adj, adj_loss = holm([x.p for x in comps]), holm([x.p for x in losses])
    body = [
        [a, describe(cmp, ""), stats.fmt_p(p), verdict(cmp, p), describe(lc), stats.fmt_p(lp), verdict(lc, lp)]
        for a, cmp, p, lc, lp in zip(arms, comps, adj, losses, adj_loss)
    ]
    md += ["", f"At {deepest} layers, each arm minus pre-LN (Holm-adjusted over the {len(arms)} arms):", ""]
    head = ["arm", "later half's share [95% interval], p", "Holm p", "share", "final val loss [95% interval], p"]
    md += table([*head, "Holm p", "loss"], body)
    words = answer_10(pre, arms, comps, adj, deepest, shallowest)
    md.append(f"- Answer (at {deepest} layers; detected: Holm-adjusted p < {stats.ALPHA}): **{words}**")
    md += ["", *SCALE_10, ""]
    return md + r.figure("q10_depth", plot_depth, r, deepest)


def answer_10(pre, arms, comps, adj, deepest: int, shallowest: int) -> str:
    v = verdict(pre, None)
    change = {"lower": "falls", "higher": "rises", "no detectable difference at this budget": "no detectable "
              "change at this budget"}.get(v, v)  # fmt: skip
    first = f"pre-LN's later half's share of the skip loss from {shallowest} to {deepest} layers: {change}"
    first += f" ({fmt(stats.mean_sd(pre.a)[0])} to {fmt(stats.mean_sd(pre.b)[0])})"
    words = {a: verdict(c, p) for a, c, p in zip(arms, comps, adj)}
    up, down = [a for a, w in words.items() if w == "higher"], [a for a, w in words.items() if w == "lower"]
    same = [a for a, w in words.items() if w.startswith("no detectable")]
    untested = [a for a, w in words.items() if w.startswith("not testable")]
    parts = [f"higher than pre-LN's (restores the later layers): {', '.join(up) or 'none'}"]
    parts += [f"lower: {', '.join(down)}"] if down else []
    parts += [f"no detectable difference at this budget: {', '.join(same)}"] if same else []
    parts += [f"not run or not testable: {', '.join(untested)}"] if untested else []
    return f"{first}; at {deepest} layers, {'; '.join(parts)}"


CLAIMS_10 = [
    "Published claims this tests:",
    "- Sun et al. 2025, *The Curse of Depth in Large Language Models* (NeurIPS 2025; pre-LN LLaMA-style models of "
    "130M-7B parameters, and pruning Llama, Mistral, DeepSeek and Qwen): in pre-LN models nearly half of the deeper "
    "layers are much less effective than expected (removing one barely changes the output), because the stream's "
    "variance grows with depth and deep blocks approach the identity; LayerNorm Scaling (norm(x) / sqrt(l)) makes "
    "them contribute and lowers perplexity across 130M-7B (by about 5-8%).",
    "- Li et al. 2025, *Mix-LN* (ICLR 2025; 70M-7B): pre-LN's deeper layers get small gradients and contribute "
    "little, post-LN's earlier layers get vanishing gradients; post-LN in the first quarter of the blocks and "
    "pre-LN after makes every layer contribute and beats both.",
    "- Wang et al. 2022, *DeepNet* (up to 1,000 layers): DeepNorm (x = norm(alpha x + f(x)), beta-scaled init) "
    "lets post-LN train at depths where plain post-LN does not. Xie et al. 2025, *mHC* (3B-27B): a multi-stream "
    "residual whose mixing is doubly stochastic keeps an identity-like path at every depth.",
]
SCALE_10 = [
    "Where this scale cannot speak: the papers' models have 10^8-10^10 parameters and see 10^10-10^12 tokens; these "
    "have under a million and see about 10^5 characters, so a deep model here is also an undertrained one. A "
    "later half that matters little can mean that training had not reached it yet, which the papers rule out "
    "by training far longer; the 5-8% perplexity gains are far below what a few seeds of runs this short resolve.",
]

# ----------------------------------------------------------------------------- question 14


def sweep_cells(r: Results, depth: int, scaled: bool) -> tuple[int, list[tuple[float, list[float]]]]:
    """The index in LR_GRID of the learning rate with the lowest mean final val loss (-1: none finite),
    and each cell's (actual learning rate, final val losses, one per seed)."""
    losses = []
    for x in LR_GRID:
        jobs = r.seeds(LR_SWEEP[depth, scaled, x])
        lr = next((j.config.get("learning_rate") for j in jobs if j.config), NAN)
        losses.append((lr, [final(j) for j in jobs]))
    means = [stats.mean_sd(xs)[0] for _, xs in losses]
    finite = [(m, k) for k, m in enumerate(means) if math.isfinite(m)]
    return (min(finite)[1] if finite else -1), losses


def plot_lr(plt, cells: dict):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, scaled in zip(axes, (False, True)):
        for i, depth in enumerate((BASE_DEPTH, DEEP_DEPTH)):
            best, losses = cells[depth, scaled]
            pts = [(lr, *stats.mean_sd(xs)) for lr, xs in losses if math.isfinite(stats.mean_sd(xs)[0])]
            if not pts:
                continue
            lrs, ms, sds = zip(*pts)
            sds = [0 if math.isnan(sd) else sd for sd in sds]
            ax.errorbar(lrs, ms, sds, fmt="-o", color=f"C{i}", capsize=2, label=f"{depth} layers")
            if best >= 0:
                lr, xs = losses[best]
                ax.plot([lr], [stats.mean_sd(xs)[0]], "*", color=f"C{i}", ms=14)
        title = f"with depth_scaling={COMPLETE_P} (base_depth {BASE_DEPTH})" if scaled else "without depth_scaling"
        ax.set(xscale="log", xlabel="peak learning rate", ylabel="final val loss, nats", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def q14(r: Results) -> list[str]:
    cells = {(d, s): sweep_cells(r, d, s) for d in (BASE_DEPTH, DEEP_DEPTH) for s in (False, True)}
    lrs = [lr for lr, _ in cells[BASE_DEPTH, False][1]]
    md = [
        f"Setup: question 10's model at {BASE_DEPTH} layers (the base depth) and {DEEP_DEPTH} (4x), peak learning "
        f"rates {', '.join(f'{lr:g}' for lr in lrs)} (min_lr a tenth of each), without depth_scaling and with "
        f"depth_scaling={COMPLETE_P} (CompleteP) and base_depth={BASE_DEPTH}; "
        f"{len(r.seeds(LR_SWEEP[BASE_DEPTH, False, LR_GRID[0]]))} seeds per cell. Best: the lowest mean final "
        f"val loss. At {BASE_DEPTH} layers depth_scaling multiplies by 1: both arms read the same runs there.",
        "",
        *CLAIMS_14,
        "",
    ]
    rows, moves = [], {}
    for (d, s), (best, losses) in cells.items():
        best_lr = f"{losses[best][0]:g}" if best >= 0 else "—"
        rows.append([f"{d} layers, {'with' if s else 'without'}", *(mean_std(xs) for _, xs in losses), best_lr])
    md += table(["depth, depth_scaling", *(f"lr {lr:g}" for lr in lrs), "best lr"], rows)
    for s in (False, True):
        (b0, _), (b1, losses) = cells[BASE_DEPTH, s], cells[DEEP_DEPTH, s]
        moves[s] = abs(b1 - b0) if b0 >= 0 and b1 >= 0 else NAN
        if b0 < 0 or b1 < 0:
            md.append(f"- {'With' if s else 'Without'} depth_scaling: a depth without one finite cell")
            continue
        moved = f"best lr {lrs[b0]:g} at {BASE_DEPTH} layers, {losses[b1][0]:g} at {DEEP_DEPTH} ({moves[s]} grid steps)"
        cost = stats.welch(losses[b1][1], losses[b0][1])
        cost_words = f"{describe(cost)}, {verdict(cost, None, 'lower', 'a detectable cost')}"
        where = (
            "the same"
            if b0 == b1
            else f"at {DEEP_DEPTH} layers the base depth's best minus the deep best: {cost_words}"
        )
        md.append(f"- {'With' if s else 'Without'} depth_scaling: {moved}; {where}")
    md.append(
        f"- Answer (grid steps the best learning rate moved, {BASE_DEPTH} -> {DEEP_DEPTH} layers): "
        f"**{answer_14(moves)}**"
    )
    md += ["", *SCALE_14, ""]
    return md + r.figure("q14_lr_depth", plot_lr, cells)


def answer_14(moves: dict[bool, float]) -> str:
    off, on = moves[False], moves[True]
    if not (math.isfinite(off) and math.isfinite(on)):
        return "not answerable: a depth of the sweep has no finite cell"
    if on == off == 0:
        return "the best learning rate did not move on this grid, with depth_scaling or without: no difference here"
    if on < off:
        return f"the optimum moved less with depth_scaling ({on:.0f} vs {off:.0f} grid steps)"
    if on == off:
        return f"the optimum moved as much with depth_scaling as without ({on:.0f} grid steps)"
    return f"the optimum moved more with depth_scaling ({on:.0f} vs {off:.0f} grid steps)"


CLAIMS_14 = [
    "Published claim this tests: Dey et al. 2025, *Don't be lazy: CompleteP enables compute-efficient deep "
    "transformers* (NeurIPS 2025; Cerebras CS-3, GPT-style models across depths): with each residual branch scaled "
    "by L^-1 (CompleteP, alpha = 1) and its learning-rate and epsilon rules, the learning rate tuned at a base "
    "depth stays optimal at other depths, which standard parameterisation does not do; CompleteP saves 12-34% of "
    "the compute over the previous best (muP, alpha = 0.5 is depth-muP).",
]
SCALE_14 = [
    "Where this scale cannot speak: transfer is claimed as the depth grows by 10x or more with the width fixed at a "
    "few hundred; here 4x, at 32 wide, a factor-3 grid of 4 learning rates and a short run, so a move of one grid "
    "step is within what the grid can resolve and a move within one step is invisible.",
]

QUESTIONS = (
    Question(
        10,
        "Depth: which placements keep later layers useful at 6-48 layers, and which switch restores pre-LN's?",
        tuple(DEPTH.values()),
        q10,
    ),
    Question(
        14,
        "Learning rate across depth: does depth_scaling keep the best learning rate where it was?",
        tuple(LR_SWEEP.values()),
        q14,
    ),
)
