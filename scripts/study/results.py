"""What every section of the report reads (Results) and the numbers it writes: the helpers that turn runs
into values (final, step_stat, ratio, ...) and values into markdown (fmt, table). report.py and the
question modules import them; they import nothing of the study but Job and stats."""

import math
import statistics
import typing
from dataclasses import dataclass, field
from pathlib import Path

from scripts.study.job import NAN, Job
from scripts.study.stats import finite

TOL = 0.05  # nats: a smaller loss difference between single-seed runs is called no difference
GROW = 1.5  # last/first layer ratio above this "grows toward the output", below 1/GROW "shrinks", else "flat"

# ----------------------------------------------------------------------------- numbers


def mean(xs) -> float:
    xs = finite(xs)
    return statistics.mean(xs) if xs else NAN


def mean_std(xs) -> str:
    xs = finite(xs)
    if len(xs) < 2:
        return f"{xs[0]:.4f}" if xs else "—"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def final(job: Job, key: str = "val_loss") -> float:
    value = job.evals[-1].get(key) if job.status == "ok" and job.evals else None
    return NAN if value is None else value  # None: a record without the key (bits per byte before it existed)


def step_stat(job: Job, key: str) -> float:
    """Median over the log records but the first (it holds the slow first step)."""
    recs = job.trains[1:] or job.trains
    return statistics.median(r[key] for r in recs) if recs else NAN


def fastest(runs: list[Job]) -> Job:
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


def outcome(job: Job, unigram: float) -> str:
    """diverged | failed | stuck (val loss within TOL of knowing only the token frequencies) | trained."""
    return job.status if job.status != "ok" else "stuck" if final(job) > unigram - TOL else "trained"


def top_ratio(rec: dict) -> tuple[float, int]:
    """(the largest top/median |h| over the blocks, its block) of a telemetry record; (NAN, -1) without one."""
    top, med = rec.get("act_top") or [], rec.get("act_median") or []
    ratios = [t / m if m and m > 0 else NAN for t, m in zip(top, med)]
    good = [(x, i) for i, x in enumerate(ratios) if math.isfinite(x)]
    return max(good) if good else (NAN, -1)


def last(job: Job) -> dict:
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


# ----------------------------------------------------------------------------- what the sections read


@dataclass
class Results:
    """What every section of the report reads."""

    out: Path  # the study's folder: report.md and the figures go here
    plt: typing.Any  # matplotlib.pyplot, or None: tables only
    groups: dict[str, list[Job]]  # variant: its probe and its seeds
    q: dict[str, Job]  # the questions' runs, by their Run name (question.py)
    unigram: float  # the val loss of a model that knows only the token frequencies
    bench: dict[str, dict[str, float]]  # device: norm layer: µs per forward + backward
    reps: dict[str, list[Job]] = field(default_factory=dict)  # a seeded Run's jobs, one per seed, by Run name

    def seeds(self, run) -> list[Job]:
        """The jobs of a question's Run: one per seed (one for an unseeded Run); [] when not run."""
        return self.reps.get(run.name, [])

    def figure(self, name: str, fn, *args) -> list[str]:
        """Draw out/name.png with fn (if matplotlib is there); its markdown."""
        if self.plt is None:
            return [f"*({name}.png skipped: matplotlib is not installed)*", ""]
        fig = fn(self.plt, *args)
        fig.tight_layout()
        fig.savefig(self.out / f"{name}.png", dpi=100)
        self.plt.close(fig)
        return [f"![{name}]({name}.png)", ""]
