"""The report's figures: val-loss curves and per-layer profiles, drawn with matplotlib when it is installed
(Results.figure calls them with plt; get_plt finds it)."""

from scripts.study.job import Job


def get_plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plots skipped, tables only (pip install matplotlib)", flush=True)
        return None
    return plt


def plot_curves(plt, curves: dict[str, list[Job]]):
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
