"""Plot training runs: loss (train and val), learning rate and tokens/s against the step, in one PNG.

    python -m scripts.plot out                                   # -> out/loss.png
    python -m scripts.plot out-pre out-post out-peri             # several runs on one chart -> out-pre/loss.png
    python -m scripts.plot out-pre out-post --out norms.png      # anywhere else
    python -m scripts.plot out-char out-bpe --metric=bpb         # bits per byte (across tokenizers) -> out-char/bpb.png

Reads each OUT_DIR/metrics.jsonl written by train.py: training records (step, loss, lr, tokens_per_sec)
and evaluation records (step, train_loss, val_loss, train_bpb, val_bpb). A resumed run appends to the file;
the last record of a step wins. --metric=bpb draws the estimates' bits per byte instead of the losses in nats
per token (the training batches' losses have no byte count: the thin line is then the train split's estimate).
Needs matplotlib (pip install matplotlib); draws without a display.
"""

import argparse
import sys
from pathlib import Path

from gpt_residual import runlog


class PlotError(ValueError):
    """A run cannot be plotted; printed as one line."""


def read_metrics(out_dir: str, metric: str = "loss") -> tuple[dict, dict]:
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
    if metric == "bpb" and not any(r.get("val_bpb") is not None for r in evals.values()):
        path = Path(out_dir) / "metrics.jsonl"
        raise PlotError(f"'{path}' has no bits per byte (val_bpb), as runs before they were logged; use --metric=loss")
    return train, evals


def series(records: dict, key: str):
    steps = sorted(s for s, r in records.items() if r.get(key) is not None)
    return steps, [records[s][key] for s in steps]


def labels(dirs: list[str]) -> list[str]:
    """Each run's folder name, or its path where two runs share a name."""
    names = [Path(d).resolve().name for d in dirs]
    return [n if names.count(n) == 1 else str(d) for n, d in zip(names, dirs)]


def default_out(dirs: list[str], metric: str = "loss") -> str:
    """The PNG beside the (first) run's metrics, so plotting never litters the folder it is run from."""
    return str(Path(dirs[0]) / f"{metric}.png")


def plot(dirs: list[str], out: str, metric: str = "loss") -> Path:
    runs = [read_metrics(d, metric) for d in dirs]  # all read before drawing: a bad run fails fast
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plotting needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_lr, ax_tok) = plt.subplots(3, 1, figsize=(9, 10), sharex=True, height_ratios=(2, 1, 1))
    for i, ((train, evals), label) in enumerate(zip(runs, labels(dirs))):
        color = f"C{i % 10}"
        thin = series(train, "loss") if metric == "loss" else series(evals, "train_bpb")
        ax_loss.plot(*thin, color=color, alpha=0.5, lw=1, label=f"{label} train")
        ax_loss.plot(*series(evals, f"val_{metric}"), color=color, lw=2, marker="o", ms=3, label=f"{label} val")
        ax_lr.plot(*series(train, "lr"), color=color, label=label)
        ax_tok.plot(*series(train, "tokens_per_sec"), color=color, label=label)
    if metric == "loss":
        ax_loss.set_ylabel("loss (nats per token)")
        ax_loss.set_title("loss (thin: training batches, thick: validation)")
    else:
        ax_loss.set_ylabel("bits per byte")
        ax_loss.set_title("bits per byte (thin: train split, thick: validation)")
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
    parser.add_argument("--out", help="the PNG to write (default: METRIC.png in the first OUT_DIR)")
    parser.add_argument("--metric", choices=("loss", "bpb"), default="loss",
                        help="the top panel: loss in nats per token, or bits per byte (comparable across tokenizers)")
    args = parser.parse_args(argv)
    try:
        path = plot(args.out_dirs, args.out or default_out(args.out_dirs, args.metric), args.metric)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
