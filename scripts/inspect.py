"""Look inside a trained run, block by block: massive activations, the logit lens, and what each block is worth.

python -m scripts.inspect --out_dir=out                        # a table on stdout, the figure in out/inspect.png
python -m scripts.inspect --out_dir=out --json=inspect.json    # the same numbers as JSON too
python -m scripts.inspect --out_dir=out --batches=20 --device=cuda

Loads out_dir/ckpt.pt (pretrained.load_model) and measures in float32 on the first `batches` of the run's fixed
validation batches (train.load_data: the batches its loss estimates read; with --batches=eval_iters the val loss is
the run's own estimate at that step, exactly for a run trained in float32). Per block: the three largest |h| of the
stream leaving it and the median |h| (Sun et al. 2024), where the largest sits (token position, channel), the logit
lens loss, the loss increase when the block is skipped, and the angular distance between its input and output
(Gromov et al. 2024); then the switches' readings. Every number is explained in gpt_residual/instruments.py.
Costs n_layer + 1 forward passes per batch.
"""

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import train
from gpt_residual import checkpoint, config, console, instruments, runtime
from gpt_residual.pretrained import load_model


@dataclass
class InspectConfig:
    out_dir: str = "out"  # the training run whose ckpt.pt to inspect
    json: str = ""  # also write the numbers to this JSON file
    png: str = ""  # the figure of the layers (default: out_dir/inspect.png)
    batches: int = 4  # validation batches to measure on (each the run's batch_size x block_size tokens)
    device: str = "cpu"  # "cpu" | "cuda" | "cuda:1" | "mps" | "auto"

    def __post_init__(self):
        if self.batches <= 0:
            raise config.ConfigError(f"batches must be positive, got {self.batches}")
        config.check_choice("device", self.device.split(":")[0], config.DEVICES)
        for key in ("json", "png"):
            if getattr(self, key) and Path(getattr(self, key)).is_dir():
                raise config.ConfigError(f"{key} '{getattr(self, key)}' is a folder; give a file name")


def run_record(out_dir: str) -> dict:
    """The step and training config of out_dir/ckpt.pt, read without loading its tensors into memory."""
    path = Path(out_dir) / "ckpt.pt"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # the tensors stay on disk
    except Exception:  # missing, damaged, unsafe, or too old to be mapped: checkpoint.load says which, or loads it
        state = checkpoint.load(path)
    if "config" not in state or "step" not in state:
        raise checkpoint.CheckpointError(f"{out_dir}/ckpt.pt has no training config: inspect a run of train.py")
    return {"step": state["step"], "config": state["config"]}


def val_batches(saved: dict, n: int, rt) -> list:
    """The first n of the run's fixed validation batches (fewer when the split is smaller), on rt.device."""
    known = {f.name for f in dataclasses.fields(config.TrainConfig)}
    try:
        cfg = config.TrainConfig(**{**{k: v for k, v in saved.items() if k in known}, "init_from": "resume"})
    except ValueError as e:  # a config this code no longer accepts (ConfigError is one)
        raise checkpoint.CheckpointError(f"the run's recorded config does not validate here ({e})") from None
    sampler = train.load_data(cfg, rt).evals["val"]
    samples = sampler.estimate_samples(n)
    return [sampler.get(g, rt.device, min(sampler.B, samples - g * sampler.B)) for g in range(-(-samples // sampler.B))]


def table(result: dict) -> str:
    """The per-block table, the loss, and each switch module's readings."""
    head = f"{'block':>5} {'top |h| (1, 2, 3)':>26} {'median':>8} {'at (pos, ch)':>13} {'lens loss':>9} "
    lines = [head + f"{'skip +loss':>10} {'angle/pi':>8}"]
    for r in result["layers"]:
        top, at = " ".join(f"{v:>8.3g}" for v in r["top_abs"]), f"({r['max_position']}, {r['max_channel']})"
        lines.append(
            f"{r['block']:>5} {top:>26} {r['median_abs']:>8.3g} {at:>13} "
            f"{r['logit_lens_loss']:>9.4f} {r['skip_loss_delta']:>+10.4f} {r['angular_distance']:>8.4f}"
        )
    lines.append(f"val loss {result['val_loss']:.4f} at step {result['step']} ({result['out_dir']})")
    if result["hc_gain"] is not None:
        lines.append(f"hc_gain (composite gain of H_res over depth): {result['hc_gain']:.4g}")
    for name, readings in result["switches"].items():
        lines.append(f"{name}: " + ", ".join(f"{k}={_short(v)}" for k, v in readings.items()))
    return "\n".join(lines)


def _short(v) -> str:
    return "[" + ", ".join(_short(x) for x in v) + "]" if isinstance(v, list) else f"{v:.4g}"


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise config.ConfigError("the figure needs matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    return plt


def figure(result: dict):
    """Four panels against the block: |h| (top 3 and median), logit lens loss, skip loss increase, angular distance."""
    plt = pyplot()
    blocks = [r["block"] for r in result["layers"]]
    col = {k: [r[k] for r in result["layers"]] for k in result["layers"][0]}
    fig, axes = plt.subplots(4, 1, figsize=(8, 11), sharex=True)
    for k, style in enumerate(("-o", "--", ":")):
        axes[0].plot(blocks, [t[k] for t in col["top_abs"]], style, label=f"top {k + 1}")
    axes[0].plot(blocks, col["median_abs"], "-s", label="median")
    axes[0].set(yscale="log", ylabel="|h| of the stream (log)", title=f"{result['out_dir']}, step {result['step']}")
    axes[1].plot(blocks, col["logit_lens_loss"], "-o", label="the stream after the block, through ln_f and the head")
    axes[1].axhline(result["val_loss"], color="gray", ls="--", label="the model's loss")
    axes[1].set_ylabel("logit lens loss (nats/token)")
    axes[2].bar(blocks, col["skip_loss_delta"])
    axes[2].set_ylabel("loss increase if skipped (nats/token)")
    axes[3].plot(blocks, col["angular_distance"], "-o")
    axes[3].set(ylabel="angular distance in -> out (x pi rad)", xlabel="block (0 = first)", ylim=(0, None))
    axes[3].xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def write(path: Path, write_fn, flag: str):
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        write_fn(tmp)
        tmp.replace(path)
    except (OSError, ValueError) as e:
        raise config.ConfigError(f"cannot write '{path}' ({e}); choose another --{flag}") from None


def run_inspect(cfg: InspectConfig, out=sys.stdout) -> dict:
    """Measure the run, print the table, write the figure (and the JSON); return the numbers."""
    plt = pyplot()  # fail before the measuring, not after it
    rt, ended_well = runtime.init_runtime(cfg.device, "float32"), False
    try:
        record = run_record(cfg.out_dir)
        batches = val_batches(record["config"], cfg.batches, rt)  # a data problem fails before the weights load
        model, _ = load_model(cfg.out_dir, rt.device)
        result = {"out_dir": cfg.out_dir, "step": record["step"], **instruments.measure(model, batches)}
        ended_well = True
    finally:
        runtime.shutdown(rt, ended_well)
    print(table(result), file=out)
    png = Path(cfg.png or Path(cfg.out_dir) / "inspect.png")
    fig = figure(result)
    try:
        write(png, lambda p: fig.savefig(p, dpi=110, format="png"), "png")
    finally:
        plt.close(fig)
    if cfg.json:
        write(Path(cfg.json), lambda p: p.write_text(json.dumps(result, indent=1) + "\n"), "json")
    print(f"wrote {png}" + (f" and {cfg.json}" if cfg.json else ""), file=out)
    return result


def main(argv: list[str] | None = None) -> int:
    return console.command(InspectConfig, __doc__, run_inspect, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
