"""The study's statistics: two arms of seeds compared by Welch's t-test, and the words that follow from it.

Every comparison of the report is an arm (one setting, several seeds with the same data order per seed)
against its baseline: the difference of their means (arm minus baseline) with a 95% confidence interval
(Welch-Satterthwaite degrees of freedom) and the two-sided p-value of Welch's t-test (unequal variances;
scipy.stats.ttest_ind with equal_var=False). Where a question makes several comparisons at once, Holm's
step-down correction keeps the chance of any false "detected" at 5%: the answer's wording uses the adjusted
p-value, the tables give both. A run that diverged or failed has no final value: it is left out of the
mean and counted apart, so a comparison says how many seeds it rests on.
"""

import math
import statistics
import warnings
from dataclasses import dataclass

NAN = float("nan")
ALPHA = 0.05  # a difference is "detected" when its (adjusted) p-value is below this


def finite(xs) -> list[float]:
    return [float(x) for x in xs if x is not None and math.isfinite(x)]


@dataclass(frozen=True)
class Comparison:
    """An arm against its baseline: b minus a (a: the baseline's seeds, b: the arm's)."""

    a: tuple[float, ...]  # the baseline's finite values, one per seed
    b: tuple[float, ...]  # the arm's
    diff: float  # mean(b) - mean(a)
    lo: float  # the 95% confidence interval of diff (Welch)
    hi: float
    p: float  # two-sided p-value of Welch's t-test; NAN with fewer than 2 values in an arm

    @property
    def n(self) -> tuple[int, int]:
        return len(self.a), len(self.b)

    @property
    def testable(self) -> bool:
        return math.isfinite(self.p)


def mean_sd(xs) -> tuple[float, float]:
    xs = finite(xs)
    if not xs:
        return NAN, NAN
    return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else NAN


def welch(a, b) -> Comparison:
    """b minus a: the difference of the means, its 95% interval and Welch's p (scipy)."""
    from scipy import stats as sp

    a, b = tuple(finite(a)), tuple(finite(b))
    if not a or not b:
        return Comparison(a, b, NAN, NAN, NAN, NAN)
    diff = statistics.mean(b) - statistics.mean(a)
    if len(a) < 2 or len(b) < 2:
        return Comparison(a, b, diff, NAN, NAN, NAN)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:  # both arms constant (a deterministic tie, or the same runs): no spread to test against
        return Comparison(a, b, diff, diff, diff, 1.0 if diff == 0 else 0.0)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    half = sp.t.ppf(0.975, df) * math.sqrt(va + vb)
    with warnings.catch_warnings():  # nearly equal arms: scipy warns of precision loss; the interval says it
        warnings.simplefilter("ignore", RuntimeWarning)
        p = float(sp.ttest_ind(b, a, equal_var=False).pvalue)
    return Comparison(a, b, diff, diff - half, diff + half, p)


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NAN stays NAN and is not counted as a test)."""
    order = sorted((p, i) for i, p in enumerate(ps) if math.isfinite(p))
    out, running = [NAN] * len(ps), 0.0
    for k, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * p))
        out[i] = running
    return out


def fmt_p(p: float) -> str:
    if not math.isfinite(p):
        return "—"
    return "< 0.001" if p < 0.001 else f"{p:.3f}"


def describe(c: Comparison, unit: str = "nats", digits: int = 4) -> str:
    """'-0.0312 nats [-0.0520, -0.0104], p = 0.012 (3 vs 3 seeds)': the difference, its 95% interval, p."""
    if not math.isfinite(c.diff):
        return f"no comparison ({c.n[0]} vs {c.n[1]} finite seeds)"
    d = f"{c.diff:+.{digits}f}" + (f" {unit}" if unit else "")
    if not c.testable:
        return f"{d} ({c.n[0]} vs {c.n[1]} seeds: too few for an interval)"
    p = f"p {fmt_p(c.p)}" if c.p < 0.001 else f"p = {fmt_p(c.p)}"
    return f"{d} [{c.lo:+.{digits}f}, {c.hi:+.{digits}f}], {p} ({c.n[0]} vs {c.n[1]} seeds)"


def verdict(c: Comparison, p: float | None = None, lower: str = "lower", higher: str = "higher") -> str:
    """The words for a comparison: `lower`/`higher` when detected at ALPHA (p: the adjusted p-value, else
    c.p), "no detectable difference at this budget" when not, "not testable" with too few seeds."""
    p = c.p if p is None else p
    if not math.isfinite(c.diff) or not math.isfinite(p):
        return "not testable (too few finite seeds)"
    if p >= ALPHA:
        return "no detectable difference at this budget"
    return lower if c.diff < 0 else higher
