"""Plot training runs: loss (train and val), learning rate and tokens/s against the step, in one PNG.

    python -m scripts.plot out                                   # -> out/loss.png
    python -m scripts.plot out-pre out-post out-peri             # several runs on one chart -> out-pre/loss.png
    python -m scripts.plot out-pre out-post --out norms.png      # anywhere else

Reads each OUT_DIR/metrics.jsonl written by train.py: training records (step, loss, lr, tokens_per_sec)
and evaluation records (step, train_loss, val_loss). A resumed run appends to the file; the last record
of a step wins. Needs matplotlib (pip install matplotlib); draws without a display.
"""

import argparse
import sys
from pathlib import Path

from gpt_residual import runlog


class PlotError(ValueError):
    """A run cannot be plotted; printed as one line."""


def read_metrics(out_dir: str) -> tuple[dict, dict]:
    """(train records, eval records) of one run, each {step: record}."""
    try:
        records = runlog.read(out_dir)
    except ValueError as e:
        raise PlotError(str(e)) from None
    train = {r["step"]: r for r in records if "loss" in r and "lr" in r}  # a resumed step: the last record wins
    evals = {r["step"]: r for r in records if "val_loss" in r}
    if not train and not evals:
        path = Path(out_dir) / "metrics.jsonl"
        raise PlotError(f"'{path}' has no loss records yet; plot again once the run has logged (log_interval)")
    return train, evals


def series(records: dict, key: str):
    steps = sorted(s for s, r in records.items() if r.get(key) is not None)
    return steps, [records[s][key] for s in steps]


def labels(dirs: list[str]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [Path(d).resolve().name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]


def default_out(dirs: list[str]) -> str:
    """The PNG beside the (first) run's metrics, so plotting never litters the folder it is run from."""
    return str(Path(dirs[0]) / "loss.png")


def plot(dirs: list[str], out: str) -> Path:
    runs = [read_metrics(d) for d in dirs]  # all read before drawing: a bad run fails fast
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_tok) = plt.subplots(3, 1, figsize=(9, 10), sharex=True, height_ratios=(2, 1, 1))
    for i, ((train, evals), label) in enumerate(zip(runs, labels(dirs))):
        color = f"C{i % 10}"
        ax_loss.plot(*series(train, "loss"), color=color, alpha=0.5, lw=1, label=f"{label} train")
        ax_loss.plot(*series(evals, "val_loss"), color=color, lw=2, marker="o", ms=3, label=f"{label} val")
        ax_lr.plot(*series(train, "lr"), color=color, label=label)
        ax_tok.plot(*series(train, "tokens_per_sec"), color=color, label=label)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss (thin: training batches, thick: validation)")
    ax_loss.legend(fontsize="small")
    ax_lr.set_ylabel("learning rate")
    ax_tok.set_ylabel("tokens / s")
    ax_tok.set_xlabel("step")
    for ax in (ax_loss, ax_lr, ax_tok):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(out) if Path(out).suffix else Path(out).with_suffix(".png")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    except (OSError, ValueError) as e:
        raise PlotError(f"cannot write '{path}': {e}") from None
    finally:
        plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dirs", nargs="+", metavar="OUT_DIR", help="training run folders (with metrics.jsonl)")
    parser.add_argument("--out", help="the PNG to write (default: loss.png in the first OUT_DIR)")
    args = parser.parse_args(argv)
    try:
        path = plot(args.out_dirs, args.out or default_out(args.out_dirs))
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
