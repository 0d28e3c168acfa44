"""Questions 11-13: the residual stream's newer switches, each against two baselines (11), the massive
activations they grow or remove (12), and multi-stream residuals' stability, HC against mHC (13).

Every arm is a seeded run of depth_runs.py (several seeds, the same data order per seed), every comparison
Welch's, Holm-adjusted where a question makes several at once (stats.py). Question 12 reads the telemetry
records' act_top and act_median (per block, the largest and the median |h| of the stream leaving it), question
13 their hc_gain (the composite gain of the product of the H_res matrices over depth).
"""

import math

from scripts.study import stats
from scripts.study.depth_runs import BASELINES, DEPTH, DEPTH_ARMS, DEPTHS, HIGH_LR, STABILITY, SWITCH, SWITCHES
from scripts.study.job import Job
from scripts.study.question import Question
from scripts.study.results import NAN, Results, final, fmt, mean_std, table, top_ratio
from scripts.study.stats import describe, fmt_p, holm, verdict

LEARNED = 0.5  # nats below the unigram loss: a run that "trains" (as question 6)
SPIKE = 0.3  # nats: a logged training loss this far above the lowest so far starts a spike
MASSIVE = 1000  # Sun et al. 2024's massive activations are about 10^3-10^5 times the median |h|

# ----------------------------------------------------------------------------- question 11


def plot_switches(plt, comps: dict):
    fig, axes = plt.subplots(1, len(comps), figsize=(6 * len(comps), 4.5), sharey=True, squeeze=False)
    for ax, (baseline, rows) in zip(axes[0], comps.items()):
        for k, c in enumerate(rows.values()):
            if math.isfinite(c.diff):
                err = [[c.diff - c.lo], [c.hi - c.diff]] if c.testable else None
                ax.errorbar([c.diff], [k], xerr=err, fmt="o", color="C0", capsize=3)
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_yticks(range(len(rows)), list(rows))
        ax.set(title=baseline, xlabel="final val loss minus the baseline's, nats (95% interval)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("switch added to the baseline")
    return fig


def q11(r: Results) -> list[str]:
    c = next((j.config for run in SWITCH.values() for j in r.seeds(run)), {})
    n = len(r.seeds(SWITCH[next(iter(BASELINES)), "baseline"]))
    md = [
        f"Setup: {c.get('n_layer')} layers, {c.get('n_embd')} wide, {c.get('max_iters')} steps at peak learning "
        f"rate {c.get('learning_rate')} (Muon: muon_lr {c.get('muon_lr')}), {n} seeds per arm, the same data order "
        "per seed. Each switch is added to (a) plain pre-LN with AdamW and GPT-2's init, and (b) the modern stack "
        "(weightless RMSNorm, QK-norm, embed norm, RoPE, residual and value scalars, logit cap, Muon). On (b) a "
        "switch replaces what it cannot combine with: HC, mHC and Attention Residuals the learned residual scalars "
        "(they replace the skip connection those scale), DyT and Derf QK-norm and the embeddings' norm (a point-wise "
        "squash normalises neither). Differences: arm minus its baseline, final val loss; Holm-adjusted over the "
        "switches of each baseline.",
        "",
        *CLAIMS_11,
        "",
    ]
    comps, rows, answer = {}, [], []
    for b in BASELINES:
        base = [final(j) for j in r.seeds(SWITCH[b, "baseline"])]
        comps[b] = {s: stats.welch(base, (final(j) for j in r.seeds(SWITCH[b, s]))) for s in SWITCHES}
        adj = dict(zip(SWITCHES, holm([x.p for x in comps[b].values()])))
        rows.append([f"**{b}**", mean_std(base), "", "", ""])
        for s, x in comps[b].items():
            rows.append(
                [s, mean_std(final(j) for j in r.seeds(SWITCH[b, s])), describe(x), fmt_p(adj[s]), verdict(x, adj[s])]
            )
        words = {s: verdict(x, adj[s]) for s, x in comps[b].items()}
        lower = [s for s, w in words.items() if w == "lower"]
        higher = [s for s, w in words.items() if w == "higher"]
        answer.append(
            f"{b.split()[0]} lower with {', '.join(lower) or 'none'}, higher with {', '.join(higher) or 'none'}"
        )
    md += table(["arm", "final val loss", "minus baseline [95% interval], p", "Holm p", "verdict"], rows)
    (a, b) = [
        {s: verdict(x, p) for (s, x), p in zip(cs.items(), holm([x.p for x in cs.values()]))} for cs in comps.values()
    ]
    differ = [s for s in SWITCHES if a[s] != b[s]]
    answer.append(f"the verdict differs between the baselines for {', '.join(differ) or 'no switch'}")
    md.append(
        f"- Answer (detected: Holm-adjusted p < {stats.ALPHA}; otherwise no detectable difference at this "
        f"budget): **{'; '.join(answer)}**"
    )
    md += ["", *SCALE_11, ""]
    return md + r.figure("q11_switches", plot_switches, comps)


CLAIMS_11 = [
    "Published claims, each at its scale:",
    "- gated attention: Qiu et al. 2025 (NeurIPS 2025; 1.7B dense and 15B MoE models, 3.5T tokens): a sigmoid gate "
    "after SDPA consistently lowers perplexity, trains more stably, tolerates larger learning rates, and removes the "
    "attention sink and massive activations.",
    "- LayerNorm Scaling: Sun et al. 2025 (130M-7B): lower perplexity than pre-LN at every size (about 5-8%).",
    "- Mix-LN: Li et al. 2025 (ICLR 2025; 70M-7B): lower perplexity than pre-LN and post-LN.",
    "- DyT: Zhu et al. 2025 (CVPR 2025; LLaMA 7B-70B): matches RMSNorm's loss with alpha initialised per site; but "
    "Verma 2026 (GPT-2 64M-3.78B, 1M-118M tokens): DyT helps only where data is scarce and is 18.8% worse in loss "
    "at 64M parameters on 118M tokens.",
    "- Derf: Chen et al. 2025 (vision, speech, DNA and GPT-2 language models): erf(alpha x + s) beats LayerNorm, "
    "RMSNorm and DyT.",
    "- HC: Zhu et al. 2025 (ICLR 2025; OLMo 1B and 7B, OLMoE-1B-7B): with 4 streams, 1.8x faster convergence and "
    "about 0.03 lower loss after 500B tokens.",
    "- mHC: Xie et al. 2025 (DeepSeek; 3B, 9B and 27B MoE): trains stably where HC does not, and beats HC "
    "downstream, for 6.7% more training time.",
    "- Attention Residuals: Kimi Team 2026 (Kimi Linear, 48B total / 3B active, 1.4T tokens): the compute of a "
    "baseline 1.25x larger in scaling-law fits, and more uniform output magnitudes and gradients over depth.",
    "- On (b): nanochat and modded-nanogpt tried several of these on their Muon stack and kept notes, not switches; "
    "(a) asks the same of the plain GPT-2 recipe.",
]
SCALE_11 = [
    "Where this scale cannot speak: every claim above is at 10^8-10^10 parameters and 10^10-10^12 tokens; these "
    "models have about 0.2M parameters and see about 10^5 characters. A 1-5% perplexity gain is far below what a "
    'few seeds of runs this short resolve, so "no detectable difference" here is no evidence against a claim at '
    "scale; a detected loss can come from the papers' defaults (initial alphas, gate and stream initialisations) "
    "being tuned for large models.",
]

# ----------------------------------------------------------------------------- question 12


def tele(job: Job) -> list[dict]:
    return [t for t in job.tele if "act_top" in t] if job.status == "ok" else []


def log_ratio(job: Job, at: int) -> float:
    recs = tele(job)
    return math.log10(top_ratio(recs[at])[0]) if recs and top_ratio(recs[at])[0] > 0 else NAN


def massive_arms(r: Results) -> dict[str, tuple[list[Job], list[Job]]]:
    """label: (its seeds, its baseline's seeds): each switch on both baselines, and question 10's arms at
    their deepest depth against that depth's pre-LN."""
    arms = {}
    for b in BASELINES:
        base = r.seeds(SWITCH[b, "baseline"])
        arms[b] = (base, base)
        arms |= {f"{b.split()[0]} + {s}": (r.seeds(SWITCH[b, s]), base) for s in SWITCHES}
    deepest = max((L for L in DEPTHS if r.seeds(DEPTH["pre-LN", L])), default=None)
    if deepest:
        base = r.seeds(DEPTH["pre-LN", deepest])
        arms |= {f"{a}, {deepest} layers": (r.seeds(DEPTH[a, deepest]), base) for a in DEPTH_ARMS}
    return arms


def plot_massive(plt, r: Results):
    """Per baseline (a row): each arm's top/median per block at the end (mean over seeds), and its largest
    over the blocks through training (first seed)."""
    fig, axes = plt.subplots(len(BASELINES), 2, figsize=(12, 4.2 * len(BASELINES)), squeeze=False)
    for row, b in zip(axes, BASELINES):
        for i, s in enumerate(("baseline", *SWITCHES)):
            jobs, label = [j for j in r.seeds(SWITCH[b, s]) if tele(j)], b if s == "baseline" else f"+ {s}"
            if not jobs:
                continue
            ends = [
                [t / m if m else NAN for t, m in zip(tele(j)[-1]["act_top"], tele(j)[-1]["act_median"])] for j in jobs
            ]
            per_block = [stats.mean_sd(col)[0] for col in zip(*ends)]
            row[0].plot(range(len(per_block)), per_block, "-o", ms=3, color=f"C{i}", label=label)
            curve = [(t["step"], top_ratio(t)[0]) for t in tele(jobs[0])]
            row[1].plot([x for x, _ in curve], [y for _, y in curve], "-", color=f"C{i}", label=label)
        row[0].set(xlabel="block (0 = nearest the input)", ylabel="top |h| / median |h| at the end (ratio)")
        row[1].set(xlabel="step", ylabel="largest over the blocks of top |h| / median |h| (ratio)")
        for ax in row:
            ax.set(yscale="log", title=b)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    return fig


CLAIMS_12 = (
    "Published claims: Sun et al. 2024, *Massive Activations in Large Language Models* (COLM 2024; LLaMA2-7B and "
    "other 7B-70B models): a few activations up to about 100,000 times the others, in fixed channels (1415 and 2533 "
    "in LLaMA2-7B), at the first token and the first delimiter, acting as fixed biases that concentrate attention; "
    "Qiu et al. 2025: the gate after SDPA removes them and the attention sink; Kim et al. 2025 (*Peri-LN*, up to "
    "3.2B): pre-LN is prone to them, peri-LN is not."
)
HEAD_12 = ["arm", "top/median, step 0", "top/median, end", "block of the max (per seed)", "over training"]
HEAD_12 += ["end, log10 minus baseline's", "vs baseline"]


def massive_rows(arms: dict) -> tuple[list[list], list[str], list[str]]:
    """The table's rows, the arms that grow them over training, the arms lower than their baseline at the end."""
    rows, grows, lowered = [], [], []
    tests = {
        label: stats.welch((log_ratio(j, -1) for j in base), (log_ratio(j, -1) for j in jobs))
        for label, (jobs, base) in arms.items()
        if jobs is not base
    }
    adj = dict(zip(tests, holm([t.p for t in tests.values()])))
    for label, (jobs, _) in arms.items():
        start, end = [10 ** log_ratio(j, 0) for j in jobs], [10 ** log_ratio(j, -1) for j in jobs]
        grow = verdict(
            stats.welch((log_ratio(j, 0) for j in jobs), (log_ratio(j, -1) for j in jobs)), None, "shrinks", "grows"
        )
        where = ", ".join(str(top_ratio(tele(j)[-1])[1]) for j in jobs if tele(j)) or "—"
        versus = (
            [describe(tests[label], "decades", 3), verdict(tests[label], adj[label])] if label in tests else ["", ""]
        )
        rows.append([label, mean_std(start), mean_std(end), where, grow, *versus])
        grows += [label] if grow == "grows" else []
        lowered += [label] if versus[1] == "lower" else []
    return rows, grows, lowered


def q12(r: Results) -> list[str]:
    md = [
        "From the telemetry of question 11's and question 10's runs: per block, the largest |h| of the stream "
        "leaving it over the median |h|; the table gives the largest over the blocks, at the first telemetry "
        "record (step 0) and the last. Grows: the arm's log10 ratio at the end is above its own at step 0 "
        "(Welch over seeds); lower/higher: its end ratio against its baseline's (log10, Holm-adjusted).",
        "",
        CLAIMS_12,
        "",
    ]
    arms = massive_arms(r)
    rows, grows, lowered = massive_rows(arms)
    md += table(HEAD_12, rows)
    ends = [top_ratio(tele(j)[-1])[0] for jobs, _ in arms.values() for j in jobs if tele(j)]
    top = max(stats.finite(ends), default=NAN)
    md.append(
        f"- Answer: **grow them over training: {', '.join(grows) or 'none'}; lower than their baseline at the end: "
        f"{', '.join(lowered) or 'none'}; the largest ratio of any run is {fmt(top, 1)}, "
        f"{'below' if not top >= MASSIVE else 'at or above'} the {MASSIVE}x of massive activations**"
    )
    md += [
        "",
        "Where this scale cannot speak: massive activations appear in models of billions of parameters after "
        "billions of tokens; at 32 wide and a few hundred steps a ratio of 10-100 is an outlier channel, not yet the "
        "input-independent bias Sun et al. describe. The table shows the direction each switch pushes.",
        "",
    ]
    return md + r.figure("q12_massive", plot_massive, r)


# ----------------------------------------------------------------------------- question 13


def spikes(job: Job, after: int) -> float:
    """Loss spikes: logged training losses that rise more than SPIKE above the lowest so far, counted once
    per excursion that starts after step `after` (the warmup); NAN for a run that failed (a diverged run
    counts its spikes up to the divergence)."""
    if job.status == "failed":
        return NAN
    best, inside, n = math.inf, False, 0
    for rec in job.trains:
        loss = rec.get("loss", NAN)
        if not math.isfinite(loss):
            break
        spiking = loss > best + SPIKE
        n += spiking and not inside and rec["step"] > after  # an excursion that starts after the warmup
        inside, best = spiking, min(best, loss)
    return float(n)


def max_gain(job: Job) -> float:
    gains = [t["hc_gain"] for t in job.tele if t.get("hc_gain") is not None]
    return max(gains) if gains else NAN


def plot_stability(plt, arms: dict):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for i, (arm, jobs) in enumerate(arms.items()):
        for k, j in enumerate(jobs):
            label = arm if k == 0 else None
            g = [(t["step"], t["hc_gain"]) for t in j.tele if t.get("hc_gain") is not None]
            if g:
                axes[0].plot(*zip(*g), "-", color=f"C{i}", lw=1, label=label)
            axes[1].plot(
                [t["step"] for t in j.trains], [t["loss"] for t in j.trains], "-", color=f"C{i}", lw=0.8, label=label
            )
    axes[0].set(xlabel="step", ylabel="composite gain of H_res, max row sum of |product| (ratio)", yscale="log")
    axes[1].set(xlabel="step", ylabel="training loss, nats (every logged step)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def q13(r: Results) -> list[str]:
    arms = {arm: r.seeds(run) for arm, run in STABILITY.items()}
    c = next((j.config for js in arms.values() for j in js), {})
    warm = c.get("warmup_iters", 0)
    ok = [j.status == "ok" and final(j) < r.unigram - LEARNED for j in arms["pre-LN"]]
    md = [
        f"Setup: question 11's model (a) at peak learning rate {c.get('learning_rate')}, {HIGH_LR:.3g}x its usual, "
        "pre-LN, HC and mHC "
        f"({c.get('n_streams', 4)} streams), {len(arms['pre-LN'])} seeds each, a training loss logged every "
        f"{c.get('log_interval')} steps and the composite gain every {c.get('telemetry_interval')}. pre-LN trains "
        f"here (final val loss more than {LEARNED} nats below the unigram loss) in {sum(ok)} of {len(ok)} seeds"
        f"{'' if all(ok) and ok else ': the premise fails where it does not'}. A spike: a logged loss more than "
        f"{SPIKE} nats above the lowest so far, after the warmup ({warm} steps), counted once per excursion.",
        "",
        "Published claims: Xie et al. 2025 (*mHC*, DeepSeek; 27B MoE): HC's composite gain over depth reaches "
        "about 3,000 and its loss surges, while mHC (H_res doubly stochastic, by Sinkhorn-Knopp) keeps the gain "
        "near 1 and trains stably; Zhu et al. 2025 (*Hyper-Connections*, 7B): HC trains with fewer spikes than "
        "pre-norm.",
        "",
    ]
    rows = []
    for arm, jobs in arms.items():
        rows.append(
            [
                arm,
                mean_std(final(j) for j in jobs),
                f"{sum(j.status == 'diverged' for j in jobs)}/{len(jobs)}",
                mean_std(spikes(j, warm) for j in jobs),
                mean_std(max_gain(j) for j in jobs),
                mean_std((j.tele[-1].get("hc_gain") if j.tele else None) for j in jobs),
            ]
        )
    md += table(["arm", "final val loss", "diverged", "spikes", "composite gain, max", "composite gain, end"], rows)
    hc, mhc = arms["HC"], arms["mHC"]
    gain = stats.welch(
        (math.log10(g) for j in hc if (g := max_gain(j)) > 0), (math.log10(g) for j in mhc if (g := max_gain(j)) > 0)
    )
    spk = stats.welch((spikes(j, warm) for j in hc), (spikes(j, warm) for j in mhc))
    loss = stats.welch(map(final, hc), map(final, mhc))
    md.append(
        f"- mHC minus HC: composite gain (max, log10) {describe(gain, 'decades', 3)}; spikes {describe(spk, '', 2)}; "
        f"final val loss {describe(loss)}"
    )
    words = [
        f"composite gain (max over training): {verdict(gain, None, 'lower with mHC', 'higher with mHC')}",
        f"spikes: {verdict(spk, None, 'fewer with mHC', 'more with mHC')}",
        f"final val loss: {verdict(loss, None, 'lower with mHC', 'higher with mHC')}",
    ]
    md.append(f"- Answer (detected: p < {stats.ALPHA}): **{'; '.join(words)}**")
    md += [
        "",
        "Where this scale cannot speak: HC's gain explodes over tens of layers and thousands of steps at "
        "27B; 12 layers and a few hundred steps leave little room for the product of H_res to grow, so a small "
        "gain here is not a claim that HC is stable at scale.",
        "",
    ]
    return md + r.figure("q13_hc_mhc", plot_stability, arms)


QUESTIONS = (
    Question(
        11,
        "Each new switch against two baselines: plain pre-LN with AdamW, and the modern stack with Muon",
        tuple(SWITCH.values()),
        q11,
    ),
    Question(
        12,
        "Massive activations: which variants grow them, and which switches remove them?",
        (*SWITCH.values(), *(DEPTH[a, L] for a in DEPTH_ARMS for L in DEPTHS[-2:])),
        q12,
    ),
    Question(
        13,
        "Stability of multi-stream residuals: HC vs mHC at a learning rate where pre-LN still trains",
        tuple(STABILITY.values()),
        q13,
    ),
)
