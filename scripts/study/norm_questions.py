"""Questions 1-5: where the norm goes and what the residual connections do (warmup, gradients and the
residual stream at initialisation, no residual, RMSNorm), from the runs the study made.

Each question is a Question (question.py): the runs its section reads, and the section, a function that
reads Results and returns its markdown lines. QUESTIONS at the end lists them; registry.py lists those.
"""

import math

from scripts.study.figures import GRADS, LAYER, RMS, STREAM, plot_curves, plot_layers
from scripts.study.question import (
    INIT_NO_RESIDUAL,
    INIT_POST_GPT2,
    INIT_POST_XAVIER,
    INIT_PRE_GPT2,
    INIT_PRE_XAVIER,
    NO_RESIDUAL_WARMUP,
    POST_NOWARMUP,
    POST_WARMUP,
    PRE_NOWARMUP,
    PRE_WARMUP,
    Question,
)
from scripts.study.results import (
    GROW,
    NAN,
    TOL,
    Results,
    factor,
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

WARMUP = {"pre": (PRE_WARMUP, PRE_NOWARMUP), "post": (POST_WARMUP, POST_NOWARMUP)}  # with warmup, without
PROBES = {("gpt2", "pre"): INIT_PRE_GPT2, ("gpt2", "post"): INIT_POST_GPT2}  # (init, norm position): its probe
PROBES |= {("xavier", "pre"): INIT_PRE_XAVIER, ("xavier", "post"): INIT_POST_XAVIER}
NO_RESIDUAL = {"pre-LN": (INIT_PRE_GPT2, PRE_WARMUP), "no residual": (INIT_NO_RESIDUAL, NO_RESIDUAL_WARMUP)}


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
        on, off = (r.q[run.name] for run in WARMUP[pos])
        for j in (on, off):
            best = min(finite(e["val_loss"] for e in j.evals), default=NAN)
            row = [fmt(final(j, "train_loss"), 4), fmt(final(j), 4), fmt(best, 4), outcome(j, r.unigram)]
            rows.append([f"{pos}-LN", j.config.get("warmup_iters"), *row])
        d, res = final(off) - final(on), (outcome(on, r.unigram), outcome(off, r.unigram))
        needs[pos] = None if res[0] != "trained" else res[1] != "trained" or d > TOL
        md.append(
            f"- {pos}-LN: final val loss without warmup minus with: {d:+.4f} nats ({res[0]} with, {res[1]} without)"
        )
    c = r.q[PRE_WARMUP.name].config
    rule = f"needs warmup: without it > {TOL} nats worse, stuck or diverged; one seed"
    md.append(f"- Answer ({rule}): **{warmup_verdict(needs, c.get('learning_rate'))}**")
    setup = f"{c.get('n_layer')} layers, n_embd {c.get('n_embd')}, learning_rate {c.get('learning_rate')}"
    md = [f"Setup: {setup}, {c.get('max_iters')} steps, warmup_iters {c.get('warmup_iters')} vs 0.", "", *md, ""]
    md += table(["norm", "warmup_iters", "final train", "final val", "best val", "outcome"], rows)
    curves = {run.name: [r.q[run.name]] for pair in WARMUP.values() for run in pair}
    return md + r.figure("q1_warmup", plot_curves, curves)


def q2(r: Results) -> list[str]:
    md = ["Xiong et al. 2020 (On Layer Normalization in the Transformer Architecture) argue that at init the"]
    md += ["gradient norms of post-LN grow toward the output layer and those of pre-LN stay flat. Measured:", ""]
    rows, lines, panels = [], [], {}
    for init in ("gpt2", "xavier"):
        for pos in ("pre", "post"):
            rec = panels.setdefault(f"{init} init", {})[f"{pos}-LN"] = r.q[PROBES[init, pos].name].init or {}
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
        for panel, rec in zip(panels, (r.q[PROBES["gpt2", pos].name].init or {}, last(r.q[WARMUP[pos][0].name]))):
            panels[panel][f"{pos}-LN"], rms = rec, rec.get("rms", [NAN, NAN])
            when, growth = ("init" if panel == "at init" else f"step {rec.get('step')}"), ratio(rms[1:])
            rows.append([f"{pos}-LN", when, fmt(rms[0]), fmt(rms[1]), fmt(rms[-1]), fmt(growth), fmt(factor(rms[1:]))])
            lines.append(f"- {pos}-LN, {when}: last-block/block-0 RMS = {fmt(growth)} ({shape(growth)})")
    head = ["norm", "when", "embeddings", "after block 0", "after last block", "last/block 0", "per-layer factor"]
    return md + table(head, rows) + lines + [""] + r.figure("q3_rms", plot_layers, panels, RMS, "RMS", STREAM)


def q4(r: Results) -> list[str]:
    init = {k: r.q[a.name].init or {} for k, (a, _) in NO_RESIDUAL.items()}
    runs = {k: r.q[b.name] for k, (_, b) in NO_RESIDUAL.items()}
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


QUESTIONS = (
    Question(1, "Does post-LN need warmup where pre-LN does not?", (*WARMUP["pre"], *WARMUP["post"]), q1),
    Question(
        2,
        "Per-layer gradient norms at initialisation: pre- vs post-LN, GPT-2 vs Xavier init",
        tuple(PROBES.values()),
        q2,
    ),
    Question(
        3,
        "Residual-stream RMS growth with depth, pre- vs post-LN",
        (INIT_PRE_GPT2, INIT_POST_GPT2, PRE_WARMUP, POST_WARMUP),
        q3,
    ),
    Question(
        4,
        "Removing the residual connections in a 12-layer model",
        (*NO_RESIDUAL["pre-LN"], *NO_RESIDUAL["no residual"]),
        q4,
    ),
    Question(5, "RMSNorm vs LayerNorm: step time and final loss", (), q5),  # reads the variants pre_ln and rmsnorm
)
